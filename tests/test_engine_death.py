"""A model server left behind by an engine killed at the wrong moment is still stopped.

The supervisor records the engine's model servers about once a second, from the engine's
children. llama-swap's model servers outlive a SIGKILL of llama-swap (their own process
groups, no parent-death signal). When the engine died just after the main loop's poll() and
before that record, the record read no children (re-parented at the engine's death) and
replaced the list with nothing: the model server was forgotten, kept its port and answered
the next llama-swap's health check, and was left running after `model stop`
(test_the_front_and_the_engine_come_back[llama-swap] failed so once in CI).

The moment is reached here step by step with the supervisor's own code and real processes:
an engine process whose child runs in its own session, as llama-swap's do."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil

from model_serve.config.settings import load_settings
from model_serve.runtime.procs import ProcRef, wait_until
from model_serve.runtime.supervisor import Supervisor
from tests.conftest import Env

ENGINE = ("import subprocess, time\n"
          "server = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
          "print(server.pid, flush=True)\n"
          "time.sleep(300)\n")


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_model_server_of_an_engine_killed_between_two_looks_is_stopped(env: Env) -> None:
    supervisor = Supervisor(load_settings(dict(env)))
    engine = subprocess.Popen([sys.executable, "-c", ENGINE], stdout=subprocess.PIPE,
                              start_new_session=True)
    assert engine.stdout is not None
    server = int(engine.stdout.readline())
    try:
        supervisor.engine_child.process = engine
        supervisor.engine_child.status.pid = ProcRef.of(engine.pid)
        supervisor._track_model_procs()  # the record of every second
        assert server in [ref.pid for ref in supervisor.model_procs]
        # The engine is killed after this tick's poll() said it runs: the record comes first.
        os.kill(engine.pid, signal.SIGKILL)
        assert wait_until(lambda: not _running(engine.pid), 10, 0.01)
        supervisor._track_model_procs()
        # The next tick's poll() sees the engine gone and stops what it left.
        assert engine.poll() is not None
        supervisor._stop_child(supervisor.engine_child)
        assert wait_until(lambda: not _running(server), 10, 0.05), \
            "the engine's model server was forgotten and left running"
    finally:
        for pid in (server, engine.pid):
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        engine.wait(10)
