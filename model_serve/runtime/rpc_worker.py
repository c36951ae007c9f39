"""`model worker`: llama.cpp's RPC server on this machine, lending its memory and compute to a
model served elsewhere (that model's `rpc:` in custom_models.yaml), under a supervisor of its
own: restarted when it dies, ended when its supervisor ends, one per port.

Each worker keeps STATE_DIR/workers/<port>/: worker.json (what `status` shows), worker.log
(the server's own output) and worker.lock (held by its supervisor while it runs).

`python -m model_serve.runtime.rpc_worker FOLDER HOST PORT LOG_MAX_BYTES PROGRAM [OPTION...]`
is the supervisor of one worker: FOLDER is its state folder, LOG_MAX_BYTES the size at which
its worker.log moves to worker.log.1, the rest its RPC server's command.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from model_serve.config.settings import Settings
from model_serve.errors import ConfigError, EngineError, NotRunningError
from model_serve.fileio import try_lock, write_bytes_atomically
from model_serve.runtime import procs
from model_serve.runtime.orphan_guard import guard_argv
from model_serve.runtime.supervisor import BACKOFF_MAX, BACKOFF_START, STABLE_AFTER, capped_lines

log = logging.getLogger("model_serve.worker")

DEFAULT_PORT = 50052  # llama.cpp's own default
READY_WITHIN = 20.0  # seconds for a new worker to listen
STOP_WITHIN = 15.0
WARNING = ("llama.cpp's RPC server has no authentication and no encryption: whoever reaches "
           "{address} can use this machine's memory and compute and see the model's data. "
           "Run it on a network you trust (a private LAN, WireGuard or Tailscale), never on an "
           "open one.")
OPEN_WARNING = ("WARNING: this worker listens on {address}, which other machines can reach: "
                "anyone on that network can use it, not only your model server.")
_DEVICE = re.compile(r"^\s+(\S.*?):\s+(.*)\((\d+) MiB, (\d+) MiB free\)\s*$")


@dataclass
class WorkerRecord:
    host: str
    port: int
    options: list[str]
    binary: str
    supervisor: list[float] | None = None  # ProcRef as JSON
    server: list[float] | None = None
    started_at: float = 0.0
    server_started_at: float = 0.0
    restarts: int = 0
    last_exit: str = ""
    devices: list[dict[str, Any]] = field(default_factory=list)
    version: str = ""
    cache: str = ""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class WorkerStatus:
    record: WorkerRecord
    running: bool
    listening: bool
    log_file: Path

    def to_json(self) -> dict[str, Any]:
        r = self.record
        server = procs.ProcRef.from_json(r.server)
        return {"address": r.address, "host": r.host, "port": r.port, "running": self.running,
                "listening": self.listening, "pid": server.pid if server else None,
                "supervisor_pid": _pid(r.supervisor), "started_at": r.started_at,
                "uptime_seconds": round(time.time() - r.server_started_at, 1)
                if self.running and r.server_started_at else 0.0,
                "restarts": r.restarts, "last_exit": r.last_exit, "devices": r.devices,
                "version": r.version, "cache": r.cache, "options": r.options,
                "binary": r.binary, "log_file": str(self.log_file)}


def _pid(ref: list[float] | None) -> int | None:
    found = procs.ProcRef.from_json(ref)
    return found.pid if found else None


def worker_dir(settings: Settings, port: int) -> Path:
    return settings.state_dir / "workers" / str(port)


def _record_path(folder: Path) -> Path:
    return folder / "worker.json"


def read_record(folder: Path) -> WorkerRecord | None:
    try:
        data = json.loads(_record_path(folder).read_text(encoding="utf-8"))
        return WorkerRecord(**data)
    except (OSError, ValueError, TypeError):
        return None


def _write_record(folder: Path, record: WorkerRecord) -> None:
    write_bytes_atomically(_record_path(folder), json.dumps(asdict(record)).encode())


def check_host(host: str) -> str:
    """An IPv4 address to bind to: llama.cpp's RPC server takes no host name (it says
    "Invalid host address" and exits) and no IPv6 address (it exits at once)."""
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    raise ConfigError(f"--host {host!r} is not an IPv4 address (llama.cpp's RPC server binds "
                      "IPv4 addresses only, not host names or IPv6)",
                      "give an IPv4 address of this machine, e.g. --host 192.168.1.20 (0.0.0.0: "
                      "all of them), or leave --host out to bind 127.0.0.1")


def start_warning(host: str, port: int) -> str:
    """Said at every start: RPC's lack of authentication, louder off loopback."""
    address = f"{host}:{port}"
    said = WARNING.format(address=address)
    if is_loopback(host):
        return "warning: " + said
    return OPEN_WARNING.format(address=address) + "\nWARNING: " + said


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_argv(binary: Path, cache_dir: Path, host: str, port: int, threads: int | None,
                device: str | None, cache: bool) -> list[str]:
    """The RPC server's command line, with only options this build has."""
    from model_serve.engines.rpc_server import rpc_server_options

    has = rpc_server_options(binary, cache_dir)
    argv = [str(binary), "--host", host, "--port", str(port)]
    wanted = [("--threads", str(threads) if threads else None), ("--device", device),
              ("--cache", "" if cache else None)]
    for option, value in wanted:
        if value is None:
            continue
        if option not in has:
            raise ConfigError(f"this RPC server ({binary}) has no {option} option",
                              f"leave {option} out, or point RPC_SERVER_BIN at a newer build")
        argv += [option, value] if value else [option]
    return argv


