"""The crash-diagnosis probe: after a model server ends when nobody asked, the model is started
alone once to see whether it crashes again. That probe is a process of the stack like any
other: recorded in the state file and ended by `model stop`; and it is not started while
memory is short, since lack of memory most likely ended the server (the probe would need the
same memory). Real router, real gemma model, real SIGKILL of its server."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
from openai import OpenAI

from model_serve.runtime.procs import wait_until
from tests.conftest import Env, llama_servers_under, running


def _load_and_kill_the_model_server(env: Env) -> int:
    client = OpenAI(base_url=env.base_url + "/v1", api_key="unused", max_retries=0)
    client.completions.create(model="ls/gemma-3:270m-q4_k_m", prompt="Hello", max_tokens=2)
    server = next(pid for pid in llama_servers_under(env.home.parent)
                  if "--alias" in psutil.Process(pid).cmdline())
    os.kill(server, signal.SIGKILL)
    return server


def _probes(env: Env) -> list[int]:
    """The probe: a llama-server at the probe's context of 256, started by this stack (it
    inherits the stack's MODEL_SERVE_HOME; its model path is the resolved file)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if "llama-server" in cmdline and "--ctx-size 256" in cmdline and \
                    proc.environ().get("MODEL_SERVE_HOME") == str(env.home):
                found.append(proc.info["pid"])
        except psutil.Error:
            continue
    return found


def test_the_probe_is_recorded_and_ends_with_the_stack(env: Env, gemma_path: Path) -> None:
    (env.models / gemma_path.name).symlink_to(gemma_path)
    with running(env):
        _load_and_kill_the_model_server(env)
        seen: list[int] = []
        assert wait_until(lambda: seen.extend(_probes(env)) or seen, 60, 0.02), \
            "no probe was started: " + env.run("logs", "-n", "60").stdout[-3000:]
        probe = seen[0]
        os.kill(probe, signal.SIGSTOP)  # a probe that hangs (a model that never answers)

        def recorded() -> bool:
            state = json.loads((env.state / "supervisor.json").read_text())
            return probe in [ref[0] for ref in state.get("model_procs") or []]

        assert wait_until(recorded, 5, 0.1, ignore=(OSError, ValueError)), \
            "the probe is not in the state file"
        began = time.monotonic()
    # running() has stopped the stack and found no process of it left, the probe included.
    assert not psutil.pid_exists(probe) or \
        psutil.Process(probe).status() == psutil.STATUS_ZOMBIE
    assert time.monotonic() - began < 30


def test_no_probe_while_memory_is_short(env: Env, gemma_path: Path) -> None:
    # Memory is over the line all along (1%). Without the front, which would not load the
    # model at all; too recent to be unloaded by the pressure unloader.
    env.update({"MEMORY_PRESSURE_THRESHOLD": "1", "FRONT": "off",
                "MIN_MODEL_AGE_SECONDS": "3600", "PRESSURE_CHECK_INTERVAL": "3600"})
    (env.models / gemma_path.name).symlink_to(gemma_path)
    exits = env.state / "model-exits.json"
    with running(env):
        _load_and_kill_the_model_server(env)
        probes: set[int] = set()
        assert wait_until(lambda: probes.update(_probes(env)) or exits.exists(), 60, 0.02), \
            env.run("logs").stdout[-2000:]
        time.sleep(1)
        probes.update(_probes(env))
        [found] = json.loads(exits.read_text()).values()
    assert not probes, "a probe was started while memory was short"
    assert "memory is short" in found["cause"] and "most likely out of memory" in \
        found["cause"], found
