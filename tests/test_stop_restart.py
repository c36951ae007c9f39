"""`model stop` racing a service manager's restart: systemd starts a failed supervisor again
within seconds. The state file of that new supervisor must survive the stop that began with
the old one: without it the stack runs unseen (`model status` says stopped, `model start`
finds its port taken) and the next `model stop` cannot stop it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

from model_serve.runtime.procs import wait_until
from tests.conftest import Env, running

SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


def _sigterm_pending(pid: int) -> bool:
    """The (stopped) process has a SIGTERM waiting: `model stop` has sent it."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("ShdPnd:"):
            return bool(int(line.split()[1], 16) & SIGTERM_BIT)
    return False


def test_stop_keeps_the_state_of_a_supervisor_restarted_meanwhile(env: Env,
                                                                   gemma_path: Path) -> None:
    (env.models / gemma_path.name).symlink_to(gemma_path)
    state_file = env.state / "supervisor.json"
    with running(env):
        first = json.loads(state_file.read_text())["pid"][0]
        os.kill(first, signal.SIGSTOP)  # it will take its time to stop
        stopper = subprocess.Popen([sys.executable, "-m", "model_serve", "stop"], env=dict(env),
                                   cwd=env.home, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        second = None
        try:
            if Path("/proc").is_dir():
                assert wait_until(lambda: _sigterm_pending(first), 30, 0.05), \
                    "model stop never asked the supervisor to stop"
            else:
                time.sleep(3)
            os.kill(stopper.pid, signal.SIGSTOP)  # `model stop`, waiting for it, is held here
            os.kill(first, signal.SIGKILL)  # the supervisor fails; the service manager
            second = subprocess.Popen(  # starts it again
                [sys.executable, "-m", "model_serve", "serve"], env=dict(env), cwd=env.home,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            # Reaped as soon as it ends, as a service manager does (a zombie looks alive).
            threading.Thread(target=second.wait, daemon=True).start()
            assert wait_until(lambda: json.loads(state_file.read_text())["pid"][0] == second.pid
                              and requests.get(f"{env.base_url}/health", timeout=1).ok, 60, 0.2,
                              ignore=(OSError, ValueError, KeyError,
                                      requests.RequestException)), "the new supervisor runs"
        finally:
            os.kill(stopper.pid, signal.SIGCONT)
            stopper.wait(60)
        assert state_file.exists(), "model stop deleted the running supervisor's state"
        assert json.loads(state_file.read_text())["pid"][0] == second.pid
        status = env.run("status", "--json")
        assert status.returncode == 0 and json.loads(status.stdout)["pid"] == second.pid
    second.wait(30)  # running() stopped it with `model stop`, and found nothing left


def test_the_stops_save_leaves_the_engines_stop_room_in_the_service_managers_timeout() -> None:
    """The save at a stop ends early enough for the engine's own stop and a margin to fit in
    launchd's ExitTimeOut / systemd's TimeoutStopSec, counted from the stop's start, whatever
    KV_CACHE_STOP_SAVE_SECONDS says and whatever stopping the unloader and front took."""
    from model_serve.config.settings import SETTINGS_TABLE
    from model_serve.runtime import supervisor
    from model_serve.service import files

    most = max(s.maximum for s in SETTINGS_TABLE if s.name == "KV_CACHE_STOP_SAVE_SECONDS")
    for spent in (0.0, 6.0, 15.0):  # stopping the unloader and the front took this long
        started = time.monotonic() - spent
        deadline = supervisor.save_deadline(started, most)
        assert deadline - started + supervisor.STOP_TIMEOUT < files.STOP_TIMEOUT
    assert supervisor.save_deadline(time.monotonic(), 5) <= time.monotonic() + 5
