"""A STAND-IN for the llama-swap binary, for tests only.

llama-swap (github.com/mostlygeek/llama-swap) is a Go program that cannot be installed on the
test machines, so this small Python program plays its part, following what its source says
(design/reference/llama-swap-contract.md): the command line, the config keys model_serve
relies on, default one-model-at-a-time residency, groups, `${PORT}` allocation, the HTTP
endpoints and their shapes, TTL, concurrencyLimit (429), apiKeys, reload on a changed file
(every running model stops; an invalid file is logged and the old config stays) and stopping
model processes by process group. It really starts the configured commands (real
llama-server) and proxies requests to them byte for byte, streaming included.

    python tests/llama_swap_standin.py --config FILE --listen HOST:PORT [--watch-config]
    python tests/llama_swap_standin.py --version

Stdlib and PyYAML only. Not a fake of model_serve: model_serve never imports it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

VERSION = "v250"
VERSION_LINE = f"version: {VERSION} (standin), built at unknown"
PROXIED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
OPEN_PATHS = frozenset({"/health", "/wol-health", "/", "/favicon.ico"})
HOP_HEADERS = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                         "te", "trailer", "transfer-encoding", "upgrade", "host",
                         "content-length", "server", "date"})
UNLOAD_TIMEOUT = 10.0  # graceful stop for unload and TTL (llama-swap's unloadTimeout default)
WATCH_INTERVAL = 1.0  # the real one polls every 2 s
_MACRO = re.compile(r"\$\{([^}]*)\}")


def log(message: str) -> None:
    print(f"[llama-swap stand-in] {message}", flush=True)


class ConfigError(Exception):
    pass


class LoadError(Exception):
    pass


# --- config -------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    id: str
    cmd: str  # after ${PORT} / ${MODEL_ID} expansion
    proxy: str
    check_endpoint: str
    ttl: int
    aliases: list[str]
    concurrency_limit: int
    name: str = ""
    description: str = ""


@dataclass
class Group:
    swap: bool = True
    exclusive: bool = True
    persistent: bool = False
    members: list[str] = field(default_factory=list)


@dataclass
class Config:
    models: dict[str, ModelConfig]
    groups: dict[str, Group]
    group_of: dict[str, str]
    aliases: dict[str, str]
    health_check_timeout: int
    api_keys: list[str]
    log_upstream: bool


def _int(value: Any, where: str, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} must be an integer, not {value!r}")
    return value


def load_config(path: Path) -> Config:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot load {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError("config must be a mapping")
    health = max(15, _int(raw.get("healthCheckTimeout"), "healthCheckTimeout", 120))
    port = _int(raw.get("startPort"), "startPort", 5800)
    global_ttl = _int(raw.get("globalTTL"), "globalTTL", 0)
    keys = raw.get("apiKeys") or []
    if not isinstance(keys, list) or any(not isinstance(k, str) or not k.strip() or " " in k
                                         for k in keys):
        raise ConfigError("apiKeys must be a list of non-empty strings without spaces")
    models_raw = raw.get("models") or {}
    if not isinstance(models_raw, dict):
        raise ConfigError("models must be a mapping")
    models: dict[str, ModelConfig] = {}
    aliases: dict[str, str] = {}
    for model_id in sorted(str(k) for k in models_raw):  # ${PORT} numbers go in sorted id order
        entry = models_raw[model_id] or {}
        if not isinstance(entry, dict):
            raise ConfigError(f"model {model_id}: must be a mapping")
        cmd = str(entry.get("cmd") or "")
        proxy = str(entry.get("proxy") or "http://localhost:${PORT}")
        check = str(entry.get("checkEndpoint") or "/health")
        if "${PORT}" in cmd:
            cmd, proxy, check = (s.replace("${PORT}", str(port)) for s in (cmd, proxy, check))
            port += 1
        elif "${PORT}" in proxy:
            raise ConfigError(f"model {model_id}: proxy uses ${{PORT}} but cmd does not")
        cmd = cmd.replace("${MODEL_ID}", model_id)
        for text in (cmd, proxy, check):
            unresolved = _MACRO.search(text)
            if unresolved:
                raise ConfigError(f"model {model_id}: unknown macro ${{{unresolved.group(1)}}}")
        ttl = _int(entry.get("ttl"), f"model {model_id}: ttl", global_ttl)
        ttl = max(ttl, 0)  # v250 takes a negative ttl without complaint
        names = [str(a) for a in entry.get("aliases") or []]
        for alias in names:
            if alias in aliases or alias in models_raw:
                raise ConfigError(f"duplicate alias {alias} in model {model_id}")
            aliases[alias] = model_id
        limit = _int(entry.get("concurrencyLimit"), f"model {model_id}: concurrencyLimit", 0)
        models[model_id] = ModelConfig(model_id, cmd, proxy.rstrip("/"), check, ttl, names,
                                       limit or 10, str(entry.get("name") or ""),
                                       str(entry.get("description") or ""))
    groups: dict[str, Group] = {}
    group_of: dict[str, str] = {}
    groups_raw = raw.get("groups") or {}
    if not isinstance(groups_raw, dict):
        raise ConfigError("groups must be a mapping")
    for group_id, spec in groups_raw.items():
        spec = spec or {}
        group = Group(bool(spec.get("swap", True)), bool(spec.get("exclusive", True)),
                      bool(spec.get("persistent", False)),
                      [str(m) for m in spec.get("members") or []])
        for member in group.members:
            if member not in models:
                raise ConfigError(f"group {group_id}: member {member} is not a model")
            if member in group_of:
                raise ConfigError(f"model {member} is in groups {group_of[member]} and "
                                  f"{group_id}")
            group_of[member] = str(group_id)
        groups[str(group_id)] = group
    # Models in no group: one implicit group that swaps and is exclusive (one model at a time).
    default = Group(members=[m for m in models if m not in group_of])
    groups["(default)"] = default
    group_of.update({m: "(default)" for m in default.members})
    return Config(models, groups, group_of, aliases, health, list(keys),
                  raw.get("logToStdout") in ("upstream", "both"))


def split_command(cmd: str) -> list[str]:
    """llama-swap's SanitizeCommand: drop comment lines, join trailing '\\', POSIX-split."""
    lines = []
    for line in cmd.split("\n"):
        stripped = line.strip()
        if stripped.startswith("#"):
            continue
        lines.append(stripped[:-1] + " " if stripped.endswith("\\") else line)
    argv = shlex.split("\n".join(lines))
    if not argv:
        raise LoadError("empty command")
    return argv