# --- the commands -------------------------------------------------------------------------
def start_worker(settings: Settings, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 threads: int | None = None, device: str | None = None,
                 cache: bool = False) -> WorkerStatus:
    """Start a supervised RPC server on host:port and wait until it listens."""
    from model_serve.engines.rpc_server import find_rpc_server

    host = check_host(host)
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port {port} is not a port", "give a port from 1 to 65535")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads {threads} is below 1", "give --threads 1 or more")
    if device is not None and (not device or re.search(r"[\s]", device)):
        raise ConfigError(f"--device {device!r} is not a device list",
                          "give device names separated by commas, e.g. --device CPU")
    folder = worker_dir(settings, port)
    current = worker_status(settings, port)
    if current is not None and current.running:
        raise EngineError(f"a worker already runs on port {port} ({current.record.address})",
                          f"stop it first with 'model worker stop --port {port}'")
    if procs.port_in_use(host, port):
        raise EngineError(f"port {port} on {host} is already in use by "
                          f"{procs.who_listens(port)}",
                          "stop that program or give another --port")
    binary = find_rpc_server(settings)
    argv = server_argv(binary, settings.cache_dir, host, port, threads, device, cache)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    log_file = folder / "worker.log"
    _rotate(log_file, settings.log_max_bytes)
    with open(log_file, "ab") as out:
        os.chmod(log_file, 0o600)
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "model_serve.runtime.rpc_worker", str(folder), host,
             str(port), str(settings.log_max_bytes), *argv],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, umask=0o077)
    deadline = time.monotonic() + READY_WITHIN
    listened = 0.0
    why = f"it did not listen within {READY_WITHIN:.0f}s"
    while time.monotonic() < deadline:
        status = worker_status(settings, port)
        if status is not None and status.listening:
            listened = listened or time.monotonic()
            # Its devices are printed as it binds: wait a moment for them to be read.
            if status.record.devices or time.monotonic() - listened > 2:
                return status
        if status is not None and status.record.restarts and not listened:
            # Ended before it listened (a device it lacks, the port taken meanwhile): it
            # would only fail the same way again.
            why = f"its RPC server {status.record.last_exit}, before it listened"
            break
        if supervisor.poll() is not None:
            why = f"its supervisor exited with code {supervisor.returncode}"
            break
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        supervisor.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        supervisor.wait(STOP_WITHIN)
    raise EngineError(f"the RPC worker on {host}:{port} did not start ({why}):\n"
                      + _tail(log_file, 8), f"see {log_file}")


