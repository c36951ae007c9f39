"""Room before a load, on the real router with three names of the real gemma model: with a
threshold where two of them fit, alternating requests over the three never have three in
memory at once, and none fails. The reference, in the same test: without the front (today's
reactive unloader, which acts on the engine's `loading` event) the third load starts first.

Each model's share of memory is measured first on this machine (what its model server holds:
a 32k context with a full sliding-window cache, a KV cache of about 580 MiB each), and the
threshold is set between "two loaded plus one estimate" and "three loaded"."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import psutil
import pytest
import requests
from openai import OpenAI

from model_serve.config.settings import load_settings
from model_serve.runtime.memory import read_stack_memory
from tests.conftest import Env, models_in_memory, most_at_once, running

# Both tests set thresholds from what the whole machine uses: under pytest -n, models that
# other tests load meanwhile would move the line.
pytestmark = pytest.mark.alone

NAMES = ("ls/gemma-3:270m-q4_k_m", "ls/g2", "ls/g3")
THREE = ("models:\n"
         "  gemma-3:270m-q4_k_m:\n    sampler_args: \"--swa-full\"\n"
         "  g2:\n    base_model: gemma-3:270m-q4_k_m\n    sampler_args: \"--swa-full\"\n"
         "  g3:\n    base_model: gemma-3:270m-q4_k_m\n    sampler_args: \"--swa-full\"\n")


def used() -> int:
    memory = psutil.virtual_memory()
    return memory.total - memory.available


def ask(env: Env, name: str) -> None:
    client = OpenAI(base_url=f"{env.base_url}/v1", api_key="x", max_retries=0, timeout=300)
    reply = client.completions.create(model=name, prompt="Hi", max_tokens=1)
    assert reply.usage.completion_tokens == 1


def in_memory(env: Env) -> int:
    return models_in_memory(env)


def most_loaded_at_once(env: Env) -> contextlib.AbstractContextManager[list[int]]:
    """Sample the engine every 50 ms; the most models in memory at once so far."""
    return most_at_once(lambda: in_memory(env), 0.05,
                        (requests.RequestException, ValueError, KeyError))


def settled_used(limit: float = 10) -> int:
    """Memory in use once it stops moving (a stack stopped just before still frees its
    memory for a moment): two samples 0.25 s apart within 16 MiB, or the last after `limit`."""
    last = used()
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = used()
        if abs(now - last) < 16 * 2**20:
            return now
        last = now
    return last


def measure(env: Env) -> tuple[int, int]:
    """What one model takes in memory here once loaded, and its estimate (bytes): what its
    model server holds of its own (not the whole machine's memory, which other programs move
    meanwhile)."""
    with running(env):
        listed = json.loads(env.run("list", "--json").stdout)
        estimate = max(m["estimated_bytes"] for m in listed)
        ask(env, NAMES[0])
        settled_used()
        one = read_stack_memory(load_settings(dict(env)).pid_file).servers_bytes
    assert one > 400 * 2**20, f"a model took only {one / 2**20:.0f} MiB: the test needs more"
    settled_used()  # the stack stopped just before gives its memory back
    return one, estimate


def percent(line: float) -> str:
    return f"{100 * line / psutil.virtual_memory().total:.2f}"


def prepare(env: Env, gemma_path: Path) -> None:
    (env.models / gemma_path.name).symlink_to(gemma_path)
    (env.home / "custom_models.yaml").write_text(THREE)
    env.update({"DEFAULT_CTX_SIZE": "32768", "MIN_MODEL_AGE_SECONDS": "0",
                "PRESSURE_CHECK_INTERVAL": "3600", "MEMORY_PRESSURE_THRESHOLD": "99"})


def test_the_front_makes_room_before_a_load(engine_env: Env, gemma_path: Path) -> None:
    env = engine_env
    prepare(env, gemma_path)
    one, estimate = measure(env)

    def threshold(each: int) -> str:
        # Two loaded and one more estimate fit; three loaded do not.
        return percent(used() + 1.5 * each + estimate)

    # Admission counts a model at least at its estimate until the reading shows it, so two
    # fit and three do not when each counts as the larger of what it takes and its estimate.
    env.update({"MEMORY_PRESSURE_THRESHOLD": threshold(max(one, estimate))})
    with running(env), most_loaded_at_once(env) as most:
        for name in NAMES * 2:
            ask(env, name)  # back to back: a model just loaded has not touched its memory yet
        log = (env.state / "logs" / "model_serve.log").read_text(errors="replace")
    print(f"one model: {one / 2**20:.0f} MiB, estimate {estimate / 2**20:.0f} MiB; "
          f"threshold {env['MEMORY_PRESSURE_THRESHOLD']}%; at once: {most[0]}")
    assert most[0] == 2, f"{most[0]} models were in memory at once"
    assert "admission:" in log and "unloading" in log

    # The reference: the same requests without the front, where the unloader only reacts to
    # the engine's announcement that the third model is loading.
    env.update({"FRONT": "off", "MEMORY_PRESSURE_THRESHOLD": threshold(one)})
    with running(env), most_loaded_at_once(env) as reference:
        for name in NAMES:
            ask(env, name)
    assert reference[0] == 3, "without the front the third load starts before any room is made"


def test_no_room_means_a_clear_503_never_a_load(env: Env, gemma_path: Path) -> None:
    """One model fits. While it serves a request, a second one waits LOAD_QUEUE_TIMEOUT, then
    gets 503 with Retry-After and the reason; it is never loaded. Memory other programs use
    makes a request wait too; a model whose estimate alone crosses the line is refused at
    once."""
    prepare(env, gemma_path)
    one, estimate = measure(env)
    env.update({"MEMORY_PRESSURE_THRESHOLD": percent(used() + 0.5 * one + estimate),
                "LOAD_QUEUE_TIMEOUT": "3"})
    with running(env), most_loaded_at_once(env) as most:
        busy = requests.post(f"{env.base_url}/v1/completions", stream=True, timeout=120,
                             json={"model": NAMES[0], "prompt": "Count:", "stream": True,
                                   "max_tokens": 3000, "ignore_eos": True})
        lines = busy.iter_lines()
        next(lines)  # the first model is loaded and generating
        asked = time.monotonic()
        answer = requests.post(f"{env.base_url}/v1/completions", timeout=60,
                               json={"model": NAMES[1], "prompt": "Hi", "max_tokens": 1})
        waited = time.monotonic() - asked
        busy.close()
        assert answer.status_code == 503
        assert int(answer.headers["Retry-After"]) > 0
        error = answer.json()["error"]
        assert error["type"] == "no_memory_for_model" and NAMES[1].replace(":", "-") in \
            error["message"] and "busy" in error["message"], error
        assert waited >= 3
    assert most[0] == 1

    # Memory others use leaves no room, though the model alone would fit: the request waits
    # LOAD_QUEUE_TIMEOUT (others may free it), then 503, never a load.
    env.update({"MEMORY_PRESSURE_THRESHOLD": percent(used() + estimate / 2)})
    with running(env):
        asked = time.monotonic()
        answer = requests.post(f"{env.base_url}/v1/completions", timeout=60,
                               json={"model": NAMES[0], "prompt": "Hi", "max_tokens": 1})
        assert answer.status_code == 503 and "other programs" in \
            answer.json()["error"]["message"], answer.text[:300]
        assert time.monotonic() - asked >= 3
        assert in_memory(env) == 0
    # A model whose estimate alone crosses the line does not fit: said at once.
    env.update({"MEMORY_PRESSURE_THRESHOLD": "1"})  # the model alone takes over 1%
    with running(env):
        asked = time.monotonic()
        answer = requests.post(f"{env.base_url}/v1/completions", timeout=60,
                               json={"model": NAMES[0], "prompt": "Hi", "max_tokens": 1})
        assert answer.status_code == 503 and "does not fit" in answer.json()["error"]["message"]
        assert time.monotonic() - asked < 3
        assert in_memory(env) == 0


def test_requests_that_arrive_during_a_load_share_it(env: Env, gemma_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    prepare(env, gemma_path)
    with running(env):
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: ask(env, NAMES[1]), range(4)))  # each asserts its reply
        log = (env.state / "logs" / "model_serve.log").read_text(errors="replace")
    assert log.count("spawning server instance with name=ls/g2 ") == 1


def test_a_name_a_sync_just_removed_gets_the_engines_answer_at_once(env: Env,
                                                                    gemma_path: Path) -> None:
    """Right after a sync removes a model, the front may still know the name for up to 2 s;
    the engine no longer lists it, so the request gets the engine's own 4xx, not a wait for a
    load that cannot happen."""
    prepare(env, gemma_path)
    with running(env):
        ask(env, NAMES[2])
        (env.home / "custom_models.yaml").write_text(THREE.split("  g3:")[0])
        assert env.run("sync").returncode == 0
        asked = time.monotonic()
        answer = requests.post(f"{env.base_url}/v1/completions", timeout=60,
                               json={"model": NAMES[2], "prompt": "Hi", "max_tokens": 1})
        assert 400 <= answer.status_code < 500, answer.text[:200]
        assert time.monotonic() - asked < 10