# --- model processes ----------------------------------------------------------------------
@dataclass
class Upstream:
    config: ModelConfig
    state: str = "stopped"  # stopped | starting | ready | stopping | shutdown
    proc: subprocess.Popen[bytes] | None = None
    admitted: int = 0  # queued + in flight, against concurrencyLimit
    inflight: int = 0  # being proxied now
    last_use: float = 0.0


def _terminate(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the child's process group, wait, then SIGKILL the group."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _health_ok(url: str) -> bool:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "localhost", parts.port or 80, timeout=2)
    try:
        conn.request("GET", parts.path or "/")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


class Swap:
    """The process manager: residency by groups, start + health check, stop, TTL."""

    def __init__(self, config: Config) -> None:
        self.cv = threading.Condition()
        self.swap_lock = threading.Lock()  # one start/eviction at a time (the scheduler)
        self.config = config
        self.upstreams = {m: Upstream(c) for m, c in config.models.items()}
        self.changes = 0  # bumped on every state change (feeds /api/events)
        self.generation = 0  # bumped on every reload (closes /api/events streams)

    def _set(self, up: Upstream, state: str, proc_done: bool = False) -> None:
        """Change a model's state; the caller holds self.cv."""
        if proc_done:
            up.proc = None
        if up.state != state:
            up.state = state
            self.changes += 1
            self.cv.notify_all()

    def resolve(self, name: str) -> Upstream | None:
        with self.cv:
            return self.upstreams.get(self.config.aliases.get(name, name))

    # Requests ------------------------------------------------------------------------------
    def admit(self, up: Upstream) -> bool:
        with self.cv:
            if up.admitted >= up.config.concurrency_limit:
                return False
            up.admitted += 1
            return True

    def leave(self, up: Upstream) -> None:
        with self.cv:
            up.admitted -= 1

    def acquire(self, up: Upstream) -> None:
        """Return with `up` ready and one request counted in flight, starting it if needed."""
        with self.cv:
            if up.state == "ready":  # fast path: no swap needed
                up.inflight += 1
                return
        with self.swap_lock:
            if self.upstreams.get(up.config.id) is not up:
                raise LoadError("the config was reloaded")
            for victim in self._victims(up):
                self._stop_when_idle(victim)
            self._start(up)
            with self.cv:
                up.inflight += 1

    def release(self, up: Upstream) -> None:
        with self.cv:
            up.inflight -= 1
            up.last_use = time.monotonic()  # TTL counts from the end of the last request
            self.cv.notify_all()

    def _victims(self, up: Upstream) -> list[Upstream]:
        groups, group_of = self.config.groups, self.config.group_of
        mine = groups[group_of[up.config.id]]
        victims = []
        with self.cv:
            for other in self.upstreams.values():
                if other is up or other.state == "stopped":
                    continue
                theirs = groups[group_of[other.config.id]]
                same_group_swaps = theirs is mine and mine.swap
                evicts_other_group = (theirs is not mine and mine.exclusive
                                      and not theirs.persistent)
                if same_group_swaps or evicts_other_group:
                    victims.append(other)
        return victims

    def _stop_when_idle(self, victim: Upstream) -> None:
        """An eviction waits for the victim's requests in flight, then stops it."""
        timeout = self.config.health_check_timeout
        with self.cv:
            self.cv.wait_for(lambda: victim.inflight == 0, timeout=timeout)
        log(f"swapping out {victim.config.id}")
        self.stop(victim, grace=timeout)

    def _start(self, up: Upstream) -> None:
        timeout = self.config.health_check_timeout
        with self.cv:
            self.cv.wait_for(lambda: up.state != "stopping", timeout=timeout)
            if up.state == "ready":
                return
            self._set(up, "starting")
        try:
            argv = split_command(up.config.cmd)
            out = None if self.config.log_upstream else subprocess.DEVNULL
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    start_new_session=True)  # its own process group
        except (OSError, ValueError, LoadError) as exc:
            with self.cv:
                self._set(up, "stopped")
            raise LoadError(f"unable to start process: {exc}") from exc
        log(f"starting {up.config.id} (pid {proc.pid}): {' '.join(argv)}")
        with self.cv:
            up.proc = proc
        deadline = time.monotonic() + timeout
        check = up.config.check_endpoint
        time.sleep(0.25)
        while True:
            if proc.poll() is not None or up.proc is not proc:
                with self.cv:
                    if up.proc is proc:
                        self._set(up, "stopped", proc_done=True)
                raise LoadError("upstream command exited prematurely")
            if check == "none" or _health_ok(up.config.proxy + check):
                with self.cv:
                    up.last_use = time.monotonic()
                    self._set(up, "ready")
                log(f"{up.config.id} is ready")
                return
            if time.monotonic() > deadline:
                self.stop(up, grace=5)
                raise LoadError(f"health check timed out after {timeout}s")
            time.sleep(0.25)

    def stop(self, up: Upstream, grace: float = UNLOAD_TIMEOUT,
             only_if_idle: bool = False) -> bool:
        with self.cv:
            if only_if_idle and (up.inflight or up.state != "ready"):
                return False
            proc = up.proc
            if proc is None:
                self._set(up, "stopped")
                return True
            self._set(up, "stopping")
        _terminate(proc, grace)
        with self.cv:
            if up.proc is proc:
                self._set(up, "stopped", proc_done=True)
        log(f"stopped {up.config.id}")
        return True

    def stop_all(self) -> None:
        with self.cv:
            ups = list(self.upstreams.values())
        threads = [threading.Thread(target=self.stop, args=(up,)) for up in ups if up.proc]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def tick(self) -> None:
        """Once a second: notice children that died, unload models idle past their TTL."""
        now = time.monotonic()
        with self.cv:
            ups = list(self.upstreams.values())
        for up in ups:
            proc = up.proc
            if up.state == "ready" and proc is not None and proc.poll() is not None:
                log(f"upstream process of {up.config.id} exited unexpectedly")
                with self.cv:
                    if up.proc is proc:
                        self._set(up, "stopped", proc_done=True)
            elif (up.state == "ready" and up.config.ttl > 0 and up.inflight == 0
                  and now - up.last_use > up.config.ttl
                  and self.stop(up, only_if_idle=True)):
                log(f"unloaded {up.config.id} after {up.config.ttl}s idle (ttl)")

    def reload(self, config: Config) -> None:
        """A new config: the event streams close first (v250 sends no event for the models a
        reload stops), every running model stops, then the new set starts out stopped."""
        with self.swap_lock:
            with self.cv:
                self.generation += 1
                self.cv.notify_all()
            self.stop_all()
            with self.cv:
                for up in self.upstreams.values():
                    self._set(up, "shutdown")
                self.config = config
                self.upstreams = {m: Upstream(c) for m, c in config.models.items()}
                self.changes += 1
                self.cv.notify_all()

    # Listings ------------------------------------------------------------------------------
    def running(self) -> list[dict[str, Any]]:
        with self.cv:
            return [{"model": up.config.id, "state": up.state, "cmd": up.config.cmd,
                     "proxy": up.config.proxy, "ttl": up.config.ttl, "name": up.config.name,
                     "description": up.config.description}
                    for model_id, up in sorted(self.upstreams.items())
                    if up.state not in ("stopped", "shutdown")]

    def model_status(self) -> list[dict[str, Any]]:
        """The payload of a `modelStatus` event: every configured model and its state."""
        with self.cv:
            return [{"id": model_id, "name": up.config.name,
                     "description": up.config.description, "state": up.state,
                     "unlisted": False, "peerID": "", "aliases": list(up.config.aliases)}
                    for model_id, up in sorted(self.upstreams.items())]

    def listing(self) -> dict[str, Any]:
        now = int(time.time())
        data = []
        with self.cv:
            for model_id, up in sorted(self.upstreams.items()):
                meta: dict[str, Any] = {"type": "model"}
                if up.config.aliases:
                    meta["aliases"] = list(up.config.aliases)
                record = {"id": model_id, "object": "model", "created": now,
                          "owned_by": "llama-swap", "meta": {"llamaswap": meta},
                          "status": {"value": "unloaded" if up.state == "stopped"
                                     else "loaded"}}
                data.append(record)
        return {"object": "list", "data": data}


