"""The one small interface everything above the engine uses (CLI, unloader, stats)."""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_serve.config.settings import Settings
from model_serve.errors import EngineError, ModelServeError, NotRunningError
from model_serve.fileio import write_if_changed
from model_serve.loopback import Answer, LoopbackError, call, stream_lines
from model_serve.models.names import dash_form, identity
from model_serve.sse import sse_payloads

if TYPE_CHECKING:
    from model_serve.engines import slot_cache
    from model_serve.models.plan import ServedModel

log = logging.getLogger("model_serve.engines")

# States that hold memory; both engines' vocabularies map onto these.
LOADED_STATES = frozenset({"loaded", "loading", "sleeping", "stopping"})
# What events() yields, besides states, for an engine that reports each request (llama-swap).
REQUEST_STARTED, REQUEST_ENDED = "request-started", "request-ended"


@dataclass
class EngineModel:
    """One model as the running engine reports it."""

    name: str
    state: str  # unloaded | loading | loaded | sleeping | stopping | failed
    port: int | None = None  # its own llama-server port while it runs
    aliases: list[str] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def served_name(self) -> str:
        """The name users know it by (`ls/gemma3:270m-q4_k_m`): the router's id is the dash
        form, and the colon form is among its aliases."""
        if ":" in self.name:
            return self.name

        return next((a for a in self.aliases if ":" in a and dash_form(a) == self.name),
                    self.name)


