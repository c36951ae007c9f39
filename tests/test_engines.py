"""The same behaviour tests on both engines, real programs only: the llama-server router and
the real llama-swap (v250), each running two names of the real gemma model. Where the engines
differ by design, the test says so and checks each one's documented behaviour."""

from __future__ import annotations

import json
import os
import signal
import threading

from openai import APIError, OpenAI

from model_serve.config.settings import load_settings
from model_serve.engines import Engine, EngineModel, select_engine
from model_serve.runtime.procs import wait_until
from tests.conftest import TWIN, Env, llama_servers_under

A, B = "ls/gemma-3:270m-q4_k_m", "ls/g2"


def engine_of(env: Env) -> Engine:
    return select_engine(load_settings(dict(env)))


def models(env: Env) -> dict[str, EngineModel]:
    return {m.served_name: m for m in engine_of(env).models()}


def states(env: Env) -> dict[str, str]:
    return {name: m.state for name, m in models(env).items()}


def chat(env: Env, model: str, tokens: int = 2) -> int:
    client = OpenAI(base_url=f"{env.base_url}/v1", api_key="x", max_retries=0, timeout=120)
    reply = client.completions.create(model=model, prompt="Hello", max_tokens=tokens)
    return reply.usage.completion_tokens


def model_servers(env: Env) -> list[int]:
    import psutil

    return [pid for pid in llama_servers_under(env.home.parent)
            if "--alias" in psutil.Process(pid).cmdline()]


def test_loads_on_first_request_and_keeps_several_loaded(both: Env) -> None:
    assert states(both) == {A: "unloaded", B: "unloaded"}
    assert chat(both, A) == 2
    assert states(both) == {A: "loaded", B: "unloaded"}
    assert chat(both, B) == 2
    assert states(both) == {A: "loaded", B: "loaded"}  # no swapping
    assert len(model_servers(both)) == 2


def test_unload_one(both: Env) -> None:
    chat(both, A)
    chat(both, B)
    unloaded = both.run("unload", A)
    assert unloaded.returncode == 0 and f"unloaded: {A}" in unloaded.stdout
    assert states(both) == {A: "unloaded", B: "loaded"}
    assert len(model_servers(both)) == 1
    assert chat(both, A) == 2  # and it loads again on its next request


def test_ttl(both: Env) -> None:
    """An idle model leaves memory at its ttl: with the front model_serve unloads it on both
    engines (after saving its conversation, KV_CACHE on); with FRONT=off the router puts it
    to sleep (test_pressure.py) and llama-swap stops its process."""
    (both.home / "custom_models.yaml").write_text(TWIN + "    ttl: 2\n")
    assert both.run("sync").returncode == 0
    chat(both, A)
    chat(both, B)
    assert wait_until(lambda: states(both)[B] == "unloaded", timeout=30), states(both)
    assert states(both)[A] == "loaded"  # the default TTL, 1800 s
    assert chat(both, B) == 2  # it wakes on its next request


def test_reload_on_a_config_change(both: Env) -> None:
    """The router unloads only the model whose settings changed; llama-swap restarts every
    model on any config change (its design), so the next request of each loads it again."""
    chat(both, A)
    chat(both, B)
    (both.home / "custom_models.yaml").write_text(TWIN + "    sampler_args: '--temp 0.5'\n")
    synced = both.run("sync")
    assert synced.returncode == 0 and "reloaded" in synced.stdout, synced.stdout
    after = states(both)
    assert after[B] == "unloaded"
    assert after[A] == ("loaded" if both["ENGINE"] == "llama-server" else "unloaded")
    try:
        chat(both, A)
    except Exception:
        print(both.run("logs", "-n", "80").stdout)
        raise
    assert chat(both, A) == 2 and chat(both, B) == 2
    server = next(m for m in models(both).values() if m.served_name == B)
    assert server.state == "loaded"


