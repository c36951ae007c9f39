"""The engine check: one real token from a real llama-server, the cause of a crash named, and
the safe setting used by every model server. A crash is crafted by tests/crashing_llama_server
around the real binary (it dies by SIGILL the way a native build does on an AMX Xeon VM)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from model_serve.engines.llama_server import resolve_llama_server
from tests.conftest import Env, llama_servers_under, stack_processes_under

CRASHING = Path(__file__).resolve().parent / "crashing_llama_server"


@pytest.fixture
def checked_env(env: Env, tmp_path: Path) -> Env:
    """An env whose engine-check records start empty (they are per user, in XDG_CACHE_HOME)."""
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    return env


def crashing(env: Env, *, always: bool = False) -> Env:
    env["REAL_LLAMA_SERVER"] = str(resolve_llama_server(None))
    env["LLAMA_SERVER_BIN"] = str(CRASHING)
    if always:
        env["CRASH_ALWAYS"] = "1"
    return env


def test_real_engine_computes_on_the_test_model_and_on_a_tiny_one(checked_env: Env,
                                                                   tmp_path: Path) -> None:
    real = json.loads(checked_env.run("check-engine", "--json", check=True).stdout)
    assert real["ok"] and real["options"] == {}
    assert real["model"].endswith("gemma-3-270m-q4_k_m.gguf")  # the test model is on disk
    assert real["runs"][0]["ok"] and real["runs"][0]["signal"] == ""
    # A home without the test model: a tiny model is generated, and it computes too.
    checked_env["HOME"] = str(tmp_path / "bare-home")
    tiny = json.loads(checked_env.run("check-engine", "--json", check=True).stdout)
    assert tiny["ok"] and Path(tiny["model"]).name == "engine-probe.gguf"
    assert Path(tiny["model"]).stat().st_size < 2_000_000
    records = json.loads((tmp_path / "cache" / "model_serve" / "engine-check.json").read_text())
    assert len(records) == 1  # one record per binary and CPU, the latest check


def test_a_crash_is_named_and_no_repack_is_given_to_every_model(checked_env: Env,
                                                                 gemma_path: Path) -> None:
    env = crashing(checked_env)
    checked = env.run("check-engine")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "killed by SIGILL (illegal instruction" in checked.stdout
    assert "computes only with --no-repack" in checked.stdout
    doctor = {c["name"]: c for c in json.loads(env.run("doctor", "--json").stdout)}
    assert doctor["engine computes"]["status"] == "warn"
    assert "SIGILL" in doctor["engine computes"]["detail"]

    (env.models / gemma_path.name).symlink_to(gemma_path)
    started = env.run("start")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        ini = (env.state / "models.ini").read_text()
        assert "\nrepack = false\n" in ini.split("\n[ls/", 1)[0]  # in [*], for every model
        from openai import OpenAI

        client = OpenAI(base_url=env.base_url + "/v1", api_key="unused", max_retries=0)
        name = client.models.list().data[0].id
        reply = client.completions.create(model=name, prompt="Hello", max_tokens=2)
        assert reply.usage.completion_tokens == 2
        import psutil

        argvs = [psutil.Process(pid).cmdline() for pid in llama_servers_under(env.home.parent)]
        servers = [argv for argv in argvs if "--alias" in argv]
        assert servers and all("--no-repack" in argv for argv in servers)
    finally:
        env.run("stop", timeout=60)


def test_start_refuses_an_engine_that_cannot_compute(checked_env: Env, gemma_path: Path) -> None:
    env = crashing(checked_env, always=True)
    (env.models / gemma_path.name).symlink_to(gemma_path)
    started = env.run("start")
    assert started.returncode != 0
    assert "does not compute on this machine: killed by SIGILL" in started.stderr
    assert "CMAKE_ARGS='-DGGML_NATIVE=OFF' ./install.sh" in started.stderr
    assert not (env.state / "supervisor.json").exists()
    assert stack_processes_under(env.home.parent) == []
    assert env.run("check-engine").returncode == 1
    assert os.path.islink(env.models / gemma_path.name)  # nothing of the user's touched


def test_parse_exit_lines_of_both_engines() -> None:
    from model_serve.runtime.model_exits import UNKNOWN_STATUS, parse_exit

    router = "0.05.786.389 I srv           run: instance name=ls/a-1b-q8_0 exited with status 1"
    assert parse_exit(router) == ("ls/a-1b-q8_0", 1)
    assert parse_exit(router.replace("status 1", "status 0")) is None  # asked to stop
    swap = "[WARN] <ls/a:1b-q8_0> upstream process exited unexpectedly"
    assert parse_exit(swap) == ("ls/a:1b-q8_0", UNKNOWN_STATUS)
    assert parse_exit("[INFO] <ls/a:1b-q8_0> Health check passed") is None


@pytest.mark.parametrize("engine", ["llama-server", "llama-swap"])
def test_a_model_server_killed_by_a_signal_is_reported_in_logs_and_stats(
        checked_env: Env, gemma_path: Path, tmp_path: Path, engine: str) -> None:
    """Neither engine says which signal ended a model server ("exited with status 1",
    "upstream process exited unexpectedly"); the model started alone shows it."""
    env = crashing(checked_env)
    if engine == "llama-swap":
        from tests.test_llama_swap import llama_swap_binary, port_block

        env.port = port_block()
        env.update({"ENGINE": "llama-swap", "LLAMA_SWAP_BIN": str(llama_swap_binary(tmp_path)),
                    "LLAMA_SWAP_PORT": str(env.port), "DEFAULT_CTX_SIZE": "2048"})
    marker = tmp_path / "crash-now"
    env["CRASH_MARKER"] = str(marker)  # the engine computes at start; the crash comes later
    (env.models / gemma_path.name).symlink_to(gemma_path)
    assert env.run("start").returncode == 0
    try:
        from openai import OpenAI

        client = OpenAI(base_url=env.base_url + "/v1", api_key="unused", max_retries=0)
        name = client.models.list().data[0].id
        client.completions.create(model=name, prompt="Hello", max_tokens=2)
        import psutil

        server = next(pid for pid in llama_servers_under(env.home.parent)
                      if "--alias" in psutil.Process(pid).cmdline())
        marker.touch()
        os.kill(server, 4)  # SIGILL, as the AMX kernels raise it
        exits = env.state / "model-exits.json"
        from model_serve.runtime.procs import wait_until

        assert wait_until(exits.exists, timeout=60), env.run("logs").stdout
        logs = env.run("logs", "-n", "400").stdout
        # All the engine itself knows:
        assert ("exited with status 1" if engine == "llama-server"
                else "upstream process exited unexpectedly") in logs
        assert "killed by SIGILL (illegal instruction" in logs
        stats = json.loads(env.run("stats", "--json", check=True).stdout)
        model = next(m for m in stats["models"] if ":" in m["name"])
        assert model["state"] == "crashed (SIGILL)", model
        assert "SIGILL" in model["last_exit"]
        assert "last ended when not asked to: killed by SIGILL" in env.run("stats").stdout
    finally:
        env.run("stop", timeout=60)
