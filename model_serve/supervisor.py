"""The supervisor behind `model serve`: runs the engine and the sync loop, restarts what dies,
and on stop leaves no llama-server behind.

Signal handlers only record what was asked; the main loop acts on it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from model_serve import procs
from model_serve.engines import Engine, select_engine
from model_serve.errors import EngineError, ModelServeError
from model_serve.fileio import write_if_changed
from model_serve.settings import Settings

log = logging.getLogger("model_serve")

HEALTH_DEADLINE = 60.0  # seconds for the engine to answer /health after a start
BACKOFF_START, BACKOFF_MAX = 1.0, 60.0
GIVE_UP_AFTER = 5  # consecutive failed starts before the engine is marked failed
STABLE_AFTER = 30.0  # a run this long resets the failure count
STOP_TIMEOUT = 15.0


@dataclass
class ChildState:
    state: str = "stopped"  # starting | running | backoff | failed | stopped
    restarts: int = 0
    since: float = 0.0
    last_error: str = ""
    pid: procs.ProcRef | None = None

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "restarts": self.restarts, "since": self.since,
                "last_error": self.last_error,
                "pid": self.pid.to_json() if self.pid else None}


@dataclass
class Supervisor:
    settings: Settings
    engine: Engine = field(init=False)
    children: dict[str, ChildState] = field(default_factory=dict)
    model_procs: list[procs.ProcRef] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.engine = select_engine(self.settings)
        self.children = {"engine": ChildState(), "sync": ChildState()}
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._process: subprocess.Popen[bytes] | None = None
        self._state_lock = threading.Lock()

    # --- state file ---------------------------------------------------------------------
    def write_state(self) -> None:
        me = procs.ProcRef.of(os.getpid())
        data = {
            "pid": me.to_json() if me else None,
            "port": self.settings.port,
            "host": self.settings.host,
            "engine": self.engine.name,
            "started_at": self.started_at,
            "log_file": str(self.settings.log_file),
            "config_path": str(self.engine.config_path),
            "children": {name: child.to_json() for name, child in self.children.items()},
            "model_procs": [ref.to_json() for ref in self.model_procs],
        }
        with self._state_lock:
            write_if_changed(self.settings.pid_file, json.dumps(data, indent=1))

    def _set(self, name: str, state: str, error: str = "") -> None:
        child = self.children[name]
        if child.state != state:
            log.info("%s: %s -> %s%s", name, child.state, state, f" ({error})" if error else "")
            child.state, child.since = state, time.time()
        if error:
            child.last_error = error
        self.write_state()

    # --- engine -------------------------------------------------------------------------
    def _pump_output(self, stream: IO[bytes]) -> None:
        engine_log = logging.getLogger("model_serve.engine")
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip()
            if line:
                engine_log.info("%s", line)

    def start_engine(self) -> bool:
        """Start the engine and wait for /health; False (with the reason logged) on failure."""
        self._reap_model_procs()
        if procs.port_in_use(self.settings.host, self.settings.port):
            self._set("engine", "backoff", f"port {self.settings.port} is in use")
            return False
        self._set("engine", "starting")
        try:
            argv = self.engine.command()
        except ModelServeError as exc:
            self._set("engine", "backoff", exc.message)
            return False
        log.info("starting engine: %s", " ".join(argv))
        self._process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop = signal the group
        )
        assert self._process.stdout is not None
        threading.Thread(target=self._pump_output, args=(self._process.stdout,),
                         daemon=True).start()
        self.children["engine"].pid = procs.ProcRef.of(self._process.pid)
        deadline = time.monotonic() + HEALTH_DEADLINE
        while time.monotonic() < deadline and not self._stop.is_set():
            if self._process.poll() is not None:
                self._set("engine", "backoff", f"exited with code {self._process.returncode} "
                          "while starting (see the log)")
                return False
            if self.engine.healthy(timeout=1):
                self._set("engine", "running")
                return True
            time.sleep(0.2)
        if not self._stop.is_set():
            self._set("engine", "backoff", f"no answer on /health within {HEALTH_DEADLINE:.0f}s")
        self.stop_engine()
        return False

    def stop_engine(self) -> None:
        refs = [ref for ref in [self.children["engine"].pid] if ref]
        refs += self._current_model_procs()
        if refs:
            stopped, killed = procs.stop_processes(refs, timeout=STOP_TIMEOUT)
            log.info("stopped engine and models: %d exited, %d killed", stopped, killed)
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=1)
        self._process = None
        self.children["engine"].pid = None
        self._reap_model_procs()

    def _current_model_procs(self) -> list[procs.ProcRef]:
        engine_ref = self.children["engine"].pid
        live = procs.descendants(engine_ref) if engine_ref else []
        known = {ref.pid for ref in live}
        return live + [ref for ref in self.model_procs if ref.pid not in known and ref.alive()]

    def _reap_model_procs(self) -> None:
        """Model servers left by a dead engine hold memory and ports: end them."""
        leftovers = [ref for ref in self.model_procs if ref.alive()]
        engine_ref = self.children["engine"].pid
        if engine_ref and engine_ref.alive():
            current = {ref.pid for ref in procs.descendants(engine_ref)}
            leftovers = [ref for ref in leftovers if ref.pid not in current]
        if leftovers:
            log.warning("ending %d model process(es) left by a dead engine: %s",
                        len(leftovers), ", ".join(str(ref.pid) for ref in leftovers))
            procs.stop_processes(leftovers, timeout=5)
        self.model_procs = [ref for ref in self.model_procs if ref.alive()]

    def _track_model_procs(self) -> None:
        engine_ref = self.children["engine"].pid
        if engine_ref is None:
            return
        current = procs.descendants(engine_ref)
        if {r.pid for r in current} != {r.pid for r in self.model_procs}:
            self.model_procs = current
            self.write_state()

    # --- sync loop ----------------------------------------------------------------------
    def sync_once(self, reason: str) -> None:
        from model_serve.sync import run_sync

        try:
            result = run_sync(self.settings, engine=self.engine,
                              reload=self.children["engine"].state == "running")
        except ModelServeError as exc:
            self.children["sync"].restarts += 1
            self._set("sync", "backoff", exc.message)
            log.warning("sync (%s) failed; the last good config stays: %s", reason, exc)
            return
        self._set("sync", "running", result.bridge.error)
        log.info("sync (%s): %d models, config %s%s", reason, len(result.plan),
                 "changed" if result.config_changed else "unchanged",
                 ", engine reloaded" if result.reloaded else "")

    def _sync_loop(self) -> None:
        interval = self.settings.bridge_sync_interval
        while not self._stop.wait(interval):
            self.sync_once("interval")

    # --- main loop ----------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGHUP:
            self._reload.set()
        else:
            self._stop.set()

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        log.info("supervisor %d starting: engine %s on %s, state in %s", os.getpid(),
                 self.engine.name, self.settings.base_url, self.settings.state_dir)
        self.sync_once("start")
        if not self.engine.config_path.exists():
            log.error("no engine config could be written; see the sync error above")
            self._set("engine", "failed", "no engine config (sync failed)")
            self.settings.pid_file.unlink(missing_ok=True)
            return 1
        if self.settings.bridge_sync_interval > 0:
            threading.Thread(target=self._sync_loop, name="sync", daemon=True).start()
        self._supervise_engine()
        log.info("supervisor stopping")
        self._set("sync", "stopped")
        self.stop_engine()
        self._set("engine", "stopped")
        self.settings.pid_file.unlink(missing_ok=True)
        log.info("supervisor stopped")
        return 0

    def _supervise_engine(self) -> None:
        failures, backoff = 0, BACKOFF_START
        engine = self.children["engine"]
        while not self._stop.is_set():
            if self._reload.is_set():
                self._reload.clear()
                log.info("SIGHUP: syncing now")
                self.sync_once("SIGHUP")
                if engine.state == "failed":
                    failures, backoff = 0, BACKOFF_START
                    self._set("engine", "backoff", "restart asked by SIGHUP")
            if engine.state == "failed":
                self._stop.wait(1)
                continue
            if not self.start_engine():
                failures += 1
                if failures >= GIVE_UP_AFTER:
                    self._set("engine", "failed", f"{failures} failed starts in a row; "
                              f"last: {engine.last_error}")
                    continue
                engine.restarts += 1
                self._stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            started = time.monotonic()
            while not self._stop.is_set() and self._process and self._process.poll() is None:
                self._track_model_procs()
                if self._reload.is_set():
                    break
                self._stop.wait(0.5)
            if self._stop.is_set() or self._reload.is_set():
                continue
            code = self._process.returncode if self._process else None
            log.error("engine exited unexpectedly (code %s); restarting", code)
            self.stop_engine()
            engine.restarts += 1
            if time.monotonic() - started > STABLE_AFTER:
                failures, backoff = 0, BACKOFF_START
            self._set("engine", "backoff", f"exited with code {code}")


def setup_logging(settings: Settings, to_stderr: bool) -> None:
    settings.log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(
        settings.log_file, maxBytes=settings.log_max_bytes, backupCount=3, encoding="utf-8")
    fmt = logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")
    handler.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    if to_stderr:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(fmt)
        root.addHandler(stream)
    root.setLevel(logging.INFO)
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def serve(settings: Settings, to_stderr: bool) -> int:
    """Run the stack in the foreground until SIGTERM/SIGINT (what launchd/systemd run)."""
    from model_serve import stack

    stack.check_can_start(settings)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    lock_path = settings.state_dir / "supervisor.lock"
    with open(lock_path, "w") as lock:
        import fcntl

        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise EngineError(f"another supervisor holds {lock_path}",
                              "run 'model status'; stop it with 'model stop'") from None
        setup_logging(settings, to_stderr)
        return Supervisor(settings).run()


def read_state(settings: Settings) -> dict[str, Any] | None:
    try:
        return json.loads(Path(settings.pid_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
