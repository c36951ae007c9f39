"""The supervisor behind `model serve`: runs the engine, the pressure unloader and the sync
loop, restarts what dies (with growing backoff, giving up after repeated failures), and on
stop leaves no llama-server behind.

Signal handlers only record what was asked; the main loop acts on it.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from model_serve import internal_key, machine
from model_serve.config.settings import Settings
from model_serve.engines import Engine, select_engine
from model_serve.engines.base import answers_health
from model_serve.errors import EngineError, ModelServeError
from model_serve.fileio import write_if_changed
from model_serve.runtime import procs
from model_serve.runtime.orphan_guard import guard_argv
from model_serve.runtime.state import ChildState, Phase, SupervisorState, write_state
from model_serve.service.files import STOP_TIMEOUT as SERVICE_STOP_TIMEOUT

log = logging.getLogger("model_serve")

HEALTH_DEADLINE = 60.0  # seconds for the engine to answer /health after a start
BACKOFF_START, BACKOFF_MAX = 1.0, 60.0
GIVE_UP_AFTER = 5  # consecutive failed starts before a child is marked failed
STABLE_AFTER = 30.0  # a run this long resets the failure count
STOP_TIMEOUT = 15.0
STOP_MARGIN = 5.0  # seconds of a service manager's stop timeout left unspent
SYNC_RETRY_START = 5.0  # seconds before the first retry of a failed background sync
LINE_LIMIT = 8192  # bytes of one output line of a child that go to the log
_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING,
           "ERROR": logging.ERROR}


@dataclass
class Child:
    """One supervised process: how to start it and how to tell it is ready."""

    name: str
    argv: Callable[[], list[str]]
    ready: Callable[[], bool] | None = None  # None: ready as soon as it runs
    status: ChildState = field(default_factory=ChildState)
    process: subprocess.Popen[bytes] | None = None
    failures: int = 0
    backoff: float = BACKOFF_START
    next_start: float = 0.0  # monotonic time of the next start attempt
    started: float = 0.0
    deadline: float = 0.0


def capped_lines(stream: IO[bytes], limit: int = LINE_LIMIT) -> Iterator[str]:
    """The lines of a child's output, each cut to `limit` bytes: a model server can print a
    whole prompt, or megabytes without a newline, and neither the log nor our memory takes
    that. A cut line says how much was left out."""
    for raw in iter(lambda: stream.readline(limit), b""):
        line = raw.decode("utf-8", errors="replace").rstrip()
        if raw.endswith(b"\n") or len(raw) < limit:
            yield line
            continue
        left_out = 0
        for rest in iter(lambda: stream.readline(limit), b""):  # up to the end of the line
            left_out += len(rest.rstrip(b"\r\n"))
            if rest.endswith(b"\n"):
                break
        yield f"{line} [... {left_out} more bytes of this line not logged]" if left_out \
            else line


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine: Engine = select_engine(settings)
        self.started_at = time.time()
        self.engine_version = ""
        self.model_procs: list[procs.ProcRef] = []
        self.engine_child = Child("engine", self.engine.command,
                                  lambda: self.engine.healthy(timeout=0.5))
        self.unloader_child = Child(
            "unloader", lambda: [sys.executable, "-m", "model_serve.runtime.unloader"])
        self.children = [self.engine_child, self.unloader_child]
        if settings.front_enabled:
            self.front_child = Child(
                "front", lambda: [sys.executable, "-m", "model_serve.runtime.front"],
                lambda: answers_health(settings.base_url, settings.api_keys, timeout=0.5,
                                       unix_socket=internal_key.front_socket(settings)))
            self.children.insert(1, self.front_child)
        self.sync_status = ChildState()
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._sync_now = threading.Event()  # SIGHUP asks the sync thread for a sync
        self._state_lock = threading.Lock()
        self._last_track = 0.0
        from model_serve.runtime.model_exits import ExitWatcher

        self.exit_watcher = ExitWatcher(settings, self.write_state)

    # --- state file ---------------------------------------------------------------------
    def write_state(self) -> None:
        # Snapshot and write under one lock, so an older snapshot never overwrites a newer.
        with self._state_lock:
            self._write_state_locked()

    def _write_state_locked(self) -> None:
        children = {child.name: child.status for child in self.children}
        children["sync"] = self.sync_status
        state = SupervisorState(
            pid=procs.ProcRef.of(os.getpid()), port=self.settings.port,
            host=self.settings.host, engine=self.engine.name,
            engine_version=self.engine_version, started_at=self.started_at,
            log_file=str(self.settings.log_file), config_path=str(self.engine.config_path),
            children=children, model_procs=[*self.model_procs, *self._probe_refs()])
        write_state(self.settings.pid_file, state)

    def _probe_refs(self) -> list[procs.ProcRef]:
        """The crash-diagnosis probes running: in the state, so that a stop (after our crash
        too) ends them."""
        refs = (procs.ProcRef.of(pid) for pid in self.exit_watcher.probe_pids())
        return [ref for ref in refs if ref is not None]

    def _set(self, name: str, status: ChildState, phase: Phase, error: str = "") -> None:
        before = status.phase
        if status.move(phase, time.time()):
            log.info("%s: %s -> %s%s", name, before, phase, f" ({error})" if error else "")
        if error:
            status.last_error = error
        self.write_state()

    # --- children -----------------------------------------------------------------------
    def _pump_output(self, name: str, stream: IO[bytes]) -> None:
        child_log = logging.getLogger(f"model_serve.{name}")
        for line in capped_lines(stream):
            if not line:
                continue
            # Our own children print "LEVEL message"; keep their level.
            word, _, rest = line.partition(" ")
            level = _LEVELS.get(word)
            child_log.log(level or logging.INFO, "%s", rest if level else line)
            if name == "engine":
                self.exit_watcher.feed(line)

    def _launch(self, child: Child) -> None:
        if child is self.engine_child:
            self._reap_model_procs()
            if procs.port_in_use(self.settings.engine_host, self.settings.engine_port):
                self._failed_start(child, f"port {self.settings.engine_port} is in use")
                return
        try:
            argv = child.argv()
        except ModelServeError as exc:
            self._failed_start(child, exc.message)
            return
        program = shutil.which(argv[0])
        if program is None or not os.access(program, os.X_OK):
            # e.g. `brew upgrade` moved it: retried with backoff, shown by `model status`
            self._failed_start(child, f"{argv[0]} is missing or not executable")
            return
        log.info("starting %s: %s", child.name, " ".join(argv))
        env = None
        if child is self.engine_child:
            env = {**os.environ, **self.engine.environment()}  # model servers inherit it
            if self.settings.kv_cache_enabled:
                from model_serve.engines.slot_cache import SERVER_ENV

                env.update(SERVER_ENV)
        try:
            child.process = subprocess.Popen(
                guard_argv(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, env=env,
                start_new_session=True,  # its own process group: stop = signal the group
                # What they write (llama-server's saved conversations among it; model servers
                # inherit it) is the user's alone, whatever the umask we were started with.
                umask=0o077,
            )
        except OSError as exc:
            self._failed_start(child, f"could not run {argv[0]}: {exc.strerror or exc}")
            return
        assert child.process.stdout is not None
        threading.Thread(target=self._pump_output, args=(child.name, child.process.stdout),
                         daemon=True).start()
        child.status.pid = procs.ProcRef.of(child.process.pid)
        child.started = time.monotonic()
        child.deadline = child.started + HEALTH_DEADLINE
        self._set(child.name, child.status, Phase.STARTING)

    # --- the last config the engine ran with ----------------------------------------------
    @property
    def _last_good_path(self) -> Path:
        return self.settings.state_dir / f"last-good-{self.engine.config_path.name}"

    def _keep_last_good(self) -> None:
        try:
            write_if_changed(self._last_good_path,
                             self.engine.config_path.read_text(encoding="utf-8"), mode=0o600)
        except OSError as exc:
            log.warning("could not keep a copy of the working config: %s", exc)

    def _put_back_last_good(self) -> bool:
        """After the engine refused to start on a new config: the one it last ran with."""
        try:
            good = self._last_good_path.read_text(encoding="utf-8")
            if self.engine.config_path.read_text(encoding="utf-8") == good:
                return False
            write_if_changed(self.engine.config_path, good, mode=0o600)
        except OSError:
            return False
        message = (f"the engine does not start with the new {self.engine.config_path.name}: "
                   "the last good one was put back; fix custom_models.yaml or .env (see "
                   "'model logs'), then 'model sync'")
        log.error("%s", message)
        self._set("sync", self.sync_status, Phase.BACKOFF, message)
        return True

    def _failed_start(self, child: Child, reason: str) -> None:
        if child is self.engine_child and child.failures >= 1 and self._put_back_last_good():
            child.failures, child.backoff = 0, BACKOFF_START
            child.next_start = time.monotonic()
            return
        child.failures += 1
        if child.failures >= GIVE_UP_AFTER:
            self._set(child.name, child.status, Phase.FAILED,
                      f"{child.failures} failed starts in a row; last: {reason}")
            return
        child.status.restarts += 1
        child.next_start = time.monotonic() + child.backoff
        child.backoff = min(child.backoff * 2, BACKOFF_MAX)
        self._set(child.name, child.status, Phase.BACKOFF, reason)

    def _stop_child(self, child: Child) -> None:
        if child is self.engine_child:
            self.exit_watcher.enabled = False  # its model servers end because we asked
        refs = [child.status.pid] if child.status.pid else []
        if child is self.engine_child:
            refs += self._current_model_procs()
        if refs:
            stopped, killed = procs.stop_processes(refs, timeout=STOP_TIMEOUT)
            log.info("stopped %s: %d process(es) exited, %d killed", child.name, stopped, killed)
        if child.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(timeout=1)
        child.process = None
        child.status.pid = None
        if child is self.engine_child:
            self._reap_model_procs()
            self.exit_watcher.enabled = not self._stop.is_set()

    def _tick(self, child: Child) -> None:
        if child.status.phase == Phase.FAILED:
            return
        now = time.monotonic()
        if child.process is None:
            if now >= child.next_start:
                self._launch(child)
            return
        code = child.process.poll()
        if code is not None:
            ran = now - child.started
            log.error("%s exited with code %s after %.0fs", child.name, code, ran)
            self._stop_child(child)  # ends what it left behind (the engine's model servers)
            if ran > STABLE_AFTER:
                child.failures, child.backoff = 0, BACKOFF_START
            self._failed_start(child, f"exited with code {code}")
            return
        if child.status.phase == Phase.STARTING:
            if child.ready is None or child.ready():
                self._set(child.name, child.status, Phase.RUNNING)
                if child is self.engine_child:
                    self._keep_last_good()
            elif now > child.deadline:
                self._stop_child(child)
                self._failed_start(child, f"no answer within {HEALTH_DEADLINE:.0f}s")
        elif child is self.engine_child and now - self._last_track > 1.0:
            self._last_track = now
            self._track_model_procs()

    def _current_model_procs(self) -> list[procs.ProcRef]:
        engine_ref = self.engine_child.status.pid
        live = procs.descendants(engine_ref) if engine_ref else []
        known = {ref.pid for ref in live}
        return live + [ref for ref in self.model_procs if ref.pid not in known and ref.alive()]

    def _reap_model_procs(self) -> None:
        """Model servers left by a dead engine hold memory and ports: end them."""
        leftovers = [ref for ref in self.model_procs if ref.alive()]
        engine_ref = self.engine_child.status.pid
        if engine_ref and engine_ref.alive():
            current = {ref.pid for ref in procs.descendants(engine_ref)}
            leftovers = [ref for ref in leftovers if ref.pid not in current]
        if leftovers:
            log.warning("ending %d model process(es) left by a dead engine: %s",
                        len(leftovers), ", ".join(str(ref.pid) for ref in leftovers))
            procs.stop_processes(leftovers, timeout=5)
        self.model_procs = [ref for ref in self.model_procs if ref.alive()]

    def _track_model_procs(self) -> None:
        engine_ref = self.engine_child.status.pid
        if engine_ref is None:
            return
        current = procs.descendants(engine_ref)
        # Merged, never replaced: an engine killed just after this tick's poll() shows no
        # children (they were re-parented at its death, and llama-swap's outlive it); a model
        # server dropped here would be forgotten, left running after the restart and the stop.
        known = {ref.pid for ref in current}
        current += [ref for ref in self.model_procs if ref.pid not in known and ref.alive()]
        if {r.pid for r in current} != {r.pid for r in self.model_procs}:
            self.model_procs = current
            self.write_state()

    # --- sync loop ----------------------------------------------------------------------
    def sync_once(self, reason: str) -> bool:
        """One sync; False when it failed (the last good config stays)."""
        from model_serve.runtime.sync import run_sync

        try:
            result = run_sync(self.settings, engine=self.engine,
                              reload=self.engine_child.status.phase == Phase.RUNNING)
        except (ModelServeError, OSError) as exc:
            # OSError: e.g. a file vanishing mid-scan while `ollama rm` runs
            message = exc.message if isinstance(exc, ModelServeError) else f"{exc}"
            self.sync_status.restarts += 1
            self._set("sync", self.sync_status, Phase.BACKOFF, message)
            log.warning("sync (%s) failed; the last good config stays: %s", reason, message)
            return False
        if result.reloaded:
            self._keep_last_good()
        if result.reload_error:
            self._set("sync", self.sync_status, Phase.BACKOFF, result.reload_error)
            return False
        self.sync_status.last_error = result.bridge.error
        self._set("sync", self.sync_status, Phase.RUNNING, result.bridge.error)
        log.info("sync (%s): %d models, config %s%s", reason, len(result.plan),
                 "changed" if result.config_changed else "unchanged",
                 ", engine reloaded" if result.reloaded else "")
        return True

    def _sync_loop(self) -> None:
        """Interval syncs, and the ones SIGHUP asks for: here, off the main loop, which keeps
        restarting what dies while a sync (a bridge run, a drain, a reload) takes minutes."""
        interval = self.settings.bridge_sync_interval
        wait = float(interval)
        next_at = time.monotonic() + wait if interval > 0 else float("inf")
        while not self._stop.is_set():
            asked = self._sync_now.wait(min(1.0, max(0.0, next_at - time.monotonic())))
            if self._stop.is_set():
                return
            if asked:
                self._sync_now.clear()
            elif time.monotonic() < next_at:
                continue
            reason = "SIGHUP" if asked else "interval"
            try:
                ok = self.sync_once(reason)
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any one failure
                log.exception("sync (%s) failed", reason)
                self.sync_status.restarts += 1
                self._set("sync", self.sync_status, Phase.BACKOFF, f"{type(exc).__name__}: {exc}")
                ok = False
            if interval > 0:
                # After a failure, retry sooner (5 s, doubling) but never later than the
                # interval.
                wait = interval if ok else min(interval, SYNC_RETRY_START if wait >= interval
                                               else wait * 2)
                next_at = time.monotonic() + wait

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
        self.engine_version = self.engine.version()
        if self.settings.front_enabled:
            internal_key.make(self.settings)  # before the engine and the front read it
        self._secure_saved_conversations()
        try:
            self.sync_once("start")
        except Exception as exc:  # noqa: BLE001 - as the interval sync: a last good config serves
            log.exception("sync (start) failed")
            self.sync_status.restarts += 1
            self._set("sync", self.sync_status, Phase.BACKOFF, f"{type(exc).__name__}: {exc}")
        if not self.engine.config_path.exists():
            log.error("no engine config could be written; see the sync error above")
            self.settings.pid_file.unlink(missing_ok=True)
            return 1
        threading.Thread(target=self._sync_loop, name="sync", daemon=True).start()
        code = 0
        try:
            self._loop()
        except Exception:  # a bug must not leave the engine and model servers behind
            log.exception("supervisor failed; stopping everything it started")
            code = 1
        finally:
            self._stop.set()
            self._shutdown()
        return code

    def _secure_saved_conversations(self) -> None:
        """Conversations saved by an earlier version: made the user's alone, their text
        hashed (KV_CACHE=off too: they are still on disk)."""
        from model_serve.engines import slot_cache

        try:
            slot_cache.secure_saved(self.settings.kv_cache_dir)
        except OSError as exc:  # the stack still starts; the next start tries again
            log.warning("could not secure the saved conversations in %s: %s",
                        self.settings.kv_cache_dir, exc)

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._reload.is_set():
                self._reload.clear()
                log.info("SIGHUP: syncing now, retrying failed parts")
                self._sync_now.set()
                for child in self.children:
                    if child.status.phase == Phase.FAILED:
                        child.failures, child.backoff = 0, BACKOFF_START
                        self._set(child.name, child.status, Phase.BACKOFF, "retry asked by SIGHUP")
            for child in self.children:
                self._tick(child)
            self._stop.wait(0.2)

    def _shutdown(self) -> None:
        log.info("supervisor stopping")
        started = time.monotonic()
        self.exit_watcher.close()
        for child in reversed(self.children):  # the unloader first, then the engine
            try:
                if child is self.engine_child:  # no request comes any more: save, bounded
                    self.engine.save_before_stop(
                        save_deadline(started, self.settings.kv_cache_stop_save_seconds))
                self._stop_child(child)
                self._set(child.name, child.status, Phase.STOPPED)
            except Exception:  # noqa: BLE001 - the others must still be stopped
                log.exception("stopping %s failed", child.name)
        self._set("sync", self.sync_status, Phase.STOPPED)
        self.settings.pid_file.unlink(missing_ok=True)
        log.info("supervisor stopped")


def save_deadline(started: float, budget: float) -> float:
    """When the conversations' save at a stop that began at `started` must end: within
    KV_CACHE_STOP_SAVE_SECONDS, and early enough that the engine's own stop and a margin still
    fit in the service manager's timeout (launchd's ExitTimeOut, systemd's TimeoutStopSec),
    whatever stopping the unloader and the front took first."""
    return min(time.monotonic() + budget,
               started + SERVICE_STOP_TIMEOUT - STOP_TIMEOUT - STOP_MARGIN)


class _PrivateLogHandler(logging.handlers.RotatingFileHandler):
    """The log tells what models were asked and answered: 0600, whatever the umask (each
    file it rotates to as well)."""

    def _open(self) -> IO[str]:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)  # one an earlier version made 0644
        return open(fd, self.mode, encoding=self.encoding, errors=self.errors)


def setup_logging(settings: Settings, to_stderr: bool) -> None:
    folder = settings.log_file.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    for old in folder.iterdir():  # rotated logs, serve-console.log: ours, and as private
        if old.is_file() and not old.is_symlink():
            os.chmod(old, 0o600)
    handler = _PrivateLogHandler(
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
    from model_serve.runtime import stack

    with stack.supervisor_lock(settings):
        # Under the lock: only one starting supervisor ends what a dead one left behind.
        try:
            stack.check_can_start(settings, holding_lock=True)
        except stack.AlreadyRunning as exc:
            # For a service manager this is a failed start: it retries until the port is free.
            raise EngineError(exc.message, exc.hint) from None
        setup_logging(settings, to_stderr)
        before, after = machine.raise_open_files_limit()  # the children inherit it
        if after != before:
            log.info("open files: the soft limit was %d, now %d", before, after)
        return Supervisor(settings).run()
