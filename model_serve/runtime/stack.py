"""Start, stop and inspect the stack from the outside (what `model start/stop/status` call)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from model_serve import internal_key
from model_serve.config.settings import Settings
from model_serve.engines import select_engine
from model_serve.engines.base import answers_health
from model_serve.errors import EngineError, ModelServeError
from model_serve.fileio import try_lock
from model_serve.runtime import procs
from model_serve.runtime.state import ChildState, Phase, read_state

START_TIMEOUT = 120.0


@dataclass
class StackStatus:
    running: bool
    port: int
    engine: str
    engine_version: str = ""
    pid: int | None = None
    started_at: float | None = None
    healthy: bool = False
    children: dict[str, ChildState] = field(default_factory=dict)
    config_path: str = ""
    log_file: str = ""
    stale: bool = False  # a state file whose supervisor is gone (crash or SIGKILL)
    served_models: int | None = None  # how many models the config serves, when known
    via_service: str = ""  # the login service it was started through, if any
    front: bool = True  # FRONT=on: the port has the dashboard (/dashboard)
    peers: list[dict[str, Any]] | None = None  # PEERS as the front sees them; None: unknown

    @property
    def dashboard(self) -> str | None:
        return f"http://127.0.0.1:{self.port}/dashboard" if self.front else None

    @property
    def uptime(self) -> float:
        return time.time() - self.started_at if self.started_at else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"running": self.running, "healthy": self.healthy, "pid": self.pid,
                "port": self.port, "engine": self.engine, "engine_version": self.engine_version,
                "started_at": self.started_at,
                "uptime_seconds": round(self.uptime, 1),
                "children": {name: child.to_json() for name, child in self.children.items()},
                "config_path": self.config_path, "log_file": self.log_file, "stale": self.stale,
                "dashboard": self.dashboard, "peers": self.peers}


def stack_status(settings: Settings) -> StackStatus:
    state = read_state(settings.pid_file)
    if state is None:
        engine = select_engine(settings)
        return StackStatus(False, settings.port, engine.name, config_path=str(engine.config_path),
                           log_file=str(settings.log_file), front=settings.front_enabled)
    ref = state.pid
    alive = ref is not None and ref.alive()
    status = StackStatus(
        running=alive, port=state.port or settings.port, engine=state.engine,
        engine_version=state.engine_version,
        pid=ref.pid if ref else None, started_at=state.started_at,
        children=state.children, config_path=state.config_path,
        log_file=state.log_file or str(settings.log_file), stale=not alive,
        front=settings.front_enabled,
    )
    # The state names the engine: its module need not load to ask /health.
    # Through the front's own socket where it has one: a port full of clients (MAX_CONNECTIONS)
    # is no sign of an unhealthy stack.
    status.healthy = alive and answers_health(settings.base_url, settings.api_keys, timeout=1,
                                              unix_socket=internal_key.front_socket(settings))
    if status.healthy and settings.peers:
        status.peers = front_peers(settings)
    return status


def front_peers(settings: Settings) -> list[dict[str, Any]] | None:
    """The front's view of its PEERS (up or down with the reason, models); None when it does
    not answer. Not asked of the peers here: what the front serves is what counts."""
    from model_serve.loopback import LoopbackError, call

    try:
        answer = call("GET", f"{settings.base_url}/api/model_serve/peers",
                      internal_key.own_headers(settings), timeout=2,
                      unix_socket=internal_key.front_socket(settings))
        peers = answer.json().get("peers") if answer.status_code == 200 else None
    except (LoopbackError, ValueError, AttributeError):
        return None
    return [p for p in peers if isinstance(p, dict)] if isinstance(peers, list) else None


def cleanup_stale(settings: Settings) -> int:
    """After a crash: end the engine and model servers the dead supervisor recorded."""
    state = read_state(settings.pid_file)
    if state is None:
        return 0
    live = [ref for ref in state.owned() if ref.alive()]
    if live:
        procs.stop_processes(live, timeout=10)
    settings.pid_file.unlink(missing_ok=True)
    return len(live)


@contextlib.contextmanager
def supervisor_lock(settings: Settings) -> Iterator[None]:
    """The lock a running supervisor holds; raises when another one holds it."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    lock_path = settings.state_dir / "supervisor.lock"
    with open(lock_path, "w") as lock:
        if not try_lock(lock):
            raise EngineError(f"another supervisor holds {lock_path}",
                              "run 'model status'; stop it with 'model stop'")
        yield


