"""Process bookkeeping: our own PIDs (with start times, so a reused PID is never hit),
process-group stops with a bounded wait, and the port checks done before starting."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from model_serve import machine


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
            if abs(proc.create_time() - self.create_time) > machine.START_TIME_SLACK:
                return None  # the PID now belongs to someone else
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.Error:
            return None

    def alive(self) -> bool:
        return machine.same_process(self.pid, self.create_time)

    def to_json(self) -> list[float]:
        return [self.pid, self.create_time]

    @classmethod
    def from_json(cls, data: object) -> ProcRef | None:
        try:
            pid, created = data  # type: ignore[misc]
            return cls(int(pid), float(created))
        except (TypeError, ValueError):
            return None


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
        # Checked again at each signal: after the stop wait the pid may belong to a newer
        # process, and killpg (unlike psutil's send_signal) does not look. A zombie leader is
        # still ours (its pid cannot be reused): its group may hold live children.
        if abs(psutil.Process(ref.pid).create_time() - ref.create_time) \
                > machine.START_TIME_SLACK:
            return
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
