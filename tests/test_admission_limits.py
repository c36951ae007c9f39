"""Admission at the edge of memory and under a crowd, on both real engines with three names of
the real gemma model:

- through the port: at most LOAD_QUEUE_MAX requests wait for a load, the next gets HTTP 429
  with Retry-After at once; a client that leaves while its model loads does not let a second
  load start beside the first (one admission at a time);
- admission's own code in-process against the running engine, with the memory reading of an
  OS that gives an ended model server's memory back a moment after the engine lists it gone
  (`LaggingMemory`): it unloads the least recently used model only, not every loaded one; a
  reading high while no model of ours is loaded makes a request wait, not "it does not fit",
  which comes at once only for a model whose estimate alone crosses the line; the 503 comes
  LOAD_QUEUE_TIMEOUT after the request came, whatever it waited behind.
"""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import AbstractContextManager, suppress
from pathlib import Path

import requests

from model_serve.config.settings import load_settings
from model_serve.engines import Engine, select_engine
from model_serve.engines.base import LOADED_STATES
from model_serve.errors import ModelServeError
from model_serve.runtime.admission import Admission, Refusal
from model_serve.runtime.engine_view import EngineView
from model_serve.runtime.memory import MemoryReading, StackMemory
from model_serve.runtime.procs import wait_until
from tests.conftest import Env, most_at_once, running

NAMES = ("ls/gemma-3:270m-q4_k_m", "ls/g2", "ls/g3")
THREE = ("models:\n  g2:\n    base_model: gemma-3:270m-q4_k_m\n"
         "  g3:\n    base_model: gemma-3:270m-q4_k_m\n")
GIB = 2**30
LAG = 1.5  # seconds the OS stand-in takes to show an ended model server's memory as free


def engine_of(env: Env, **overrides: str) -> Engine:
    return select_engine(load_settings(dict(env, **overrides)))


def states(engine: Engine) -> dict[str, str]:
    return {m.name: m.state for m in engine.models()}


class LaggingMemory:
    """The memory reading of a machine where each of our models in memory takes PER bytes on
    top of BASE, and an ended model server's memory shows as free LAG seconds after the
    engine first lists it gone (as a real reading may: the engine answers before the OS has
    the pages back). A stand-in for the OS, read through the real engine's model list."""

    TOTAL, BASE, PER = 100 * GIB, 10 * GIB, 30 * GIB

    def __init__(self, engine: Engine, base: int = BASE) -> None:
        self.engine = engine
        self.base = base
        self.seen: set[str] = set()
        self.left: dict[str, float] = {}  # model -> when it was first seen gone

    def __call__(self) -> MemoryReading:
        return MemoryReading(self.TOTAL, self.base + self.stack().servers_bytes)

    def stack(self) -> StackMemory:
        """The model servers as the same stand-in has them: one per model in memory, and one
        per ended model whose memory is not free yet (its process still exiting)."""
        now = time.monotonic()
        present = {m.name for m in self.engine.models() if m.state in LOADED_STATES}
        for name in self.seen - present:
            self.left[name] = now
        self.seen = present
        lagging = [n for n, t in self.left.items() if n not in present and now - t < LAG]
        servers = len(present) + len(lagging)
        return StackMemory(servers, self.PER * servers, self.PER * servers)


def most_loading_at_once(engine: Engine) -> AbstractContextManager[list[int]]:
    return most_at_once(lambda: sum(s == "loading" for s in states(engine).values()), 0.02,
                        (ModelServeError,))


def post(env: Env, model: str, timeout: float = 120) -> requests.Response:
    return requests.post(f"{env.base_url}/v1/completions", timeout=timeout,
                         json={"model": model, "prompt": "Hi", "max_tokens": 1})


