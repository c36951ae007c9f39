"""Memory: TTL, and unloading the least recently USED idle model, with real model servers.

Three served names on the real gemma file (base_model entries), so three llama-server
processes can be loaded at once. Where the test needs to trigger pressure on demand, it runs
the unloader's own code in-process against the running stack with a threshold of 1%.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests
from openai import OpenAI

from model_serve.config.settings import load_settings
from model_serve.runtime.activity import load_activity
from model_serve.runtime.memory import MemoryReading
from model_serve.runtime.procs import wait_until
from model_serve.runtime.unloader import PressureUnloader
from tests.conftest import Env

A, B, C = "ls/gemma-3-270m-q4_k_m", "ls/g2", "ls/g3"  # the router's ids
A_SHOWN = "ls/gemma-3:270m-q4_k_m"  # the name every command shows


def _prepare(env: Env, gemma_path, **settings: str) -> Env:
    (env.models / gemma_path.name).symlink_to(gemma_path)
    (env.home / "custom_models.yaml").write_text(
        "models:\n  g2:\n    base_model: gemma-3:270m-q4_k_m\n"
        "  g3:\n    base_model: gemma-3:270m-q4_k_m\n")
    env.update(settings)
    started = env.run("start")
    assert started.returncode == 0, started.stdout + started.stderr
    return env


@pytest.fixture
def three(env: Env, gemma_path):
    yield _prepare(env, gemma_path, MEMORY_PRESSURE_THRESHOLD="99")
    env.run("stop")


def _client(env: Env) -> OpenAI:
    return OpenAI(base_url=f"{env.base_url}/v1", api_key="x", max_retries=0)


def _states(env: Env) -> dict[str, str]:
    data = requests.get(f"{env.base_url}/models", timeout=10).json()["data"]
    return {m["id"]: m["status"]["value"] for m in data}


def _chat(env: Env, model: str) -> None:
    _client(env).chat.completions.create(model=model, max_tokens=2,
                                         messages=[{"role": "user", "content": "Hi"}])


def _decisions(env: Env) -> list[dict]:
    """The unloader's recorded decisions (it writes them just after the engine shows the unload)."""
    return load_activity(env.state / "activity.json").get("decisions", [])


def _wait(predicate, timeout: float, what: str) -> None:
    assert wait_until(predicate, timeout, 0.2), f"timed out after {timeout}s waiting for {what}"


def _pressing_unloader(env: Env) -> PressureUnloader:
    settings = load_settings(dict(env, MEMORY_PRESSURE_THRESHOLD="1", MIN_MODEL_AGE_SECONDS="0"))
    unloader = PressureUnloader(settings)
    assert unloader.refresh()
    return unloader


def test_least_recently_used_goes_first_and_the_streaming_model_stays(three: Env) -> None:
    env = three
    unloader = _pressing_unloader(env)
    for model in (A, B, C, A):  # last use: B oldest, then C, then A
        _chat(env, model)
        assert unloader.refresh()
        time.sleep(1.1)
    pieces: list[str] = []
    finish: list[str] = []

    def stream() -> None:
        chunks = _client(env).chat.completions.create(
            model=B, stream=True, max_tokens=250, extra_body={"ignore_eos": True},
            messages=[{"role": "user", "content": "Count to one thousand."}])
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            if chunk.choices and chunk.choices[0].finish_reason:
                finish.append(chunk.choices[0].finish_reason)

    streamer = threading.Thread(target=stream)
    streamer.start()
    _wait(lambda: unloader.refresh() and unloader.tracker.models[B].in_flight > 0, 30,
          "the stream to be in flight")
    unloaded = unloader.relieve("test: threshold 1%")
    streamer.join(120)
    assert unloaded == [C, A], "B is the least recently used, but it is serving a stream"
    assert finish == ["length"] and len(pieces) > 100, "the stream completed"
    assert _states(env)[B] == "loaded"
    # Each decision keeps its reason: memory, and the candidates with their idle times.
    assert [d["unloaded"] for d in unloader.decisions] == [C, A]
    first = unloader.decisions[0]
    assert [c["name"] for c in first["candidates"]] == [C, A] and first["memory_percent"] > 1


