"""llama-swap: one proxy process that starts a llama-server per model on demand.

Config is a YAML file (config.yaml). Facts that shape it (design/reference/llama-swap-contract.md):
- models in no group swap one at a time, so every model goes into one group with
  `swap: false, exclusive: false`, and several stay loaded together;
- unknown keys are ignored silently, so the emitted keys are checked against the known ones;
- `cmd` is split like a shell splits words but no shell runs it, and a line starting with `#`
  is dropped before splitting, so every word is shlex-quoted and line breaks are refused;
- `${PORT}` takes the next number from `startPort` (model ids in sorted order); the ports are
  placed right above our own port (LLAMA_SWAP_PORT + 1, ...) so two stacks on different ports
  do not collide;
- `concurrencyLimit` defaults to 10 (queued requests included, then HTTP 429), so it is raised;
- keys: llama-swap and every model server it starts from a cmd model_serve writes answer to
  the same keys (`apiKeys`; `--api-key-file` in the cmd); v225+ passes the client's key on to
  the model server, and its own health check asks /health, which llama-server leaves open;
- a reload stops every running model. From v205 `reload()` sends SIGHUP and waits for it;
  `--watch-config` (a stat poll every 2 s) would reload a second time a moment later and cut
  the requests the first reload's new processes were serving (seen with v250), so it is used
  only by older builds, where SIGHUP ends llama-swap instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import threading
import time
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from model_serve.engines.base import (
    REQUEST_ENDED,
    REQUEST_STARTED,
    Engine,
    EngineModel,
)
from model_serve.engines.llama_server import check_option, options_for, resolve_llama_server
from model_serve.engines.server_options import builtin_templates, option_spellings
from model_serve.engines.stop_notes import note_stopping
from model_serve.errors import ConfigError, EngineError
from model_serve.loopback import LineStream, LoopbackError, stream_lines
from model_serve.machine_code import Machine, refuse_foreign, this_machine
from model_serve.programs import HOMEBREW_BINS, find_on_path
from model_serve.runtime import procs

if TYPE_CHECKING:
    from model_serve.models.plan import ServedModel

log = logging.getLogger("model_serve.engines")

HEALTH_CHECK_TIMEOUT = 300  # seconds a model may take to load (big models on slow disks)
CONCURRENCY_LIMIT = 64  # queued + in-flight requests per model before llama-swap answers 429
FALLBACK_START_PORT = 5800  # llama-swap's own default, used when our port is near the top
GROUP = "model_serve"
SLOT_SAVE_PATH = "--slot-save-path"
RELOAD_WAIT = 10.0  # llama-swap polls the file every 2 s
RESEND_EVERY = 1.0  # seconds between SIGHUPs until llama-swap starts the reload
MIN_UNLOAD_ONE = 161  # first release with POST /api/models/unload/<id>
MIN_SIGHUP_RELOAD = 205  # SIGHUP reloads from here on; before, it ends llama-swap
MIN_ENV_MACROS = 184  # first release that fills ${env.NAME} in apiKeys
# v179-v224 drop the client's key before the model server: a model server with a key of its
# own would refuse every request there.
MIN_KEY_FORWARDED = 225
# Behind the front llama-swap's key comes from its environment through ${env.…}: config.yaml
# stays the same from one start to the next (a last good copy put back keeps working), and
# holds no key.
KEY_ENV = "MODEL_SERVE_ENGINE_KEY"

# Keys llama-swap reads (config-schema.json of v250). Anything else would be ignored silently.
KNOWN_TOP_KEYS = frozenset({
    "apiKeys", "captureBuffer", "globalTTL", "groups", "healthCheckTimeout", "hooks",
    "includeAliasesInList", "logLevel", "logTimeFormat", "logToStdout", "macros", "matrix",
    "metricsMaxInMemory", "models", "peers", "performance", "profiles", "routing", "selectors",
    "sendLoadingState", "startPort", "store", "ui", "unloadTimeout", "upstream",
})
KNOWN_MODEL_KEYS = frozenset({
    "aliases", "capabilities", "checkEndpoint", "cmd", "cmdStop", "compat", "concurrencyLimit",
    "description", "env", "filters", "macros", "metadata", "name", "proxy", "sendLoadingState",
    "timeouts", "ttl", "unlisted", "unloadTimeout", "useModelName",
})
KNOWN_GROUP_KEYS = frozenset({"swap", "exclusive", "persistent", "members"})

_STATES = {"ready": "loaded", "starting": "loading", "stopping": "stopping"}
_VERSION_RE = re.compile(r"version:\s*v?(\d+)")
# llama-swap expands `${...}` as text (and `${env.X}` before YAML is even parsed); a newline
# lets its comment-line filter eat part of a command.
_CMD_UNSAFE = re.compile(r"\$\{|[\r\n]")
_MACRO_RE = re.compile(r"\$\{([^}]*)\}")
_LLAMA_SWAP_MACROS = frozenset({"PORT", "MODEL_ID"})


class _Quoted(str):
    """A string always written double-quoted (model ids: ':' and '/' are common in them)."""


@lru_cache(maxsize=1)
def _dumper() -> Any:
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(_Quoted, lambda dumper, value: dumper.represent_scalar(
        "tag:yaml.org,2002:str", str(value), style='"'))
    return Dumper


def resolve_llama_swap(configured: Path | None, machine: Machine | None = None) -> Path:
    """LLAMA_SWAP_BIN, else llama-swap on PATH. On Apple Silicon an Intel-only build is
    refused with the fix."""
    machine = machine or this_machine()
    brew = "brew tap mostlygeek/llama-swap && brew install llama-swap"
    if configured is not None:
        if not configured.is_file() or not os.access(configured, os.X_OK):
            raise EngineError(f"LLAMA_SWAP_BIN={configured} is not an executable file",
                              "fix LLAMA_SWAP_BIN in .env or unset it to search PATH")
        found, from_setting = configured, True
    else:
        found, from_setting = find_on_path("llama-swap", platform=machine.system), False
    if found:
        refuse_foreign(found, "llama-swap", "LLAMA_SWAP_BIN", from_setting, machine,
                       "llama-swap", f"{brew} (or set ENGINE=llama-server)",
                       tuple(f / "llama-swap" for f in HOMEBREW_BINS))
        return found
    if machine.system == "darwin":
        advice = brew
    else:
        advice = ("download llama-swap_<N>_linux_<arch>.tar.gz from "
                  "https://github.com/mostlygeek/llama-swap/releases and put llama-swap on "
                  "PATH (or set LLAMA_SWAP_BIN)")
    raise EngineError("llama-swap was not found (not on PATH, LLAMA_SWAP_BIN unset)",
                      f"{advice}; or set ENGINE=llama-server to use llama.cpp's router")


class LlamaSwapEngine(Engine):
    name = "llama-swap"

    @property
    def config_path(self) -> Path:
        return self.settings.llama_swap_config

    @property
    def start_port(self) -> int:
        """First `${PORT}`: right above our API port, so stacks on other ports do not collide."""
        port = self.settings.port + 1
        return port if port <= 65000 else FALLBACK_START_PORT

    def binary(self) -> Path:
        return resolve_llama_swap(self.settings.llama_swap_bin)

    def command(self) -> list[str]:
        host, port = self.settings.engine_host, self.settings.engine_port
        listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        argv = [str(self.binary()), "--config", str(self.config_path), "--listen", listen]
        if not self._reloads_on_sighup():
            argv.append("--watch-config")
        return argv

    def environment(self) -> dict[str, str]:
        number = self.version_number()
        keyed = self.settings.front_enabled and _fills_env_macros(number)
        if number is not None and number < MIN_KEY_FORWARDED and (
                self.settings.front_enabled or self.settings.api_keys):
            log.warning("llama-swap v%d cannot pass a key on to its model servers, so %s "
                        "without one to any local program; v%d or newer closes them", number,
                        "they answer" if keyed or not self.settings.front_enabled
                        else "it and they answer", MIN_KEY_FORWARDED)
        if not keyed:
            return {}
        from model_serve import internal_key

        key = internal_key.read(self.settings)
        return {KEY_ENV: key} if key else {}

    def _reloads_on_sighup(self) -> bool:
        number = self.version_number()
        return number is not None and number >= MIN_SIGHUP_RELOAD

    _read_version: tuple[tuple[str, int, int] | None, int | None] | None = None

    def version_number(self) -> int | None:
        """The release number (`version: v250 (abc), built at …` -> 250); None when unknown.
        Asked once per binary file: a start needs it for the command, the keys and the config,
        and each ask runs the program."""
        try:
            binary = self.binary()
            info = binary.stat()
            stamp: tuple[str, int, int] | None = (str(binary), info.st_size, info.st_mtime_ns)
        except (EngineError, OSError):
            stamp = None
        if stamp is None or self._read_version is None or self._read_version[0] != stamp:
            match = _VERSION_RE.search(self.version())
            self._read_version = (stamp, int(match.group(1)) if match else None)
        return self._read_version[1]

    # --- config -------------------------------------------------------------------------
    def render_config(self, plan: list[ServedModel]) -> str:
        import yaml

        from model_serve.engines.engine_check import required_options

        server = resolve_llama_server(self.settings.llama_server_bin).absolute()
        spellings = option_spellings(server, self.settings.state_dir)
        templates = builtin_templates(server, self.settings.state_dir)
        machine_options = required_options(self.settings, server)  # what this CPU needs
        for key in self.settings.api_keys:
            if not key.strip() or re.search(r"\s", key):
                raise ConfigError("API_KEYS holds a key with a space in it, which llama-swap "
                                  "refuses", "remove the spaces from the keys in API_KEYS")
        number = self.version_number()
        key_file = self.server_key_file() if number is None or number >= MIN_KEY_FORWARDED \
            else None
        if key_file is not None and _CMD_UNSAFE.search(str(key_file)):
            raise ConfigError(f"STATE_DIR ({self.settings.state_dir}) contains '${{' or a "
                              "line break, which llama-swap's cmd cannot carry",
                              "set STATE_DIR in .env to another folder")
        models: dict[str, Any] = {}
        from model_serve.config.custom_models import check_names

        for served in plan:
            _id, *aliases = self.routed_names(served)
            # Quoted in YAML, but a name is also a word of cmd (--alias), where a line break
            # would let llama-swap's comment filter drop what follows it.
            check_names([_id, *aliases], served.custom_line or repr(served.name),
                        "llama-swap's config.yaml")
            entry: dict[str, Any] = {
                "cmd": self._cmd(served, server, spellings, machine_options, key_file,
                                 templates),
                "proxy": "http://127.0.0.1:${PORT}",
                "checkEndpoint": "/health",
                # With the front the pressure unloader keeps the TTL: the slots are saved
                # before the model goes (llama-swap's own TTL would drop them), and Ollama
                # clients' keep_alive applies.
                "ttl": 0 if self.settings.front_enabled else int(served.ttl),
                "concurrencyLimit": CONCURRENCY_LIMIT,
            }
            if aliases:
                entry["aliases"] = [_Quoted(a) for a in aliases]
            models[_Quoted(served.name)] = entry
        config: dict[str, Any] = {
            "healthCheckTimeout": HEALTH_CHECK_TIMEOUT,
            "startPort": self.start_port,
            "logLevel": "info",
            # llama-server's own output on stdout, so `model logs` shows why a model failed.
            "logToStdout": "both",
        }
        if self.settings.front_enabled:
            if _fills_env_macros(number):  # else open: no key a build before v184 can take
                config["apiKeys"] = [_Quoted(f"${{env.{KEY_ENV}}}")]
        elif self.settings.api_keys:
            config["apiKeys"] = list(self.settings.api_keys)
        # What llama-swap keeps of requests and replies for its UI: prompts, so off by default.
        config["captureBuffer"] = self.settings.llama_swap_capture_mb
        config["models"] = models
        if models:
            # Without this group llama-swap keeps only one model loaded at a time.
            config["groups"] = {_Quoted(GROUP): {"swap": False, "exclusive": False,
                                                 "members": list(models)}}
        check_known_keys(config)
        header = ("# Generated by model_serve ('model sync'); edits here are overwritten.\n"
                  "# Per-model settings belong in custom_models.yaml.\n")
        return header + yaml.dump(config, Dumper=_dumper(), sort_keys=False,
                                  allow_unicode=True, width=1 << 30)

    def _cmd(self, served: ServedModel, server: Path, spellings: dict[str, str],
             machine_options: dict[str, str], key_file: Path | None = None,
             templates: list[str] | None = None) -> str:
        where = served.custom_line or served.name
        model_path = str(served.path.absolute())
        if _CMD_UNSAFE.search(model_path):
            raise ConfigError(f"the path of {served.name} ({model_path!r}) contains '${{' or a "
                              "line break, which llama-swap's cmd cannot carry",
                              "rename the file or its folder")
        if served.cmd:
            cmd = served.cmd.replace("${MODEL_PATH}", shlex.quote(model_path))
            unknown = sorted({m for m in _MACRO_RE.findall(cmd)
                              if m not in _LLAMA_SWAP_MACROS and not m.startswith("env.")})
            if unknown:
                raise ConfigError(f"{where}: cmd of {served.name} uses ${{{unknown[0]}}}, which "
                                  "neither model_serve nor llama-swap fills in",
                                  "use only ${MODEL_PATH} and ${PORT} in cmd")
            if "${PORT}" not in cmd:
                raise ConfigError(f"{where}: cmd of {served.name} has no ${{PORT}}",
                                  "add '--port ${PORT}' to cmd (llama-swap picks the port)")
            return cmd
        # --alias: replies name the served model, not the file.
        argv = [str(server), "--host", "127.0.0.1", "--port", "${PORT}", "--model", model_path,
                "--alias", served.name, "--ctx-size", str(served.ctx_size),
                "--parallel", str(served.parallel)]
        if key_file is not None:  # the key's file, never the key: `ps` shows command lines
            argv += [spellings.get("api-key-file", "--api-key-file"), str(key_file)]
        for option, value in {**machine_options, **options_for(served, templates or [])}.items():
            argv += _option_words(served, option, value, spellings)
        if served.keeps_conversations:
            from model_serve.engines import slot_cache

            folder = slot_cache.folder_for(self.settings.kv_cache_dir, served.name, served)
            if _CMD_UNSAFE.search(str(folder)):
                raise ConfigError(f"KV_CACHE_DIR ({folder.parent.parent}) contains '${{' or a "
                                  "line break, which llama-swap's cmd cannot carry",
                                  "set KV_CACHE_DIR in .env to another folder")
            slot_cache.make_folder(folder)  # llama-server wants it to exist; 0700
            argv += [SLOT_SAVE_PATH, str(folder)]
        # As the router's [*] section: context is sized by model_serve, so llama-server's
        # trial-fit pass only adds latency; metrics feed `model stats`.
        if "fit" in spellings and "fit" not in served.options:
            argv += [spellings["fit"], "off"]
        if "metrics" not in served.options:
            argv.append("--metrics")
        # ${PORT} must stay a bare word for llama-swap; every other word is quoted.
        return " ".join(word if word == "${PORT}" else shlex.quote(word) for word in argv)

    # --- HTTP API -----------------------------------------------------------------------
    def _get_json(self, path: str) -> Any:
        response = self.request("GET", path)
        if response.status_code != 200:
            raise EngineError(f"GET {path} answered HTTP {response.status_code}: "
                              f"{response.text[:200]}", "see 'model logs'")
        try:
            return response.json()
        except ValueError as exc:
            raise EngineError(f"GET {path} did not answer JSON: {response.text[:200]}",
                              "is LLAMA_SWAP_PORT taken by another program?") from exc

    def models(self) -> list[EngineModel]:
        """Every configured model (GET /v1/models) with the state of the running ones
        (GET /running, which lists only models that are not stopped)."""
        running = {item["model"]: item for item in self._get_json("/running").get("running", [])
                   if isinstance(item, dict) and "model" in item}
        listed = self._get_json("/v1/models").get("data", [])
        configured: dict[str, list[str]] | None = None
        result: list[EngineModel] = []
        for item in listed:
            name = item.get("id", "")
            aliases = ((item.get("meta") or {}).get("llamaswap") or {}).get("aliases")
            if aliases is None:  # builds before v241 do not list aliases
                configured = self._configured_aliases() if configured is None else configured
                aliases = configured.get(name, [])
            result.append(_engine_model(name, running.pop(name, None), list(aliases), item))
        # Running but not listed (an `unlisted` model someone configured by hand).
        result += [_engine_model(name, item, [], {}) for name, item in running.items()]
        return result

    def _configured_aliases(self) -> dict[str, list[str]]:
        import yaml

        try:
            models = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))["models"]
            return {str(k): list(v.get("aliases") or []) for k, v in models.items()}
        except (OSError, yaml.YAMLError, TypeError, KeyError, AttributeError):
            return {}

    def slot_folders(self, config: str | None = None) -> dict[str, Path]:
        import yaml

        try:
            models = yaml.safe_load(self._config_text(config))["models"]
        except (yaml.YAMLError, TypeError, KeyError):
            return {}
        folders = {}
        for name, entry in models.items():
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                words = shlex.split(entry.get("cmd", ""))
                if SLOT_SAVE_PATH in words[:-1]:
                    folders[str(name)] = Path(words[words.index(SLOT_SAVE_PATH) + 1])
        return folders

    def load(self, name: str, timeout: float = 300) -> bool:
        # No load endpoint: a request through /upstream starts the model and is answered once
        # it is ready (as llama-swap's own UI loads models).
        self.slot_folder_ready(name)
        response = self.request("GET", f"/upstream/{quote(name, safe='/:')}/health",
                                timeout=timeout)
        return response.status_code == 200

    def unload(self, name: str) -> None:
        self.save_slots(name)
        note_stopping(self.settings, [name])
        # Blocks until the model's process has exited (TERM, then KILL after unloadTimeout).
        response = self.request("POST", f"/api/models/unload/{quote(name, safe='/:')}",
                                timeout=60)
        if response.status_code == 200:
            return
        if response.status_code == 404:
            number = self.version_number()
            if number is not None and number < MIN_UNLOAD_ONE:
                raise EngineError(f"llama-swap v{number} cannot unload a single model "
                                  f"(v{MIN_UNLOAD_ONE} or newer can)",
                                  "upgrade llama-swap (brew upgrade llama-swap)")
            raise EngineError(f"llama-swap knows no model '{name}'",
                              "run 'model list' to see the served names")
        raise EngineError(f"unloading {name} failed: HTTP {response.status_code} "
                          f"{response.text[:200]}", "see 'model logs'")

    def events(self, stop: threading.Event) -> Iterator[tuple[str, str]]:
        """Follow GET /api/events (v135+). Each `modelStatus` frame lists every model with its
        state, and comes on connect and on every change; yield each model's changes. The
        stream ends on a config reload (llama-swap closes it), so callers reconnect."""
        known: dict[str, str] = {}
        requests_of: dict[str, str] = {}  # in-flight request id -> model
        for envelope in self.sse_json("/api/events", stop):
            try:
                kind = envelope.get("type")
                data = envelope.get("data")  # a JSON string inside the JSON envelope
                data = json.loads(data) if isinstance(data, str) else data
                if kind == "inflight":  # v235+: every request, as it starts and ends
                    yield from _request_events(data, requests_of)
                    continue
                if kind != "modelStatus":
                    continue
                changes = [(str(m["id"]), _STATES.get(str(m.get("state")), "unloaded"))
                           for m in data]
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
            for name, state in changes:
                if known.get(name) != state:
                    known[name] = state
                    yield name, state

    def reload(self) -> None:
        """Make llama-swap take the new file, and return once it serves it.

        llama-swap closes its event streams when it swaps in a new config, and keeps the old
        one when it refuses the file: a stream opened before the reload that closes is the
        proof. SIGHUP (v205+) makes the reload happen now instead of at the next 2-second poll
        of --watch-config; a settings-only change keeps the same model set, so that set alone
        cannot tell."""
        import yaml

        try:
            wanted = set(yaml.safe_load(self.config_path.read_text(encoding="utf-8"))["models"])
        except (OSError, yaml.YAMLError, TypeError, KeyError) as exc:
            raise EngineError(f"cannot read {self.config_path}: {exc}", "run 'model sync'") from exc
        deadline = time.monotonic() + RELOAD_WAIT
        refused = EngineError(f"llama-swap did not take the new {self.config_path.name} within "
                              f"{RELOAD_WAIT:.0f}s (it keeps the old one when it finds an "
                              "error)", "see 'model logs' for its reason")
        try:
            stream = stream_lines(self.settings.engine_url + "/api/events", self._headers(),
                                  read_timeout=RELOAD_WAIT + 5)
        except LoopbackError as exc:
            raise EngineError(f"llama-swap's event stream did not open: {exc}",
                              "see 'model logs'") from exc
        try:
            closed = _watch_close(stream)
            # llama-swap drops a SIGHUP that comes while a reload is under way, and a reload
            # lasts until the old server has shut down (its models stopped, up to 30 s): a
            # sync soon after another lost its reload that way. Asking again each second is
            # safe: until this stream closes, our reload has not begun or is under way, and
            # then every extra SIGHUP is dropped.
            self._ask_to_reload()
            while not closed.wait(RESEND_EVERY):
                if time.monotonic() >= deadline:
                    raise refused
                self._ask_to_reload()
        finally:
            stream.close()
        while True:
            try:
                listed = {item.get("id") for item in
                          self._get_json("/v1/models").get("data", [])}
            except EngineError:
                listed = set()  # the new server may not answer for a moment
            if listed == wanted:
                return
            if time.monotonic() > deadline:
                raise refused
            time.sleep(0.25)

    def _ask_to_reload(self) -> None:
        """SIGHUP to the running llama-swap (v205+; older builds die of it, and reload by their
        --watch-config poll instead)."""
        import signal

        from model_serve.runtime.state import read_state

        if not self._reloads_on_sighup():
            return
        state = read_state(self.settings.pid_file)
        ref = state.child("engine").pid if state else None
        # The supervisor's record; else whoever serves our port (llama-swap run by hand).
        pid = (ref.pid if ref is not None and ref.alive()
               else procs.listener_pid(self.settings.engine_port))
        if pid and _is_llama_swap(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGHUP)


def _fills_env_macros(number: int | None) -> bool:
    return number is None or number >= MIN_ENV_MACROS


def _request_events(data: dict[str, Any],
                    requests_of: dict[str, str]) -> Iterator[tuple[str, str]]:
    """(model, REQUEST_STARTED|REQUEST_ENDED) from an `inflight` event: `upsert` carries the
    request with its model, `remove` only its id."""
    operation = data.get("operation")
    if operation == "upsert":
        request = data.get("request") or {}
        request_id, model = str(request.get("id", "")), str(request.get("model", ""))
        if model and request_id not in requests_of:
            requests_of[request_id] = model
            yield model, REQUEST_STARTED
    elif operation == "remove":
        model = requests_of.pop(str(data.get("id", "")), "")
        if model:
            yield model, REQUEST_ENDED


def _is_llama_swap(pid: int) -> bool:
    import psutil

    try:
        process = psutil.Process(pid)
        return "llama-swap" in process.name() or any(
            "llama-swap" in word or "llama_swap" in word for word in process.cmdline())
    except psutil.Error:
        return False


def _watch_close(stream: LineStream) -> threading.Event:
    """An event set once the server closes `stream` (read in a thread: a read that times out
    would end the iteration for good)."""
    closed = threading.Event()

    def drain() -> None:
        with contextlib.suppress(Exception):  # closed under it, or cut off: both mean done
            for _line in stream:
                pass
        closed.set()

    threading.Thread(target=drain, daemon=True, name="reload-watch").start()
    return closed


def check_known_keys(config: dict[str, Any]) -> None:
    """llama-swap ignores unknown keys silently; a misspelt one must fail here instead."""
    problems = [f"top-level '{k}'" for k in config if k not in KNOWN_TOP_KEYS]
    for model_id, entry in (config.get("models") or {}).items():
        problems += [f"'{k}' of model {model_id}" for k in entry if k not in KNOWN_MODEL_KEYS]
    for group_id, group in (config.get("groups") or {}).items():
        problems += [f"'{k}' of group {group_id}" for k in group if k not in KNOWN_GROUP_KEYS]
    if problems:
        raise EngineError(f"model_serve wrote keys llama-swap does not know: "
                          f"{', '.join(problems)}", "this is a bug in model_serve; please report")


def _option_words(served: ServedModel, option: str, value: str,
                  spellings: dict[str, str]) -> list[str]:
    """One plan option as command-line words, checked against this llama-server's options."""
    where = served.custom_line or served.name
    check_option(served, option, spellings)
    if _CMD_UNSAFE.search(value):
        raise ConfigError(f"{where}: the value of '{option}' contains '${{' or a line break, "
                          "which llama-swap's cmd cannot carry",
                          f"change the value of {option} for {served.name}")
    if value == "true":
        return [spellings[option]]
    if value == "false":  # --no-jinja and friends; an option without a negation is left out
        negated = spellings.get(f"no-{option}")
        return [negated] if negated else []
    return [spellings[option], value]


def _engine_model(name: str, running: dict[str, Any] | None, aliases: list[str],
                  listed: dict[str, Any]) -> EngineModel:
    if running is None:
        return EngineModel(name=name, state="unloaded", aliases=aliases, detail=listed)
    port = None
    try:
        port = urlsplit(str(running.get("proxy", ""))).port
    except ValueError:
        port = None
    return EngineModel(name=name, state=_STATES.get(str(running.get("state")), "unloaded"),
                       port=port, aliases=aliases, detail={**listed, "running": running})