class Engine(ABC):
    name: str = ""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    # --- config -------------------------------------------------------------------------
    @property
    @abstractmethod
    def config_path(self) -> Path: ...

    @abstractmethod
    def render_config(self, plan: list[ServedModel]) -> str: ...

    def restarted_by_reload(self, old_config: str, new_config: str) -> set[str] | None:
        """The ids of the running models a reload from `old_config` to `new_config` restarts;
        None for all of them (the default: an engine that restarts everything)."""
        return None

    # --- model identity: the one place that knows which names reach which model --------------
    def model_id(self, served_name: str) -> str:
        """The id this engine lists and routes a served name under."""
        return served_name

    def routed_names(self, served: ServedModel) -> list[str]:
        """Every name this engine's config routes to `served`, its id first: the served name,
        its dash form (older clients use it) and its aliases."""

        return list(dict.fromkeys([self.model_id(served.name), served.name,
                                   dash_form(served.name), *served.aliases]))

    def resolve(self, name: str, models: list[EngineModel] | None = None) -> list[EngineModel]:
        """The running models `name` reaches (id, served name or alias; neither case nor ':'
        against '-' counts, as with the engines' own routing)."""
        wanted = identity(name)
        listed = self.models() if models is None else models
        return [m for m in listed
                if wanted in {identity(n) for n in (m.name, m.served_name, *m.aliases)}]

    def write_config(self, plan: list[ServedModel]) -> bool:
        """Render and write the config atomically; False when nothing changed."""
        return write_if_changed(self.config_path, self.render_config(plan), mode=0o600)

    # --- process ------------------------------------------------------------------------
    @abstractmethod
    def binary(self) -> Path: ...

    @abstractmethod
    def command(self) -> list[str]: ...

    def environment(self) -> dict[str, str]:
        """Variables the engine is started with on top of ours (its model servers inherit
        them): how keys reach it without a command line, where `ps` would show them."""
        return {}

    def server_key_file(self) -> Path | None:
        """The file of keys the engine's model servers (and the router) answer to: behind the
        front, the key made at each start, so only model_serve reaches them on loopback; with
        FRONT=off and API_KEYS, the user's keys (written here, 0600); else None (open)."""
        if self.settings.front_enabled:
            return self.settings.internal_key_file
        if not self.settings.api_keys:
            return None
        from model_serve import internal_key

        return internal_key.write_keys_file(self.settings.state_dir / "api-keys",
                                            self.settings.api_keys)

    def version(self) -> str:
        import subprocess

        try:
            out = subprocess.run([str(self.binary()), "--version"], capture_output=True,
                                 text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired, EngineError):
            return "unknown"
        text = (out.stdout + out.stderr).strip().splitlines()
        return next((line for line in text if "version" in line.lower()), text[0] if text else "")

    # --- HTTP API -----------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        from model_serve import internal_key  # `model status` must not import `secrets`

        return internal_key.engine_headers(self.settings)

    def request(self, method: str, path: str, timeout: float = 10, json: Any = None,
                params: dict[str, str] | None = None) -> Answer:
        try:
            return call(method, self.settings.engine_url + path, self._headers(), timeout,
                        json_body=json, params=params)
        except LoopbackError as exc:
            raise EngineError(f"the engine at {self.settings.engine_url} did not answer: {exc}",
                              "is the stack running? try 'model status'") from exc

    def wait_unloaded(self, name: str, timeout: float = 30.0) -> bool:
        """After unload(): True once the engine reports `name` out of memory (the router
        answers the unload call before its model server has exited)."""
        from model_serve.runtime.procs import wait_until

        return wait_until(lambda: next((m.state for m in self.models() if m.name == name),
                                       "unloaded") not in LOADED_STATES, timeout)

    def healthy(self, timeout: float = 2) -> bool:
        return answers_health(self.settings.engine_url, self.settings.api_keys, timeout)

    def require_running(self) -> None:
        """Raise NotRunningError (exit code 3) unless the engine answers."""
        if not self.healthy():
            raise NotRunningError(f"the stack is not running on port {self.settings.port}",
                                  "start it with 'model start'")

    @abstractmethod
    def models(self) -> list[EngineModel]: ...

    @abstractmethod
    def unload(self, name: str) -> None: ...

    # --- saved conversations (KV_CACHE, engines/slot_cache.py) ---------------------------------
    def slot_folders(self, config: str | None = None) -> dict[str, Path]:
        """Engine id -> the folder a config (the file in effect when None) saves that model's
        slots into; empty for an engine (or a config) that saves none."""
        return {}

    def _config_text(self, config: str | None) -> str:
        if config is not None:
            return config
        try:
            return self.config_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return ""

    def config_taken(self) -> None:
        """After a sync, once the config file is the one the engine runs on: saved caches
        under keys it no longer names are removed now, not when a config is written (a config
        the engine refuses is replaced by the last good one, whose caches must stay)."""
        if self.settings.kv_cache_dir.is_dir():
            from model_serve.engines import slot_cache

            slot_cache.remove_other_keys(self.settings.kv_cache_dir,
                                         set(self.slot_folders().values()))

    def slot_folder_ready(self, name: str) -> None:
        """Before a load: llama-server refuses to start when its slot folder is missing
        (removed by hand, or by an earlier version's `model forget`), so it is made again."""
        folder = self.slot_folders().get(name) if self.settings.kv_cache_enabled else None
        if folder is None or folder.is_dir():
            return
        from model_serve.engines import slot_cache

        try:
            slot_cache.make_folder(folder)
        except OSError as exc:  # the load fails with llama-server's own reason
            log.error("the saved-conversations folder of %s cannot be made (%s): move away "
                      "what is at %s", name, exc, folder)

    def _model_server(self, name: str) -> tuple[Path, str] | None:
        """`name`'s slot folder and the address of its own llama-server, while it runs."""
        folder = self.slot_folders().get(name) if self.settings.kv_cache_enabled else None
        if folder is None:
            return None
        model = next((m for m in self.models() if m.name == name), None)
        if model is None or model.state != "loaded" or not model.port:
            return None
        return folder, f"http://127.0.0.1:{model.port}"

    def save_slots(self, name: str, deadline: float | None = None) -> None:
        """Before `name` leaves memory: save each of its slots that holds a conversation (by
        `deadline`, a time.monotonic(), when one is given)."""
        import time

        from model_serve.engines import slot_cache

        server = self._model_server(name)
        if server is None:
            return
        folder, url = server
        started = time.monotonic()
        try:
            saved = slot_cache.save_slots(url, self._headers(), folder, deadline)
            slot_cache.keep_within(self.settings.kv_cache_dir,
                                   int(self.settings.kv_cache_max_gb * 2**30))
        except Exception as exc:  # noqa: BLE001 - a full disk or a timeout must not stop the unload
            log.warning("saving the conversations of %s failed (%s); it is unloaded without "
                        "them", name, exc)
            return
        if saved:
            log.info("saved %d slot(s) of %s (%d tokens, %.1f MiB) in %.0f ms", len(saved),
                     name, sum(s.tokens for s in saved), sum(s.bytes for s in saved) / 2**20,
                     (time.monotonic() - started) * 1000)

    def save_before_stop(self, deadline: float | None = None) -> None:
        """At a stop of the stack (`model stop`, restart, the service manager's stop): save
        the loaded models' conversations, within KV_CACHE_STOP_SAVE_SECONDS in all so the
        stop stays within the service managers' timeouts, and by `deadline` (monotonic) when
        given; models past it are skipped, and said. Never raises: the stop must go on."""
        import time

        budget = self.settings.kv_cache_stop_save_seconds
        if not self.settings.kv_cache_enabled or budget <= 0:
            return
        until = time.monotonic() + budget
        deadline = until if deadline is None else min(until, deadline)
        try:
            loaded = [m.name for m in self.models() if m.state == "loaded"]
        except ModelServeError as exc:
            log.warning("conversations not saved at stop: %s", exc.message)
            return
        skipped = []
        for name in loaded:
            if time.monotonic() >= deadline:
                skipped.append(name)
                continue
            self.save_slots(name, deadline)
        if skipped:
            log.warning("stop: the conversations of %s were not saved (KV_CACHE_STOP_SAVE_"
                        "SECONDS=%d spent)", ", ".join(skipped), budget)

    def restore_slots(self, name: str, body: dict[str, Any]) -> slot_cache.Restored | None:
        """Right after `name` loaded, before this request reaches it: restore the saved
        conversation the request continues, if any."""
        import time

        from model_serve.engines import slot_cache

        server = self._model_server(name)
        if server is None:
            return None
        folder, url = server
        prompt = slot_cache.rendered_prompt(url, self._headers(), body)
        started = time.monotonic()
        restored = slot_cache.restore_best(url, self._headers(), folder, prompt) \
            if prompt else None
        if restored is not None:
            restored.checkable = slot_cache.reply_can_tell(body)
            log.info("restored %d tokens of a saved conversation into %s in %.0f ms",
                     restored.tokens, name, (time.monotonic() - started) * 1000)
        return restored

    @abstractmethod
    def load(self, name: str, timeout: float = 300) -> bool:
        """Load `name` (by its id) and return once it is loaded: True, or False when it failed
        or did not finish within `timeout` seconds."""

    @abstractmethod
    def reload(self) -> None:
        """Make the running engine pick up a changed config file."""

    def sse_json(self, path: str, stop: threading.Event) -> Iterator[Any]:
        """Each `data:` payload of a server-sent event stream, parsed as JSON (bad ones are
        skipped); ends when the server closes the stream or `stop` is set. LoopbackError when
        it cannot be opened."""
        lines = stream_lines(self.settings.engine_url + path, self._headers())
        try:
            for payload in sse_payloads(lines):
                if stop.is_set():
                    return
                yield payload
        finally:
            lines.close()

    def events(self, stop: threading.Event) -> Iterator[tuple[str, str]]:
        """(model, status) as the engine reports changes; engines without a feed yield none."""
        return iter(())

    def model_metrics(self, model: EngineModel, timeout: float = 2) -> dict[str, float] | None:
        """The model's own llama-server counters, read from its port directly: a probe through
        the engine could load the model or count as use."""
        import http.client

        if model.port is None:
            return None
        conn = http.client.HTTPConnection("127.0.0.1", model.port, timeout=timeout)
        try:
            conn.request("GET", "/metrics", headers=self._headers())
            response = conn.getresponse()
            if response.status != 200:
                return None
            return parse_prometheus(response.read().decode("utf-8", "replace"))
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()


