"""A config change that comes while a model loads loses no request and wedges no load, on both
engines: the request inside admission counts for the sync's hold, so the reload waits for it,
and a load a reload cuts anyway ends the wait at once instead of holding every other load. A
server a reload stops on purpose is never reported as a crash."""

from __future__ import annotations

import threading
import time

import requests

from model_serve.config.settings import load_settings
from model_serve.engines import select_engine
from model_serve.runtime.procs import wait_until
from tests.conftest import TWIN, Env
from tests.test_engines import states

A, B = "ls/gemma-3:270m-q4_k_m", "ls/g2"


def test_a_sync_during_a_load(both: Env) -> None:
    assert states(both) == {A: "unloaded", B: "unloaded"}
    answers: dict[str, tuple[int, float]] = {}

    def ask(model: str) -> None:
        started = time.monotonic()
        try:
            status = requests.post(f"{both.base_url}/v1/completions", timeout=100, json={
                "model": model, "prompt": "Hello", "max_tokens": 2}).status_code
        except requests.RequestException:
            status = 0
        answers[model] = (status, time.monotonic() - started)

    loading = threading.Thread(target=ask, args=(B,))
    loading.start()
    assert wait_until(lambda: states(both)[B] in ("loading", "loaded"), 10, interval=0.02)
    # B's settings change while it loads; A is asked for meanwhile.
    (both.home / "custom_models.yaml").write_text(TWIN + "    sampler_args: '--temp 0.5'\n")
    syncing = threading.Thread(target=lambda: answers.setdefault(
        "sync", (both.run("sync", timeout=120).returncode, 0.0)))
    syncing.start()
    time.sleep(0.3)
    other = threading.Thread(target=ask, args=(A,))
    other.start()
    for thread in (loading, syncing, other):
        thread.join(timeout=120)
    assert answers["sync"][0] == 0
    assert answers[B][0] == 200, answers
    assert answers[A][0] == 200, answers
    assert answers[B][1] < 60 and answers[A][1] < 60, answers  # no wait behind a cut load
    # And the next request for B runs with its new settings.
    again = requests.post(f"{both.base_url}/v1/completions", timeout=100,
                          json={"model": B, "prompt": "Hello", "max_tokens": 2})
    assert again.status_code == 200

    # A load the front did not start (straight to the engine) is cut by the next reload: its
    # server ends because model_serve stopped it, which is never reported as a crash.
    engine = select_engine(load_settings(dict(both)))
    b_id = engine.model_id(B)
    engine.unload(b_id)
    assert engine.wait_unloaded(b_id, 30)
    loading = threading.Thread(target=lambda: engine.load(b_id, 60))
    loading.start()
    assert wait_until(lambda: states(both)[B] == "loading", 10, interval=0.01)
    (both.home / "custom_models.yaml").write_text(TWIN + "    sampler_args: '--temp 0.7'\n")
    assert both.run("sync", timeout=120).returncode == 0
    loading.join(60)
    log = both.state / "logs" / "model_serve.log"
    if both["ENGINE"] == "llama-server":  # the router reports the cut load's exit status
        assert wait_until(lambda: "ended as model_serve stopped it" in log.read_text(), 20,
                          interval=0.2), "the stopped server's exit was not seen as intended"
    time.sleep(1)
    assert "its server exited" not in log.read_text()
    assert not (both.state / "model-exits.json").exists()
    assert "crashed" not in both.run("stats").stdout


def test_an_unload_decided_on_old_activity_cuts_no_request(both: Env) -> None:
    """The pressure unloader judged A idle on its last read of activity; a stream for A
    starts before its unload: the unload goes through the front, which sees the stream, and
    leaves A alone. The stream ends whole."""
    from openai import OpenAI

    from model_serve.runtime.unloader import PressureUnloader

    client = OpenAI(base_url=f"{both.base_url}/v1", api_key="x", max_retries=0, timeout=120)
    client.completions.create(model=A, prompt="Hi", max_tokens=1)
    unloader = PressureUnloader(load_settings(dict(both, MIN_MODEL_AGE_SECONDS="0")))
    assert unloader.refresh()
    judged = next(a for a in unloader.tracker.models.values()
                  if a.name == unloader.engine.model_id(A))
    assert judged.in_flight == 0
    stream = client.completions.create(model=A, prompt="Count:", max_tokens=200, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)  # generating
    assert unloader._unload(judged, 0) is False
    finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    assert finish == ["length"]
    assert states(both)[A] == "loaded"
    # Idle again, the same unload goes ahead.
    assert unloader._unload(judged, 0) is True
    assert states(both)[A] == "unloaded"
