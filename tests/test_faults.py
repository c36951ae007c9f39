"""Fault tolerance with real processes: kill things and see the stack recover, leaving nothing
behind."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import psutil
import pytest
import requests
from openai import APIError, OpenAI

from model_serve.config.settings import load_settings
from model_serve.runtime.procs import wait_until
from model_serve.runtime.state import read_state
from tests import ollama_store
from tests.conftest import Env, llama_servers_under, stack_processes_under

A, B = "ls/gemma-3-270m-q4_k_m", "ls/g2"


@pytest.fixture
def two(env: Env, gemma_path):
    (env.models / gemma_path.name).symlink_to(gemma_path)
    (env.home / "custom_models.yaml").write_text(
        "models:\n  g2:\n    base_model: gemma-3:270m-q4_k_m\n")
    yield env
    env.run("stop", timeout=90)
    assert stack_processes_under(env.home.parent) == []


def _start(env: Env, **settings: str) -> None:
    env.update(settings)
    started = env.run("start")
    assert started.returncode == 0, started.stdout + started.stderr


def _client(env: Env) -> OpenAI:
    return OpenAI(base_url=f"{env.base_url}/v1", api_key="x", max_retries=0, timeout=120)


def _chat(env: Env, model: str, tokens: int = 2) -> str:
    reply = _client(env).chat.completions.create(
        model=model, max_tokens=tokens, messages=[{"role": "user", "content": "Hi"}])
    return reply.choices[0].finish_reason


def _model_pid(env: Env, model: str) -> int:
    data = requests.get(f"{env.base_url}/models", timeout=10).json()["data"]
    args = next(m for m in data if m["id"] == model)["status"]["args"]
    port = args[args.index("--port") + 1]
    for pid in llama_servers_under(env.home.parent):
        if f"--port {port}" in " ".join(psutil.Process(pid).cmdline()):
            return pid
    raise AssertionError(f"no process for {model}")


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed process whose parent is gone may wait to be reaped)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait(predicate, timeout: float, what: str) -> None:
    # The engine may refuse for a moment while it recovers.
    assert wait_until(predicate, timeout, 0.2,
                      ignore=(requests.RequestException, OSError, APIError)), \
        f"timed out after {timeout}s waiting for {what}"


def _engine_pid(env: Env) -> int:
    """The engine's pid, 0 while it is between restarts."""
    state = read_state(load_settings(dict(env)).pid_file)
    ref = state.child("engine").pid if state else None
    return ref.pid if ref else 0


def test_model_server_killed_mid_request(two: Env) -> None:
    _start(two)
    _chat(two, A)
    errors: list[Exception] = []

    def long_request() -> None:
        try:
            _client(two).chat.completions.create(
                model=A, max_tokens=400, extra_body={"ignore_eos": True},
                messages=[{"role": "user", "content": "Write a long story."}])
        except Exception as exc:  # noqa: BLE001 - the failure is what we expect
            errors.append(exc)

    worker = threading.Thread(target=long_request)
    worker.start()
    time.sleep(1.5)
    killed = _model_pid(two, A)
    os.kill(killed, signal.SIGKILL)
    worker.join(120)
    # The model died before any byte of its answer: the front sends the request again, once,
    # through the router, which loads the model again; the client sees nothing of it.
    assert not errors, errors
    assert _model_pid(two, A) not in (0, killed)
    # The next request to that model succeeds too.
    _wait(lambda: _chat(two, A) in ("length", "stop"), 60, "the model to serve again")


def test_engine_killed_is_restarted_without_orphans(two: Env) -> None:
    _start(two)
    _chat(two, A)
    _chat(two, B)
    engine = _engine_pid(two)
    model_pids = [_model_pid(two, A), _model_pid(two, B)]
    settings = load_settings(dict(two))
    # The supervisor records its model servers about once a second; it must know both.
    _wait(lambda: set(model_pids) <= {r.pid for r in read_state(settings.pid_file).model_procs},
          15,
          "both model servers to be recorded")
    os.kill(engine, signal.SIGKILL)
    _wait(lambda: _engine_pid(two) not in (0, engine) and requests.get(
        f"{two.base_url}/health", timeout=1).status_code == 200, 20, "the engine restart")
    _wait(lambda: not any(_running(p) for p in model_pids), 20,
          "the orphaned model servers to end")
    status = json.loads(two.run("status", "--json").stdout)
    assert status["children"]["engine"]["restarts"] >= 1
    assert _chat(two, A) in ("length", "stop")


