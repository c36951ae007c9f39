"""Process bookkeeping: our own PIDs (with start times, so a reused PID is never hit),
process-group stops with a bounded wait, and the port checks done before starting."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcRef:
    """A process we started, identified by PID and start time."""

    pid: int
    create_time: float

    @classmethod
    def of(cls, pid: int) -> ProcRef | None:
        import psutil

        try:
            return cls(pid, psutil.Process(pid).create_time())
        except psutil.Error:
            return None

    def process(self):  # -> psutil.Process | None
        import psutil

        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.create_time) > 0.5:
                return None  # the PID now belongs to someone else
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.Error:
            return None

    def alive(self) -> bool:
        linux = _linux_alive(self)
        return linux if linux is not None else self.process() is not None

    def to_json(self) -> list[float]:
        return [self.pid, self.create_time]

    @classmethod
    def from_json(cls, data: object) -> ProcRef | None:
        try:
            pid, created = data  # type: ignore[misc]
            return cls(int(pid), float(created))
        except (TypeError, ValueError):
            return None


def _linux_alive(ref: ProcRef) -> bool | None:
    """ProcRef.alive from /proc alone (psutil costs `model status` 13 ms to import): the
    same start time psutil computes, boot time + start ticks / clock rate. None where there
    is no Linux /proc (macOS): then psutil answers."""
    if sys.platform != "linux":
        return None
    try:
        with open(f"/proc/{ref.pid}/stat", "rb") as handle:
            stat = handle.read()
    except FileNotFoundError:
        # No such process, or no /proc at all (a container without it): only the first
        # means dead.
        return False if os.path.isdir("/proc/self") else None
    except OSError:
        return None
    # The name (field 2) may hold spaces and ')': the fields after it follow the last ')'.
    fields = stat[stat.rfind(b")") + 2:].split()
    try:
        state, start_ticks = fields[0], int(fields[19])
        created = _boot_time() + start_ticks / os.sysconf("SC_CLK_TCK")
    except (IndexError, ValueError, OSError):
        return None
    return state != b"Z" and abs(created - ref.create_time) <= 0.5


_BOOT_TIME: list[float] = []


def _boot_time() -> float:
    if not _BOOT_TIME:
        with open("/proc/stat", "rb") as handle:
            line = next(row for row in handle if row.startswith(b"btime "))
        _BOOT_TIME.append(float(line.split()[1]))
    return _BOOT_TIME[0]


def descendants(ref: ProcRef) -> list[ProcRef]:
    """Every live descendant of `ref` (the router's per-model llama-servers)."""
    import psutil

    proc = ref.process()
    if proc is None:
        return []
    found = []
    try:
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                found.append(ProcRef(child.pid, child.create_time()))
    except psutil.Error:
        pass
    return found


def stop_processes(refs: list[ProcRef], timeout: float = 15.0) -> tuple[int, int]:
    """TERM each process group we lead (or the process), wait, then KILL what is left.

    Returns (stopped gracefully, killed)."""
    import psutil

    live = [(ref, proc) for ref in refs if (proc := ref.process()) is not None]
    for ref, proc in live:
        _signal(ref, proc, signal.SIGTERM)
    procs = [proc for _, proc in live]
    _gone, alive = psutil.wait_procs(procs, timeout=timeout)
    for ref, proc in live:
        if proc in alive:
            _signal(ref, proc, signal.SIGKILL)
    if alive:
        psutil.wait_procs(alive, timeout=5)
    return len(procs) - len(alive), len(alive)


def _signal(ref: ProcRef, proc, sig: int) -> None:
    import psutil

    try:
        if os.getpgid(ref.pid) == ref.pid:
            os.killpg(ref.pid, sig)  # the group leader: its children go too
        else:
            proc.send_signal(sig)
    except (ProcessLookupError, PermissionError, psutil.Error):
        pass


def port_in_use(host: str, port: int) -> bool:
    """True when something already listens on host:port."""
    target = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    import socket

    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((target, port)) == 0


def listener_pid(port: int) -> int | None:
    """The pid of the process listening on TCP `port`, when this user may see it. psutil
    cannot list sockets on macOS without root; lsof can, for the user's own processes."""
    import psutil

    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN \
                    and conn.pid:
                return conn.pid
    except (psutil.Error, OSError):
        pass
    return lsof_listener_pid(port)


def who_listens(port: int) -> str:
    """'name (pid N)' of the program on `port`, or 'another program' when it cannot be seen."""
    import psutil

    pid = listener_pid(port)
    try:
        return f"{psutil.Process(pid).name()} (pid {pid})" if pid else "another program"
    except psutil.Error:
        return "another program"


def lsof_listener_pid(port: int) -> int | None:
    import subprocess

    try:
        out = subprocess.run(["lsof", "-nP", f"-iTCP:{port}", "-sTCP:LISTEN", "-Fp"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    pids = parse_lsof_pids(out.stdout)
    return pids[0] if pids else None


def parse_lsof_pids(text: str) -> list[int]:
    """The pids of `lsof -F p` output: one 'p<pid>' line per process."""
    return [int(line[1:]) for line in text.splitlines()
            if line.startswith("p") and line[1:].isdigit()]


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.1,
               ignore: tuple[type[BaseException], ...] = ()) -> bool:
    """Poll `predicate` until it is true (True) or `timeout` seconds pass (False). Errors of
    the types in `ignore` count as "not yet" (a server that refuses while it restarts)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return True
        except ignore:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