def check_can_start(settings: Settings, holding_lock: bool = False) -> None:
    """Everything that would make a start fail half-way, checked before anything starts."""
    status = stack_status(settings)
    if status.running:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status.started_at or 0))
        raise AlreadyRunning(f"model_serve is already running (pid {status.pid}, port "
                             f"{status.port}, since {since})", "stop it first with 'model stop'")
    if status.stale:
        # Only under the supervisor lock: a supervisor starting meanwhile is never cut down.
        if holding_lock:
            cleanup_stale(settings)
        else:
            with supervisor_lock(settings):
                cleanup_stale(settings)
    if procs.port_in_use(settings.host, settings.port):
        owner = procs.who_listens(settings.port)
        raise EngineError(f"port {settings.port} is already in use by {owner}",
                          "stop that program or set LLAMA_SWAP_PORT in .env to a free port")
    if settings.front_enabled and procs.port_in_use(settings.engine_host, settings.engine_port):
        owner = procs.who_listens(settings.engine_port)
        raise EngineError(f"port {settings.engine_port}, where the engine listens behind the "
                          f"front, is already in use by {owner}",
                          "stop that program or set ENGINE_PORT in .env to a free port")
    from model_serve.models.catalog import ensure_models_dir

    ensure_models_dir(settings)
    select_engine(settings).binary()  # raises with install advice when missing
    # Before anything runs: a llama-server that crashes on this CPU fails here, with the cause.
    from model_serve.engines.engine_check import ensure_engine_computes
    from model_serve.engines.llama_server import resolve_llama_server

    ensure_engine_computes(settings, resolve_llama_server(settings.llama_server_bin))


class AlreadyRunning(ModelServeError):
    exit_code = 0  # not a failure: the stack the user wants is up


def tail(path: os.PathLike[str] | str, lines: int = 20) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 16384))
            return "\n".join(handle.read().decode("utf-8", "replace").splitlines()[-lines:])
    except OSError:
        return ""


def follow(path: os.PathLike[str] | str, interval: float = 0.3) -> Iterator[str]:
    """New lines of the file at `path`, by name like `tail -F`: when the log is rotated (renamed
    and made anew) or truncated, the new file is read from its start."""
    handle = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115 - reopened below
    try:
        handle.seek(0, os.SEEK_END)
        while True:
            line = handle.readline()
            if line:
                yield line
                continue
            try:
                now = os.stat(path)
            except FileNotFoundError:  # between the rename and the new file
                time.sleep(interval)
                continue
            if now.st_ino != os.fstat(handle.fileno()).st_ino or now.st_size < handle.tell():
                yield from iter(handle.readline, "")  # what the old file got at the last moment
                handle.close()
                handle = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
                continue
            time.sleep(interval)
    finally:
        handle.close()