def stop_workers(settings: Settings, port: int | None = None) -> list[WorkerStatus]:
    """Stop the worker on `port`, or every worker; returns those stopped."""
    chosen = [s for s in all_workers(settings) if port is None or s.record.port == port]
    if port is not None and not chosen:
        raise NotRunningError(f"no worker on port {port}", "'model worker status' lists them")
    stopped = []
    for status in chosen:
        refs = [ref for ref in (procs.ProcRef.from_json(status.record.supervisor),
                                procs.ProcRef.from_json(status.record.server)) if ref]
        procs.stop_processes(refs, timeout=STOP_WITHIN)
        _record_path(worker_dir(settings, status.record.port)).unlink(missing_ok=True)
        stopped.append(status)
    return stopped


def worker_status(settings: Settings, port: int) -> WorkerStatus | None:
    folder = worker_dir(settings, port)
    record = read_record(folder)
    if record is None:
        return None
    supervisor = procs.ProcRef.from_json(record.supervisor)
    server = procs.ProcRef.from_json(record.server)
    # Its supervisor alive is a worker running, also while it waits to start a dead server.
    running = bool(supervisor and supervisor.alive())
    listening = running and bool(server and server.alive()) and _bound(record.host, record.port)
    return WorkerStatus(record, running, listening, folder / "worker.log")


def _bound(host: str, port: int) -> bool:
    """Whether host:port is taken, found by trying to bind it: connecting would take the RPC
    server's one client slot, and fill its log."""
    import errno
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def all_workers(settings: Settings) -> list[WorkerStatus]:
    root = settings.state_dir / "workers"
    ports = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) \
        if root.is_dir() else []
    found = (worker_status(settings, port) for port in ports)
    return [status for status in found if status is not None]


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "  (no log)"
    return "\n".join(f"  {line}" for line in text[-lines:]) or "  (the log is empty)"


def _rotate(log_file: Path, limit: int) -> bool:
    """worker.log moved to worker.log.1 (the one before dropped) once over `limit` bytes."""
    with contextlib.suppress(OSError):
        if log_file.stat().st_size > limit:
            log_file.replace(log_file.with_name(log_file.name + ".1"))
            return True
    return False