def test_recent_use_outranks_load_order(three: Env) -> None:
    env = three
    unloader = _pressing_unloader(env)
    for model in (C, B, A, C):  # loaded C first, but C was used last
        _chat(env, model)
        assert unloader.refresh()
        time.sleep(1.1)
    assert unloader.relieve("test: threshold 1%") == [B, A, C]
    assert set(_states(env).values()) == {"unloaded"}


class RecordedReadings:
    """Memory readings as a Mac gave them, one per read, the last one repeated: the kernel's
    level stays at warn for a while after an unload, whatever the unload freed."""

    def __init__(self, *readings: MemoryReading) -> None:
        self.readings = list(readings)
        self.reads = 0

    def __call__(self) -> MemoryReading:
        self.reads += 1
        return self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]


def test_the_kernel_level_unloads_one_model_per_interval_at_warn_per_check_at_critical(
        three: Env) -> None:
    env = three
    gib = 2**30
    warn = MemoryReading(32 * gib, 16 * gib, "warn")  # 50%: under the 75% line by percent
    readings = RecordedReadings(warn)
    settings = load_settings(dict(env, MEMORY_PRESSURE_THRESHOLD="75", MIN_MODEL_AGE_SECONDS="0",
                                  PRESSURE_CHECK_INTERVAL="2"))
    unloader = PressureUnloader(settings, read=readings)
    for model in (A, B, C):
        _chat(env, model)
        assert unloader.refresh()
        time.sleep(1.1)
    assert unloader.relieve("memory check") == [A], "one model for the level, not all three"
    assert readings.reads == 1, "the lagging level is not read again in the same pass"
    # A load announced right after, while the level still says warn, takes nothing more.
    assert unloader.relieve(f"load of {A}", need=gib, exclude={A}) == []
    assert unloader.decisions[-1]["trigger"] == "kernel"
    time.sleep(2.1)  # one check interval later the level may take one more
    assert unloader.relieve("memory check") == [B]
    assert _states(env) == {A: "unloaded", B: "unloaded", C: "loaded"}
    # Over the line by percent, the unloader re-reads after each unload, as on Linux.
    readings.readings = [MemoryReading(32 * gib, 28 * gib, "critical"),
                         MemoryReading(32 * gib, 20 * gib, None)]
    assert unloader.relieve("memory check") == [C]
    assert unloader.decisions[-1]["trigger"] == "percent"
    # Critical: one model at every check and load event, with no quiet period between.
    for model in (A, B, C):
        _chat(env, model)
        assert unloader.refresh()
        time.sleep(1.1)
    critical = MemoryReading(32 * gib, 16 * gib, "critical")
    readings.readings, readings.reads = [critical], 0
    assert unloader.relieve("memory check") == [A]
    assert unloader.relieve("memory check") == [B], "critical does not wait an interval"
    assert readings.reads == 2, "one read per check: the lagging level takes one model each"
    assert unloader.decisions[-1]["trigger"] == "kernel"
    readings.readings = [warn]  # back to warn: the interval since the last unload applies
    assert unloader.relieve("memory check") == []
    readings.readings = [critical]
    assert unloader.relieve(f"load of {A}", need=gib, exclude={A}) == [C]
    assert _states(env) == {A: "unloaded", B: "unloaded", C: "unloaded"}


def test_daemon_unloads_idle_models_under_pressure(env: Env, gemma_path) -> None:
    # Without the front, which would refuse the load at 1% (test_admission covers that).
    _prepare(env, gemma_path, MEMORY_PRESSURE_THRESHOLD="1", MIN_MODEL_AGE_SECONDS="2",
             PRESSURE_CHECK_INTERVAL="1", FRONT="off")
    try:
        _chat(env, A)
        _wait(lambda: _states(env)[A] == "unloaded" and _decisions(env), 20,
              "the daemon to unload the idle model and record why")
        [decision] = _decisions(env)
        assert decision["unloaded"] == A and decision["reason"] == "memory check"
        assert decision["candidates"][0]["idle_seconds"] >= 2
        log = (env.state / "logs" / "model_serve.log").read_text()
        assert f"unloading {A}" in log and "least recently used first" in log
    finally:
        env.run("stop")