def through_the_port(env: Env, engine: Engine, ids: list[str]) -> None:
    a, b, c = ids
    # LOAD_QUEUE_MAX=1: while A's request is inside admission (loading), B's is refused.
    first: list[int] = []
    asking = threading.Thread(target=lambda: first.append(post(env, NAMES[0]).status_code))
    asking.start()
    assert wait_until(lambda: states(engine)[a] in ("loading", "loaded"), 30, interval=0.01)
    refused = post(env, NAMES[1], timeout=30)
    asking.join(120)
    assert first == [200]
    assert refused.status_code == 429, refused.text[:300]
    assert int(refused.headers["Retry-After"]) > 0
    assert "LOAD_QUEUE_MAX" in refused.json()["error"]["message"]
    log = env.state / "logs" / "model_serve.log"
    assert wait_until(lambda: "refused with HTTP 429: " in log.read_text(), 5, interval=0.1)
    assert states(engine)[b] == "unloaded"

    # A client that gives up while its model loads: the next load waits for that one.
    with most_loading_at_once(engine) as most:
        with suppress(requests.RequestException):
            post(env, NAMES[2], timeout=0.3)
        assert states(engine)[c] == "loading", "the test needs C still loading here"
        assert post(env, NAMES[1]).status_code == 200
    assert most[0] == 1, "a second load started beside the one its client left"
    assert wait_until(lambda: states(engine)[c] == "loaded", 60, interval=0.1)


async def in_process(env: Env, engine: Engine, ids: list[str]) -> None:
    a, b, c = ids
    for name in ids:
        if states(engine)[name] in LOADED_STATES:
            engine.unload(name)
            assert engine.wait_unloaded(name, 30)
    for name in (a, b):
        assert engine.load(name, 120)
    settings = load_settings(dict(env, MEMORY_PRESSURE_THRESHOLD="75",
                                  MIN_MODEL_AGE_SECONDS="0", LOAD_QUEUE_TIMEOUT="2",
                                  LOAD_QUEUE_MAX="8"))
    used = {a: (0, time.time() - 100), b: (0, time.time() - 50), c: (0, 0.0)}
    memory = LaggingMemory(engine)
    admission = Admission(settings, engine, EngineView(engine), lambda m: used[m],
                          read=memory, stack_memory=lambda: admission.read.stack())
    admission.footprints.update({name: LaggingMemory.PER for name in ids})

    # A and B loaded (70%), C needs 30%: A (used least recently) goes, and nothing else.
    assert await admission.admit(c, LaggingMemory.PER) is None
    assert states(engine) == {a: "unloaded", b: "loaded", c: "loaded"}, \
        "the memory of the model just unloaded was not back yet: B went too"

    # A model whose estimate alone crosses the line does not fit: said at once.
    asked = time.monotonic()
    refusal = await admission.admit(a, 80 * GIB)
    assert isinstance(refusal, Refusal) and "does not fit" in refusal.message, refusal
    assert time.monotonic() - asked < 1.5 and states(engine)[a] == "unloaded"

    # No model of ours loaded, and the reading high for a moment (memory not given back yet):
    # the request waits for it, and its model loads.
    for name in (b, c):
        engine.unload(name)
        assert engine.wait_unloaded(name, 30)
    memory.left = {"a model just ended": time.monotonic(), "and another": time.monotonic()}
    assert await admission.admit(a, LaggingMemory.PER) is None
    assert states(engine)[a] == "loaded"

    # The 503 comes LOAD_QUEUE_TIMEOUT (2 s) after the request came, lock wait included: B
    # comes 1 s after C, which holds the lock for its own 2 s (A is busy, 95% in use).
    used[a] = (1, time.time())
    admission.read = LaggingMemory(engine, base=65 * GIB)
    started = time.monotonic()

    async def timed(model: str, after: float) -> float:
        await asyncio.sleep(after)
        refused = await admission.admit(model, LaggingMemory.PER)
        assert isinstance(refused, Refusal) and refused.status == 503, refused
        return time.monotonic() - started - after

    waited = await asyncio.gather(timed(c, 0), timed(b, 1.0))
    assert waited[0] >= 2 and waited[1] < 2.9, waited  # not 2 s after C's refusal


def test_admission_limits(engine_env: Env, gemma_path: Path) -> None:
    env = engine_env
    (env.models / gemma_path.name).symlink_to(gemma_path)
    (env.home / "custom_models.yaml").write_text(THREE)
    env.update({"LOAD_QUEUE_MAX": "1", "MEMORY_PRESSURE_THRESHOLD": "99",
                "MIN_MODEL_AGE_SECONDS": "0", "PRESSURE_CHECK_INTERVAL": "3600"})
    with running(env, stop_timeout=90):
        engine = engine_of(env)
        ids = [engine.model_id(name) for name in NAMES]
        assert set(states(engine)) == set(ids)
        through_the_port(env, engine, ids)
        asyncio.run(in_process(env, engine, ids))