def parse_prometheus(text: str) -> dict[str, float]:
    """`name value` lines of a Prometheus text page (no labels are used by llama-server)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            values[name.split(":", 1)[-1]] = float(value)
        except ValueError:
            continue
    return values


def answers_health(url: str, api_keys: tuple[str, ...] = (), timeout: float = 2,
                   unix_socket: Path | None = None) -> bool:
    """GET `url`/health answers 200 (the front and both engines serve it). One HTTP/1.0
    request on a plain socket: `model status` must start fast, and http.client alone costs it
    13 ms of imports. `unix_socket`: asked through it (the front's own socket)."""
    import socket

    from model_serve.loopback import unix_connection

    host, _, port = url.split("//", 1)[1].rpartition(":")
    host = host.strip("[]")
    auth = f"Authorization: Bearer {api_keys[0]}\r\n" if api_keys else ""
    request = f"GET /health HTTP/1.0\r\nHost: {host}\r\n{auth}\r\n".encode()
    try:
        with unix_connection(unix_socket, timeout) if unix_socket is not None else \
                socket.create_connection((host, int(port)), timeout=timeout) as sock:
            sock.sendall(request)
            status_line = sock.makefile("rb").readline(256)
    except OSError:
        return False
    parts = status_line.split()
    return len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1] == b"200"
