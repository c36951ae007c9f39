"""The portable lane: the stack's lifecycle with the Linux fast paths off, as a Mac runs it.

MODEL_SERVE_PORTABLE=1 in every process of the stack (the CLI, the supervisor, the front, the
unloader, the orphan guards, and this test process): model_serve's own code finds no /proc or
/sys, the orphan guard watches instead of using Linux's parent-death signal, and each /proc or
/sys open our code still tries fails the test (machine.REFUSALS_VARIABLE), even when a fallback
hid it. Chosen tests of other modules run here a second time; the one below adds `restart`,
`stats` and the 256 open files macOS starts programs with. README: "Development".
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests
from openai import OpenAI

from model_serve import machine
from model_serve.config.settings import load_settings
from model_serve.runtime.state import read_state
from tests.conftest import Env, stack_processes_under
from tests.test_e2e import test_status_start_twice_and_stop
from tests.test_faults import test_supervisor_killed_then_start_recovers, two
from tests.test_pressure import test_daemon_unloads_idle_models_under_pressure
from tests.test_rpc_worker import test_a_killed_supervisor_leaves_no_worker

RERUN = (test_status_start_twice_and_stop, test_supervisor_killed_then_start_recovers, two,
         test_daemon_unloads_idle_models_under_pressure, test_a_killed_supervisor_leaves_no_worker)
MODEL = "ls/gemma-3-270m-q4_k_m"
MACOS_OPEN_FILES = 256  # the soft limit a Mac gives programs started from Terminal or launchd


@pytest.fixture
def env(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    """The shared fixture's environment, in the portable lane (this process too: tests call
    model_serve's own code in-process)."""
    machine.install_guard()
    refusals = tmp_path / "portable-lane-refusals"
    lane = {machine.PORTABLE_VARIABLE: "1", machine.REFUSALS_VARIABLE: str(refusals)}
    env.update(lane)
    for name, value in lane.items():
        monkeypatch.setenv(name, value)
    yield env
    assert not refusals.exists(), f"model_serve read Linux-only sources:\n{refusals.read_text()}"


def _model(env: Env, *args: str, soft_open_files: int | None = None
           ) -> subprocess.CompletedProcess[str]:
    """`model ARGS` in `env`, started with this soft limit on open files."""
    def limit() -> None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft_open_files, hard))

    result = subprocess.run([sys.executable, "-m", "model_serve", *args], env=dict(env),
                            capture_output=True, text=True, timeout=180, cwd=env.home,
                            preexec_fn=limit if soft_open_files else None)
    assert result.returncode == 0, f"model {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result


def _chat(env: Env) -> None:
    OpenAI(base_url=f"{env.base_url}/v1", api_key="x", max_retries=0).chat.completions.create(
        model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "Hi"}])


def _held_connections(env: Env, count: int) -> list[socket.socket]:
    held = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", env.port), timeout=10)
        held.append(sock)
    return held


def test_restart_stats_and_many_connections_as_on_a_mac(env: Env, gemma_path: Path) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard == resource.RLIM_INFINITY or hard >= 1024, \
        f"this test needs a hard limit of at least 1024 open files (ulimit -Hn is {hard})"
    (env.models / gemma_path.name).symlink_to(gemma_path)
    settings = load_settings(dict(env))
    _model(env, "start", soft_open_files=MACOS_OPEN_FILES)
    try:
        # More idle clients than 256 open files allow, then a request: the front accepts it.
        held = _held_connections(env, 300)
        try:
            assert requests.get(f"{env.base_url}/health", timeout=30).status_code == 200
            front = read_state(settings.pid_file).child("front").pid
            assert front is not None
            assert psutil.Process(front.pid).rlimit(resource.RLIMIT_NOFILE)[0] > 300
        finally:
            for sock in held:
                sock.close()
        log = (env.state / "logs" / "model_serve.log").read_text()
        assert f"open files: the soft limit was {MACOS_OPEN_FILES}, now" in log

        _chat(env)
        [row] = [m for m in json.loads(_model(env, "stats", "--json").stdout)["models"]
                 if m["state"] == "loaded"]
        assert row["rss_bytes"] > 100_000_000 and row["predicted_tokens"] > 0

        before = read_state(settings.pid_file)
        assert before is not None and len(before.owned()) >= 4  # supervisor, 2 children, model
        _model(env, "restart", soft_open_files=MACOS_OPEN_FILES)
        status = json.loads(_model(env, "status", "--json").stdout)
        assert status["running"] and status["pid"] != before.pid.pid
        assert not any(psutil.pid_exists(ref.pid) and ref.alive() for ref in before.owned())
        _chat(env)
    finally:
        subprocess.run([sys.executable, "-m", "model_serve", "stop"], env=dict(env),
                       capture_output=True, timeout=90, cwd=env.home)
        leftovers = stack_processes_under(env.home.parent)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        assert leftovers == [], f"processes left after stop: {leftovers}"