def test_a_load_event_makes_room_first(env: Env, gemma_path) -> None:
    # Polling is effectively off (an hour): only the engine's load event can trigger this.
    # Without the front, which makes room before the load starts (test_admission).
    _prepare(env, gemma_path, MEMORY_PRESSURE_THRESHOLD="1", MIN_MODEL_AGE_SECONDS="0",
             PRESSURE_CHECK_INTERVAL="3600", FRONT="off")
    try:
        _chat(env, A)
        time.sleep(1.5)  # the unloader sees A loaded and idle
        _chat(env, B)
        _wait(lambda: _states(env)[A] == "unloaded" and _decisions(env), 20,
              "A to make room for B")
        assert _states(env)[B] == "loaded"
        decision = _decisions(env)[-1]
        assert decision["unloaded"] == A and decision["reason"] == f"load of {B}"
        assert decision["need_bytes"] > 250_000_000  # weights + KV cache of the gemma model
    finally:
        env.run("stop")


def test_ttl_expiry_puts_the_model_to_sleep_and_stats_shows_it(env: Env, gemma_path) -> None:
    # FRONT=off: the router's own TTL puts the model to sleep (with the front, model_serve
    # keeps the TTL: see below).
    _prepare(env, gemma_path, MODEL_TTL="2", MEMORY_PRESSURE_THRESHOLD="99", FRONT="off")
    try:
        _chat(env, A)
        loaded = json.loads(env.run("stats", "--json").stdout)
        [row] = [m for m in loaded["models"] if m["name"] == A_SHOWN]
        assert row["state"] == "loaded" and row["ttl"] == 2 and row["rss_bytes"] > 100_000_000
        assert row["predicted_tokens"] > 0
        _wait(lambda: _states(env)[A] == "sleeping", 20, "the TTL to expire")
        after = json.loads(env.run("stats", "--json").stdout)
        [row] = [m for m in after["models"] if m["name"] == A_SHOWN]
        assert row["state"] == "sleeping"
        text = env.run("stats").stdout
        assert "System Memory:" in text and "sleeping" in text
    finally:
        env.run("stop")


def test_with_kv_cache_the_ttl_saves_the_conversation_first(env: Env, gemma_path) -> None:
    """KV_CACHE=on (the default): the unloader keeps the TTL, so the slot is saved before the
    model goes, and the next request gets it back."""
    _prepare(env, gemma_path, MODEL_TTL="2", MEMORY_PRESSURE_THRESHOLD="99")
    try:
        assert "sleep-idle-seconds" not in (env.state / "models.ini").read_text()
        prompt = "".join(f"Line {i}: a lighthouse.\n" for i in range(60))
        _client(env).completions.create(model=A, prompt=prompt, max_tokens=2)
        _wait(lambda: _states(env)[A] == "unloaded", 30, "the TTL to expire")
        log = (env.state / "logs" / "model_serve.log").read_text()
        assert f"ttl: {A} idle" in log and f"saved 1 slot(s) of {A}" in log

        def unload_marks() -> list[dict]:
            marks = requests.get(f"{env.base_url}/api/model_serve/memory", timeout=10).json()
            return [m for m in marks["marks"] if m["event"] == "unload"]

        # The dashboard says why the model went (the unloader told the front).
        _wait(unload_marks, 10, "the dashboard's mark of the unload")
        [mark] = unload_marks()
        assert mark["model"] == A_SHOWN and "past its TTL (2s)" in mark["why"], mark
        reply = requests.post(f"{env.base_url}/completion", timeout=120, json={
            "model": A, "prompt": prompt + "Line 60:", "n_predict": 2}).json()
        assert reply["timings"]["cache_n"] > 300
    finally:
        env.run("stop")


def test_stats_without_a_stack(env: Env) -> None:
    result = env.run("stats")
    assert result.returncode == 3 and "not running" in result.stderr