def start_background(settings: Settings, timeout: float = START_TIMEOUT) -> StackStatus:
    """Run `model serve` detached; return once the engine answers, or raise with the log tail."""
    from model_serve.runtime.sync import run_sync

    check_can_start(settings)
    # A bad custom_models.yaml or .env is reported here, before anything runs.
    served = len(run_sync(settings, reload=False).plan)
    settings.log_file.parent.mkdir(parents=True, exist_ok=True)
    import subprocess

    console = settings.log_file.parent / "serve-console.log"
    via = _start_through_service(settings)
    process: subprocess.Popen[bytes] | None = None
    if via is None:
        with open(console, "ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "model_serve", "serve"], stdin=subprocess.DEVNULL,
                stdout=out, stderr=out, start_new_session=True, close_fds=True,
            )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = process.poll() if process is not None else None
        if code is not None:
            raise EngineError(f"the stack stopped while starting (exit code {code}):\n"
                              + (tail(settings.log_file) or tail(console)),
                              "fix the problem above, then 'model start' again")
        status = stack_status(settings)
        engine = status.children.get("engine") or ChildState()
        ready = all(status.children.get(name, ChildState()).phase == Phase.RUNNING
                    for name in (["engine", "front"] if settings.front_enabled else ["engine"]))
        if status.running and status.healthy and ready:
            status.served_models = served
            status.via_service = via or ""
            return status
        if engine.phase == Phase.FAILED:
            stop_stack(settings)
            raise EngineError(f"the engine failed to start: {engine.last_error or '?'}\n"
                              + tail(settings.log_file),
                              "fix the problem above (the log's last lines), then 'model start' "
                              "again")
        time.sleep(0.2)
    engine = stack_status(settings).children.get("engine") or ChildState()
    stop_stack(settings)
    last = engine.last_error
    raise EngineError(f"the engine did not come up within {timeout:.0f}s"
                      + (f" (state {engine.phase}, last error: {last})" if last else "")
                      + ":\n" + tail(settings.log_file), "see 'model logs' for the full log")


def _start_through_service(settings: Settings) -> str | None:
    """With the login service installed, start the stack through its manager, so that it runs
    supervised (restarted after a crash) and no second copy fights it for the port. Returns
    the service's file, or None to start the stack directly."""
    import logging
    import subprocess

    from model_serve.service import files as service_files

    log = logging.getLogger(__name__)
    found = service_files.installed_service(settings.port)
    if found is None:
        return None
    kind, path = found
    argv = service_files.service_start_argv(kind, settings.port)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("the login service %s could not be started (%s); starting directly", path,
                    exc)
        return None
    if done.returncode != 0:
        log.warning("'%s' failed (%s); starting directly", " ".join(argv),
                    (done.stderr or done.stdout).strip()[:200])
        return None
    return str(path)


@dataclass
class StopReport:
    was_running: bool
    stopped: int = 0
    killed: int = 0
    orphans: int = 0


def stop_stack(settings: Settings, timeout: float | None = None) -> StopReport:
    """Stop the supervisor, the engine and every model server they started; the supervisor
    gets 30 s, plus the time it may spend saving conversations first."""
    if timeout is None:
        timeout = 30.0 + settings.kv_cache_stop_save_seconds
    state = read_state(settings.pid_file)
    if state is None:
        return StopReport(False)
    refs = state.owned()
    supervisor = state.pid
    report = StopReport(was_running=supervisor is not None and supervisor.alive())
    if report.was_running and supervisor is not None:
        # The supervisor stops its own children in order; give it the time to do so.
        report.stopped, report.killed = procs.stop_processes([supervisor], timeout=timeout)
    # Whatever survived (a SIGKILLed supervisor or engine leaves its children behind).
    leftovers = [ref for ref in refs if ref.alive()]
    if leftovers:
        _stopped, killed = procs.stop_processes(leftovers, timeout=10)
        report.orphans = len(leftovers)
        report.killed += killed
    _forget_state(settings)
    return report


def _forget_state(settings: Settings) -> None:
    """Delete the state file of the stack just stopped, unless a supervisor runs again by now:
    systemd restarts a failed one within seconds, and that one's state must stay (without it
    the stack runs unseen: `model status` says stopped, `model start` finds the port taken).
    A running supervisor holds the lock for its whole life; holding it here, no new one can
    start before the file is gone."""
    try:
        with supervisor_lock(settings):
            settings.pid_file.unlink(missing_ok=True)
    except EngineError:
        pass  # another supervisor runs: the file is its own
