"""`python -m model_serve.runtime.orphan_guard PARENT_PID PROGRAM ARGS...`: run PROGRAM so
that it ends when the supervisor (PARENT_PID) dies, even by SIGKILL, which no handler of its
own can catch.

- Linux: the kernel's parent-death signal (SIGTERM, so the router or llama-swap stops its own
  model servers on the way out), then exec: PROGRAM keeps this process's pid.
- Elsewhere (macOS has no parent-death signal): this process stays as PROGRAM's parent,
  watches for the supervisor to go (it is re-parented), then stops PROGRAM's process group,
  and exits the way PROGRAM did. `--watch`, or the portable lane (MODEL_SERVE_PORTABLE=1), picks
  this way on Linux too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

from model_serve import machine

WATCH_INTERVAL = 0.5
GRACE = 10.0  # seconds between TERM and KILL of an orphaned program
_PR_SET_PDEATHSIG = 1


def _exec_with_parent_death_signal(parent: int, argv: list[str]) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # it died before the signal was armed
        sys.exit(1)
    _exec(argv)


def _exec(argv: list[str]) -> None:
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        print(f"ERROR could not run {argv[0]}: {exc.strerror}", flush=True)
        os._exit(127)


def _exit_like(status: int) -> None:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    sys.exit(os.waitstatus_to_exitcode(status))


def _watch(parent: int, argv: list[str]) -> None:
    """Stay PROGRAM's parent; stop it once the supervisor is gone."""
    child = os.fork()
    if child == 0:
        _exec(argv)
    # Stop signals reach the whole group (PROGRAM too); wait for PROGRAM to end of them.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    # A SIGHUP sent to this pid (a reload) is meant for PROGRAM.
    signal.signal(signal.SIGHUP, lambda *_: os.kill(child, signal.SIGHUP))
    orphaned_at = 0.0
    while True:
        pid, status = os.waitpid(child, os.WNOHANG)
        if pid == child:
            _exit_like(status)
        if not orphaned_at and os.getppid() != parent:
            orphaned_at = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgrp(), signal.SIGTERM)
        elif orphaned_at and time.monotonic() - orphaned_at > GRACE:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        time.sleep(WATCH_INTERVAL)


def guard_argv(argv: list[str], watch: bool = False) -> list[str]:
    """`argv` wrapped so that it ends with the calling process."""
    extra = ["--watch"] if watch else []
    return [sys.executable, "-m", "model_serve.runtime.orphan_guard", *extra, str(os.getpid()),
            *argv]


def main(args: list[str]) -> None:
    watch = bool(args) and args[0] == "--watch"
    if watch:
        args = args[1:]
    parent, argv = int(args[0]), args[1:]
    if not watch and machine.linux_fast_paths():
        _exec_with_parent_death_signal(parent, argv)
    _watch(parent, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
