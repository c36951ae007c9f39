"""Syncs run one at a time per stack, whoever starts them (two `model sync` at once, the
supervisor's), and a sync SIGHUP asks for runs beside the supervisor's loop, which meanwhile
keeps restarting what dies. A BRIDGE_SCRIPT of the user's that takes its time (it notes when
it starts and ends) makes a sync last as long as the test needs."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from model_serve.config.settings import load_settings
from model_serve.runtime.procs import wait_until
from model_serve.runtime.state import read_state
from tests.conftest import Env, running

SLOW_BRIDGE = """#!/bin/sh
# Slow only once the test asks (the file 'slow' exists): the start sync stays quick.
echo "start $$" >> "{log}"
[ -e "{slow}" ] && sleep {seconds}
echo "end $$" >> "{log}"
echo '{{}}'
"""


def slow_bridge(env: Env, tmp_path: Path, seconds: float) -> tuple[Path, Path]:
    log, slow = tmp_path / "bridge.log", tmp_path / "slow"
    script = tmp_path / "bridge.sh"
    script.write_text(SLOW_BRIDGE.format(log=log, slow=slow, seconds=seconds))
    script.chmod(0o755)
    env["BRIDGE_SCRIPT"] = str(script)
    return log, slow


def test_two_syncs_at_once_take_turns(env: Env, tmp_path: Path) -> None:
    log, slow = slow_bridge(env, tmp_path, 1.5)
    slow.touch()
    codes: list[int] = []
    syncs = [threading.Thread(target=lambda: codes.append(env.run("sync").returncode))
             for _ in range(2)]
    for sync in syncs:
        sync.start()
    for sync in syncs:
        sync.join(120)
    assert codes == [0, 0]
    events = [line.split()[0] for line in log.read_text().splitlines()]
    assert events == ["start", "end", "start", "end"], f"the syncs overlapped: {events}"


def test_a_sighup_sync_does_not_stop_the_supervisor(env: Env, gemma_path: Path,
                                                    tmp_path: Path) -> None:
    """While a SIGHUP sync waits on a slow bridge, the unloader is killed: the supervisor
    starts it again before the sync ends."""
    (env.models / gemma_path.name).symlink_to(gemma_path)
    log, slow = slow_bridge(env, tmp_path, 20)
    with running(env):
        state = read_state(load_settings(dict(env)).pid_file)
        assert state is not None and state.child("unloader").pid is not None
        supervisor, unloader = state.pid.pid, state.child("unloader").pid.pid
        done = log.read_text().count("end")  # the syncs of the start
        slow.touch()
        os.kill(supervisor, signal.SIGHUP)
        assert wait_until(lambda: log.read_text().count("start") == done + 1, 30,
                          interval=0.05)
        os.kill(unloader, signal.SIGKILL)

        def restarted() -> bool:
            now = read_state(load_settings(dict(env)).pid_file)
            pid = now.child("unloader").pid if now else None
            return pid is not None and pid.pid != unloader and now.child("unloader").phase \
                == "running"

        assert wait_until(restarted, 15, interval=0.1), "the unloader was not started again"
        assert log.read_text().count("end") == done, "restarted only once the sync had ended"