# --- HTTP ---------------------------------------------------------------------------------
class Server(ThreadingHTTPServer):
    daemon_threads = True
    swap: Swap

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client hung up: not news
            super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # Pollers (status, the unloader) GET every second; log what changes things.
        if self.command != "GET" or (isinstance(code, int) and code >= 400):
            super().log_request(code, size)

    def log_message(self, format: str, *args: Any) -> None:
        log(f"{self.address_string()} {format % args}")

    # Replies -------------------------------------------------------------------------------
    def _reply(self, status: int, body: bytes, content_type: str,
               extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data: Any, extra: dict[str, str] | None = None) -> None:
        self._reply(status, json.dumps(data).encode(), "application/json", extra)

    def _error(self, status: int, message: str, extra: dict[str, str] | None = None) -> None:
        self._json(status, {"src": "llama-swap", "error": message}, extra)

    def _text(self, status: int, text: str) -> None:
        self._reply(status, text.encode(), "text/plain; charset=utf-8")

    def _chunk(self, data: bytes) -> None:
        """One piece of a chunked body (as Go's server streams; b"" ends the body)."""
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _authorized(self, path: str) -> bool:
        keys = self.server.swap.config.api_keys
        if not keys or path in OPEN_PATHS:
            return True
        auth = self.headers.get("Authorization", "")
        bearer = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        return bearer in keys or self.headers.get("x-api-key") in keys

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    # Routes --------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def _route(self, method: str) -> None:
        path = urlsplit(self.path).path
        swap = self.server.swap
        body = self._body() if method == "POST" else b""
        if not self._authorized(path):
            self._error(401, "unauthorized: invalid or missing API key")
        elif method == "GET" and path in ("/health", "/wol-health"):
            self._text(200, "OK")
        elif method == "GET" and path in ("/v1/models", "/models"):
            self._json(200, swap.listing())
        elif method == "GET" and path == "/running":
            self._json(200, {"running": swap.running()})
        elif method == "GET" and path == "/api/events":
            self._events()
        elif method == "GET" and path == "/api/version":
            self._json(200, {"version": VERSION, "commit": "standin", "build_date": "unknown"})
        elif method == "GET" and path == "/unload":  # every model; any ?model= is ignored
            swap.stop_all()
            self._text(200, "OK")
        elif path == "/unload":
            self._reply(405, b"Method Not Allowed\n", "text/plain", {"Allow": "GET, HEAD"})
        elif method == "POST" and path == "/api/models/unload":
            swap.stop_all()
            self._json(200, {"msg": "ok"})
        elif method == "POST" and path.startswith("/api/models/unload/"):
            up = swap.resolve(unquote(path[len("/api/models/unload/"):]).lstrip("/"))
            if up is None:
                self._text(404, "model not found")
            else:
                swap.stop(up)
                self._text(200, "OK")
        elif method == "POST" and path in PROXIED_PATHS:
            self._proxy(body)
        else:
            self._error(404, f"no route for {method} {path}")

    def _events(self) -> None:
        """Server-sent events: a `modelStatus` frame on connect and on every state change;
        the stream closes on a config reload (clients reconnect)."""
        swap = self.server.swap
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        with swap.cv:
            generation, seen = swap.generation, -1
        try:
            while True:
                with swap.cv:
                    swap.cv.wait_for(lambda last=seen: swap.changes != last
                                     or swap.generation != generation, timeout=5)
                    if swap.generation != generation:
                        self._chunk(b"")
                        return
                    changed, seen = swap.changes != seen, swap.changes
                if changed:
                    data = json.dumps(swap.model_status())
                    envelope = json.dumps({"type": "modelStatus", "data": data})
                    self._chunk(f"event:message\ndata:{envelope}\n\n".encode())
        except OSError:
            self.close_connection = True  # the client went away

    def _proxy(self, body: bytes) -> None:
        swap = self.server.swap
        try:
            model = json.loads(body or b"{}").get("model")
        except (ValueError, AttributeError):
            self._error(400, "invalid JSON body")
            return
        up = swap.resolve(str(model)) if model else None
        if up is None:
            self._error(404, f"could not find a model named {model!r}")
            return
        if not swap.admit(up):
            self._error(429, "too many requests", {"Retry-After": "1"})
            return
        try:
            try:
                swap.acquire(up)
            except LoadError as exc:
                self._error(500, f"unspecific error: {exc}")
                return
            try:
                self._forward(up, body)
            finally:
                swap.release(up)
        finally:
            swap.leave(up)

    def _forward(self, up: Upstream, body: bytes) -> None:
        target = urlsplit(up.config.proxy)
        conn = http.client.HTTPConnection(target.hostname or "localhost", target.port or 80,
                                          timeout=600)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
        headers["Content-Length"] = str(len(body))
        try:
            conn.request(self.command, target.path + self.path, body=body, headers=headers)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            self._error(502, f"upstream error: {exc}")
            return
        try:
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in HOP_HEADERS:
                    self.send_header(key, value)
            length = response.getheader("Content-Length")
            if length is not None:
                self.send_header("Content-Length", length)
            else:
                self.send_header("Transfer-Encoding", "chunked")
            if "text/event-stream" in (response.getheader("Content-Type") or ""):
                self.send_header("X-Accel-Buffering", "no")
            self.end_headers()
            while chunk := response.read1(65536):
                if length is None:
                    self._chunk(chunk)
                else:
                    self.wfile.write(chunk)
            if length is None:
                self._chunk(b"")
        except (OSError, http.client.HTTPException):
            self.close_connection = True  # the client went away, or the upstream died
        finally:
            conn.close()