# --- the supervisor -----------------------------------------------------------------------
class WorkerSupervisor:
    """Runs the RPC server, restarts it with growing backoff when it dies, and on SIGTERM
    stops it and removes the record."""

    def __init__(self, folder: Path, host: str, port: int, argv: list[str],
                 log_max_bytes: int) -> None:
        self.folder, self.argv, self.log_max_bytes = folder, argv, log_max_bytes
        self.record = WorkerRecord(host=host, port=port, options=argv[5:], binary=argv[0],
                                   supervisor=_ref_json(os.getpid()), started_at=time.time())
        self.stop = threading.Event()
        self.backoff = BACKOFF_START
        self.lock = threading.Lock()

    def write(self) -> None:
        with self.lock:
            _write_record(self.folder, self.record)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: self.stop.set())
        self.write()
        try:
            while not self.stop.is_set() and not self._folder_gone():
                ran, code = self._run_once()
                if self.stop.is_set():
                    break
                self.record.restarts += 1
                self.record.last_exit = f"exited with code {code} after {ran:.0f}s"
                if ran > STABLE_AFTER:
                    self.backoff = BACKOFF_START
                print(f"worker: the RPC server {self.record.last_exit}; starting it again in "
                      f"{self.backoff:.0f}s", flush=True)
                self.write()
                self.stop.wait(self.backoff)
                self.backoff = min(self.backoff * 2, BACKOFF_MAX)
        finally:
            _record_path(self.folder).unlink(missing_ok=True)
        return 0

    def _run_once(self) -> tuple[float, int | None]:
        import pty

        # A terminal for its output: the RPC server prints its devices through stdio's
        # buffer, which a pipe would hold until it exits.
        leader, follower = pty.openpty()
        began = time.monotonic()
        try:
            server = subprocess.Popen(guard_argv(self.argv), stdin=subprocess.DEVNULL,
                                      stdout=follower, stderr=follower,
                                      start_new_session=True, umask=0o077)
        except OSError as exc:
            os.close(leader)
            os.close(follower)
            print(f"worker: could not run {self.argv[0]}: {exc.strerror or exc}", flush=True)
            return 0.0, None
        os.close(follower)
        reader = threading.Thread(target=self._read, args=(leader,), daemon=True)
        reader.start()
        self.record.server = _ref_json(server.pid)
        self.record.server_started_at = time.time()
        self.write()
        while server.poll() is None:
            if self.stop.wait(0.2) or self._folder_gone():
                refs = [r for r in [procs.ProcRef.of(server.pid)] if r]
                procs.stop_processes(refs, timeout=STOP_WITHIN)
                server.wait()
                break
        reader.join(2)
        self.record.server = None
        return time.monotonic() - began, server.returncode

    def _folder_gone(self) -> bool:
        """Its state folder deleted (the state dir removed, say): no command could find or
        stop this worker any more, so it ends rather than run on unseen."""
        if self.folder.is_dir():
            return False
        self.stop.set()
        return True

    def _read(self, leader: int) -> None:
        with open(leader, "rb", buffering=0, closefd=True) as stream:
            try:
                for line in capped_lines(stream):  # type: ignore[arg-type]
                    print(line, flush=True)
                    self._learn(line)
                    self._keep_log_small()
            except OSError:  # the terminal closes with the server (EIO)
                pass

    def _keep_log_small(self) -> None:
        """A worker runs for months, and anyone who reaches its port adds two lines per
        connection: its log (our stdout and stderr) moves to worker.log.1 at LOG_MAX_BYTES."""
        log_file = self.folder / "worker.log"
        with contextlib.suppress(OSError):
            if os.fstat(1).st_size <= self.log_max_bytes or not os.path.samestat(
                    os.fstat(1), log_file.stat()):
                return  # small, or not writing to worker.log (run by hand)
            if _rotate(log_file, self.log_max_bytes):
                fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.close(fd)

    def _learn(self, line: str) -> None:
        """What the server says of itself at start: its version, cache and devices."""
        changed = True
        if line.startswith("Starting RPC server"):
            self.record.version = line.rsplit(" ", 1)[-1]
            self.record.devices = []
        elif line.strip().startswith("local cache"):
            self.record.cache = line.split(":", 1)[1].strip()
        elif match := _DEVICE.match(line):
            self.record.devices.append({
                "name": match.group(1).strip(), "description": match.group(2).strip(),
                "total_bytes": int(match.group(3)) << 20,
                "free_bytes": int(match.group(4)) << 20})
        else:
            changed = False
        if changed:
            self.write()


def _ref_json(pid: int) -> list[float] | None:
    ref = procs.ProcRef.of(pid)
    return ref.to_json() if ref else None


def main(args: list[str]) -> int:
    folder, host, port, log_max = Path(args[0]), args[1], int(args[2]), int(args[3])
    argv = args[4:]
    with open(folder / "worker.lock", "w") as lock:
        if not try_lock(lock):
            print(f"worker: another worker's supervisor holds {folder / 'worker.lock'}",
                  flush=True)
            return 1
        print(f"worker: supervising {' '.join(argv)}", flush=True)
        print("worker: " + start_warning(host, port), flush=True)
        return WorkerSupervisor(folder, host, port, argv, log_max).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