def test_engine_killed_mid_request(both: Env) -> None:
    """SIGKILL of the engine while it streams: that request fails, the supervisor starts the
    engine again, no model server of the old one is left, and the next request works."""
    chat(both, A)
    old_servers = model_servers(both)
    state = json.loads((both.state / "supervisor.json").read_text())
    engine_pid = state["children"]["engine"]["pid"][0]
    failed: list[BaseException] = []

    def long_stream() -> None:
        client = OpenAI(base_url=f"{both.base_url}/v1", api_key="x", max_retries=0, timeout=60)
        try:
            for _chunk in client.completions.create(model=A, prompt="Once upon a time",
                                                    max_tokens=2000, stream=True):
                pass
        except (APIError, OSError) as exc:
            failed.append(exc)

    streamer = threading.Thread(target=long_stream)
    streamer.start()
    assert wait_until(lambda: states(both)[A] == "loaded", timeout=10)
    os.kill(engine_pid, signal.SIGKILL)
    streamer.join(timeout=90)
    assert failed, "the stream should break when its engine dies"

    def restarted() -> bool:
        current = json.loads((both.state / "supervisor.json").read_text())
        engine = current["children"]["engine"]
        return engine["state"] == "running" and engine["pid"][0] != engine_pid

    assert wait_until(restarted, timeout=60)
    assert not [pid for pid in old_servers if pid in model_servers(both)]
    assert wait_until(lambda: _answers(both), timeout=60)


def _answers(env: Env) -> bool:
    try:
        return chat(env, A) == 2
    except (APIError, OSError):
        return False


def test_fifty_requests_across_a_reload(both: Env) -> None:
    """A third model is added while 50 requests over A and B run. The router reloads without
    touching A and B, so none is lost. llama-swap stops every model on a reload and cuts what
    they were serving (its design; HTTP 5xx): only requests sent before the reload finished
    may fail, and none sent after it."""
    import time

    chat(both, A)
    chat(both, B)
    outcomes: list[tuple[float, bool]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        sent = time.monotonic()
        try:
            ok = chat(both, A if i % 2 else B, tokens=8) == 8
        except (APIError, OSError):
            ok = False
        with lock:
            outcomes.append((sent, ok))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for thread in threads[:25]:
        thread.start()
        time.sleep(0.02)
    (both.home / "custom_models.yaml").write_text(
        TWIN + "  g3:\n    base_model: gemma-3:270m-q4_k_m\n")
    synced = both.run("sync")
    reloaded_at = time.monotonic()
    assert synced.returncode == 0 and "reloaded" in synced.stdout, synced.stdout + synced.stderr
    for thread in threads[25:]:
        thread.start()
        time.sleep(0.02)
    for thread in threads:
        thread.join(timeout=300)
    assert len(outcomes) == 50
    failed = [sent for sent, ok in outcomes if not ok]
    if both["ENGINE"] == "llama-server":
        assert failed == []
    else:
        assert all(sent < reloaded_at for sent in failed), "a request after the reload failed"
    assert set(states(both)) == {A, B, "ls/g3"}


def test_pressure_unloads_the_least_recently_used_idle_model(both: Env) -> None:
    """Under pressure, idle models go least recently used first, on either engine; the least
    recent of all stays while it streams."""
    import time

    from model_serve.runtime.unloader import PressureUnloader

    (both.home / "custom_models.yaml").write_text(
        TWIN + "  g3:\n    base_model: gemma-3:270m-q4_k_m\n")
    assert both.run("sync").returncode == 0
    engine = engine_of(both)
    ids = {m.served_name: m.name for m in engine.models()}
    a, b, c = ids[A], ids[B], ids["ls/g3"]
    unloader = PressureUnloader(load_settings(dict(both, MEMORY_PRESSURE_THRESHOLD="1",
                                                   MIN_MODEL_AGE_SECONDS="0")))
    assert unloader.refresh()
    for model in (A, B, "ls/g3", A):  # last use: B oldest, then g3, then A
        chat(both, model)
        assert unloader.refresh()
        time.sleep(1.1)
    done: list[int] = []

    def stream() -> None:
        client = OpenAI(base_url=f"{both.base_url}/v1", api_key="x", max_retries=0, timeout=120)
        pieces = [chunk for chunk in client.completions.create(
            model=B, prompt="Count to one thousand:", max_tokens=250, stream=True,
            extra_body={"ignore_eos": True})]
        done.append(len(pieces))

    streamer = threading.Thread(target=stream)
    streamer.start()
    assert wait_until(lambda: unloader.refresh() and unloader.tracker.models[b].in_flight > 0,
                      timeout=30)
    unloaded = unloader.relieve("test: threshold 1%")
    streamer.join(120)
    assert unloaded == [c, a], "B is the least recently used, but it is serving a stream"
    assert done and done[0] > 100, "the stream completed"
    assert states(both)[B] == "loaded"