# --- main ---------------------------------------------------------------------------------
def parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llama-swap", description=__doc__.splitlines()[0])
    parser.add_argument("-config", "--config")
    parser.add_argument("-listen", "--listen", default=":8080")
    parser.add_argument("-watch-config", "--watch-config", action="store_true")
    parser.add_argument("-version", "--version", action="store_true")
    args = parser.parse_args(argv)
    if args.version:
        print(VERSION_LINE)
        return 0
    if not args.config:
        print("error: -config or -config-dir is required", file=sys.stderr)
        return 1
    config_path = Path(args.config)
    try:
        swap = Swap(load_config(config_path))
    except ConfigError as exc:
        print(f"error loading config: {exc}", file=sys.stderr)
        return 1
    host, port = parse_listen(args.listen)

    class BoundServer(Server):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    try:
        server = BoundServer((host, port), Handler)
    except OSError as exc:
        print(f"error: cannot listen on {args.listen}: {exc}", file=sys.stderr)
        return 1
    server.swap = swap

    stop, hup = threading.Event(), threading.Event()
    # Signal handlers only record; the loop below acts.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: hup.set())
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    log(f"listening on {args.listen} ({VERSION_LINE})")

    def stamp() -> tuple[int, int] | None:
        try:
            st = config_path.stat()
            return st.st_mtime_ns, st.st_size
        except OSError:
            return None

    seen, next_watch, next_tick = stamp(), 0.0, 0.0
    while not stop.wait(0.1):
        now = time.monotonic()
        if now >= next_tick:
            next_tick = now + 1.0
            threading.Thread(target=swap.tick, daemon=True).start()
        changed = False
        if args.watch_config and now >= next_watch:
            next_watch = now + WATCH_INTERVAL
            current = stamp()
            changed, seen = current != seen, current
        if changed or hup.is_set():
            hup.clear()
            try:
                new_config = load_config(config_path)
            except ConfigError as exc:
                log(f"config reload failed, keeping the old config: {exc}")
                continue
            log("config changed: stopping all models and reloading")
            swap.reload(new_config)
    log("shutting down: stopping every model")
    server.shutdown()
    swap.stop_all()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