def test_supervisor_killed_then_start_recovers(two: Env) -> None:
    _start(two)
    _chat(two, A)
    settings = load_settings(dict(two))
    # The supervisor records its model servers about once a second.
    _wait(lambda: read_state(settings.pid_file).model_procs, 15,
          "the model server to be recorded")
    state = read_state(settings.pid_file)
    os.kill(state.pid.pid, signal.SIGKILL)
    status = two.run("status")
    assert status.returncode == 3 and "died" in status.stdout
    # Its children end with it (the orphan guard; tests/test_hardening.py times that), and
    # whatever would be left, start cleans up.
    restarted = two.run("start")
    assert restarted.returncode == 0, restarted.stderr
    old = [ref.pid for ref in state.owned()[1:]]  # all but the supervisor itself
    assert len(old) >= 3  # engine, unloader, the model's server
    assert not any(_running(p) for p in old)
    assert _chat(two, A) in ("length", "stop")


def test_corrupt_engine_config_is_restored_and_serving_continues(two: Env) -> None:
    _start(two, BRIDGE_SYNC_INTERVAL="1")
    _chat(two, A)
    ini = two.state / "models.ini"
    good = ini.read_text()
    ini.write_text("[broken\nthis is not a preset file\n")
    _wait(lambda: ini.read_text() == good, 15, "the sync loop to restore models.ini")
    assert _chat(two, A) in ("length", "stop")
    assert _chat(two, B) in ("length", "stop")


def test_fifty_concurrent_requests_while_the_config_reloads(two: Env) -> None:
    _start(two, BRIDGE_SYNC_INTERVAL="1")
    _chat(two, A)
    _chat(two, B)
    stop = threading.Event()

    def churn() -> None:  # a new model every half second, so every sync reloads the router
        for n in range(10_000):
            if stop.wait(0.5):
                return
            for old in two.models.glob("extra-*.gguf"):
                old.unlink()
            (two.models / f"extra-{n}.gguf").write_bytes(
                ollama_store.gguf_bytes(extra={"general.basename": f"extra{n}"}))

    results: list[str] = []
    failures: list[Exception] = []
    lock = threading.Lock()

    def request(i: int) -> None:
        try:
            reason = _chat(two, A if i % 2 else B, tokens=16)
            with lock:
                results.append(reason)
        except Exception as exc:  # noqa: BLE001 - counted below
            with lock:
                failures.append(exc)

    churner = threading.Thread(target=churn)
    churner.start()
    workers = [threading.Thread(target=request, args=(i,)) for i in range(50)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(300)
    stop.set()
    churner.join()
    log = (two.state / "logs" / "model_serve.log").read_text()
    assert log.count("engine reloaded") >= 2, "the config really changed during the burst"
    assert failures == [] and len(results) == 50


def test_model_server_killed_mid_request_on_llama_swap(env: Env, gemma_path,
                                                       tmp_path) -> None:
    """llama-swap answers 502 when a model's server ends under a request before any byte of
    its answer; the front sends the request again once (through admission), as on the
    router: the client sees a 200."""
    from tests.test_llama_swap import llama_swap_binary, port_block

    env.port = port_block()
    env.update({"ENGINE": "llama-swap", "LLAMA_SWAP_BIN": str(llama_swap_binary(tmp_path)),
                "LLAMA_SWAP_PORT": str(env.port)})
    (env.models / gemma_path.name).symlink_to(gemma_path)
    _start(env)
    try:
        name = "ls/gemma-3:270m-q4_k_m"
        _chat(env, name)
        [killed] = llama_servers_under(env.home.parent)
        errors: list[Exception] = []

        def long_request() -> None:
            try:
                _client(env).chat.completions.create(
                    model=name, max_tokens=400, extra_body={"ignore_eos": True},
                    messages=[{"role": "user", "content": "Write a long story."}])
            except Exception as exc:  # noqa: BLE001 - the failure is what the test looks for
                errors.append(exc)

        worker = threading.Thread(target=long_request)
        worker.start()
        time.sleep(1.5)
        os.kill(killed, signal.SIGKILL)
        worker.join(120)
        assert not errors, errors
        assert [p for p in llama_servers_under(env.home.parent) if p != killed]
        log = (env.state / "logs" / "model_serve.log").read_text(errors="replace")
        assert "sending the request again once" in log
    finally:
        env.run("stop", timeout=90)
        assert stack_processes_under(env.home.parent) == []
