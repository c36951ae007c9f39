"""Room before a load: the front holds a request for a model that is not in memory, unloads
least-recently-used idle models until memory in use plus the model's footprint (weights + KV
cache at its context, from the GGUF header) is under MEMORY_PRESSURE_THRESHOLD, and only then
starts the load.

- One admission at a time: two loads cannot both count the same free memory. A load is
  finished before the next admission reads memory, even when the client that asked for it
  has gone (the work holds the lock, not the request).
- After an unload, memory is read again until it shows the model gone (it dropped by most of
  the model's estimate, or the load fits), within MEMORY_BACK_WAIT, as Ollama does after an
  eviction: the engine lists a model as gone before the OS has its memory back, and a reading
  taken then would unload one model too many.
- Requests for a model that is loading are all served by that one load.
- A model with a request in flight, used within MIN_MODEL_AGE_SECONDS, or being unloaded is
  never chosen. When no room can be made, the request waits; LOAD_QUEUE_TIMEOUT after it came
  to admission it gets HTTP 503 with Retry-After. At most LOAD_QUEUE_MAX requests wait at once;
  the next gets HTTP 429. A load that would cross the line is never started.
- "It does not fit" at once only for a model whose estimate alone crosses the line, every
  other model gone: what a reading shows besides our models (another app, memory an unload has
  not given back yet) may go away, so such a request waits like one for a busy model.
- A model whose load failed is refused at once, with the cause, during a backoff
  (runtime/load_failures.py): its requests never wait for the lock again meanwhile.
- Memory others take (other apps) is still the pressure unloader's job (polls and load events).
- A model on RPC workers (custom_models.yaml rpc:) counts only its local share
  (models/footprint.py), and is refused at once with a 503 naming a worker that does not
  accept a connection (runtime/rpc_reach.py).
- On Apple Silicon the loaded models' footprints together also stay under Metal's working-set
  limit (engines/metal.py), which llama-server checks per process only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from model_serve.config.settings import Settings
from model_serve.engines.base import LOADED_STATES, Engine, EngineModel
from model_serve.engines.metal import (
    GpuLimit,
    GpuShortfall,
    gpu_shortfall,
    held_by_others,
    read_gpu_limit,
)
from model_serve.engines.slot_cache import Restored
from model_serve.errors import ModelServeError
from model_serve.runtime import rpc_reach
from model_serve.runtime.engine_calls import engine_call
from model_serve.runtime.engine_view import EngineView
from model_serve.runtime.load_failures import LoadFailures
from model_serve.runtime.memory import (
    MemoryReading,
    StackMemory,
    read_memory,
    read_stack_memory,
)
from model_serve.runtime.settling import Settling

log = logging.getLogger("model_serve.front")

QUEUE_POLL = 0.5  # seconds between attempts while no room can be made
UNLOAD_WAIT = 30.0  # seconds an unloaded model gets to leave memory
MEMORY_BACK_WAIT = 5.0  # ... and then to show as free in the memory reading
MEMORY_BACK_SHARE = 0.75  # of its estimate: the part of an unloaded model's memory awaited
MEMORY_POLL = 0.1  # seconds between readings while the memory comes back
QUEUE_FULL_RETRY = 5  # Retry-After of a request refused because LOAD_QUEUE_MAX wait already
LOAD_WAIT = 300.0  # seconds a load may take
REFUSED_BACKOFF = 60.0  # a model that refused to unload is not chosen again for this long
GIB = 2**30
FAILED_KIND = "model_load_failed"


@dataclass
class Refusal:
    """Why a request could not be admitted (the front answers 503 with it)."""

    message: str
    retry_after: int
    status: int = 503
    kind: str = ""  # the error's type, when not the queue's or memory's


class Admission:
    def __init__(self, settings: Settings, engine: Engine, view: EngineView,
                 usage: Callable[[str], tuple[int, float]],
                 read: Callable[[], MemoryReading] = read_memory,
                 gpu_limit: Callable[[], GpuLimit | None] | None = None,
                 stack_memory: Callable[[], StackMemory] | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.view = view
        self.usage = usage  # engine id -> (requests in flight, last use), from the front
        self.read = read
        self.lock = asyncio.Lock()
        self.waiting = 0  # requests inside admit(): waiting for the lock, room or a load
        self.loading_now: str | None = None  # the model whose load holds the lock
        self.evicting: set[str] = set()
        self.refused: dict[str, float] = {}
        self.gpu_limit = gpu_limit or (lambda: read_gpu_limit(settings.llama_server_bin,
                                                              settings.cache_dir))
        self.footprints: dict[str, int] = {}  # engine id -> its footprint, as last admitted
        self.stack_memory = stack_memory or (lambda: read_stack_memory(settings.pid_file))
        self.failures = LoadFailures(settings, lambda _engine_id: None)  # the front names files
        self.settling = Settling()  # models just admitted count at least at their estimate

    async def admit(self, engine_id: str, need: int, body: bytes | None = None,
                    workers: Sequence[str] = ()) -> Refusal | Restored | None:
        """Return once `engine_id` is loaded or loading, or why it cannot be (Refusal). A
        model this request loads gets the saved conversation that fits the request (its
        `body`) before any request reaches it; what was restored is returned, for the front
        to check in the reply. `workers`: its RPC workers, which must answer before a load."""
        self.footprints[engine_id] = need
        if self.view.state(engine_id) == "loaded" and engine_id not in self.evicting:
            return None  # the common case: no lock, no read, no await
        if (failed := self._failed(engine_id)) is not None:
            return failed  # never through the lock: other models' loads go on
        # A model server that holds its workers (loaded, loading, stopping) would make them
        # look busy: they are asked before a load from nothing only.
        if workers and self.view.state(engine_id) not in LOADED_STATES and \
                engine_id not in self.evicting:
            missing = await rpc_reach.unreachable(workers)
            if missing:
                return Refusal(rpc_reach.describe(engine_id, missing), 10,
                               kind=rpc_reach.UNREACHABLE_KIND)
        limit = self.settings.load_queue_max
        if self.waiting >= limit:
            return Refusal(f"{self.waiting} requests already wait for a model to load "
                           f"(LOAD_QUEUE_MAX={limit}); retry later", QUEUE_FULL_RETRY, 429)
        timeout = self.settings.load_queue_timeout
        deadline = time.monotonic() + timeout  # from the request's arrival, lock wait included
        self.waiting += 1
        try:
            while True:
                try:
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                        await self.lock.acquire()
                    break
                except TimeoutError:
                    if self.loading_now != engine_id:
                        return Refusal(f"loading {engine_id} waited {timeout}s behind other "
                                       "loads (LOAD_QUEUE_TIMEOUT)", 10)
                    # The load ahead is this model's own (a big one may take longer than
                    # LOAD_QUEUE_TIMEOUT): its outcome is this request's answer.
                    deadline = time.monotonic() + QUEUE_POLL
            # The work owns the lock to its end: a client that leaves mid-load (its handler
            # cancelled) must not let the next admission read memory beside a running load.
            work = asyncio.ensure_future(self._locked(engine_id, need, body, deadline))
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                work.add_done_callback(_log_failure)
                raise
        finally:
            self.waiting -= 1

    async def _locked(self, engine_id: str, need: int, body: bytes | None,
                      deadline: float) -> Refusal | Restored | None:
        try:
            # A load that failed while this request waited behind it is this request's answer.
            return self._failed(engine_id) or \
                await self._make_room_and_load(engine_id, need, body, deadline)
        finally:
            self.lock.release()

    def _failed(self, engine_id: str) -> Refusal | None:
        failure = self.failures.current(engine_id)
        if failure is None:
            return None
        return Refusal(failure.message(), max(1, round(failure.until - time.time())),
                       kind=FAILED_KIND)

    async def _make_room_and_load(self, engine_id: str, need: int, body: bytes | None,
                                  deadline: float) -> Refusal | Restored | None:
        threshold = self.settings.memory_pressure_threshold
        waiting_said = False
        while True:
            if engine_id in self.evicting:  # the unloader's unload of it runs: wait it out
                if time.monotonic() >= deadline:
                    return Refusal(f"{engine_id} is being unloaded (waited "
                                   f"{self.settings.load_queue_timeout}s)", 10)
                await asyncio.sleep(QUEUE_POLL)
                continue
            try:
                models = await asyncio.to_thread(self.engine.models)
            except ModelServeError:
                return None  # the engine is away: the request gets its answer from the proxy
            self.view.update(models)
            if engine_id not in self.view.models:
                return None  # not (or no longer) served: the engine answers that itself
            state = self.view.state(engine_id)
            if state in ("loaded", "loading", "sleeping"):
                return None
            stopping = state in LOADED_STATES  # its memory is not free yet: wait for it
            reading, ours, back = await asyncio.to_thread(self._counted, models)
            gpu = await self._gpu_shortfall(models, engine_id, need)
            if not stopping and not reading.over(threshold, need) and gpu is None:
                break
            # A model server the engine no longer lists (stopped, killed, reloaded) is still
            # exiting: its memory is coming back, so wait for it before unloading another.
            stopping = stopping or (back > 0 and gpu is None)
            why = (f"loading {engine_id} needs {need / GIB:.2f} GiB; memory {reading.describe()}"
                   f" would cross {threshold:g}%") if gpu is None else \
                f"loading {engine_id} needs {need / GIB:.2f} GiB; {gpu.why}"
            fix = "raise MEMORY_PRESSURE_THRESHOLD" if gpu is None else gpu.fix
            others = any(m.state in LOADED_STATES and m.name != engine_id for m in models)
            if not stopping:
                if gpu is None and reading.total and 100 * need / reading.total >= threshold:
                    return Refusal(f"loading {engine_id} needs {need / GIB:.2f} GiB, "
                                   f"{100 * need / reading.total:.1f}% of memory: with every "
                                   f"other model gone it would still cross {threshold:g}%, "
                                   "it does not fit. Lower its ctx_size in custom_models.yaml, "
                                   f"or {fix}", 60)
                victim = self.victim(models, engine_id)
                if victim is not None:
                    await self._unload(victim, why, reading, need)
                    continue
                if gpu is not None and not others:
                    return Refusal(f"{why}, and no other model is loaded: it does not fit. "
                                   f"Lower its ctx_size in custom_models.yaml, or {fix}", 60)
            if time.monotonic() >= deadline:
                waited = self.settings.load_queue_timeout
                if back > 0 and state not in LOADED_STATES:
                    return Refusal(f"{why}; a model server the engine no longer lists is "
                                   f"still stopping (model servers hold {back / GIB:.2f} GiB; "
                                   f"waited {waited}s)", 10)
                if others or stopping:
                    return Refusal(f"{why}, and every loaded model is busy or was used in the "
                                   f"last {self.settings.min_model_age_seconds}s (waited "
                                   f"{waited}s)" + (f"; or {gpu.fix}" if gpu else ""), 10)
                return Refusal(f"{why}, and no other model is loaded: other programs use "
                               f"{(reading.used - ours.stack_bytes) / GIB:.1f} GiB (this "
                               f"stack's own processes {ours.stack_bytes / GIB:.1f} GiB; "
                               f"waited {waited}s)", 30)
            if not waiting_said and not stopping:
                log.info("admission: %s; %s: waiting", why,
                         "every loaded model is busy or recently used" if others else
                         "no model of ours is loaded (memory other programs use, or one "
                         "not yet given back)")
                waiting_said = True
            await asyncio.sleep(QUEUE_POLL)
        self.settling.admitted(engine_id, need, reading,
                               {m.name: self.footprints.get(m.name, 0) for m in models
                                if m.state in LOADED_STATES})
        log.info("admission: loading %s (%.2f GiB) with memory at %s (%d model server(s) "
                 "hold %.2f GiB)", engine_id, need / GIB, reading.describe(), ours.servers,
                 ours.servers_bytes / GIB)
        started, began = time.monotonic(), time.time()
        self.loading_now = engine_id
        try:
            loaded = await engine_call(self.engine.load, engine_id, LOAD_WAIT)
        finally:
            self.loading_now = None
        log.info("admission: %s %s in %.0f ms", engine_id, "loaded" if loaded else "did not load",
                 (time.monotonic() - started) * 1000)
        if loaded:
            self.failures.loaded(engine_id)
        elif await asyncio.to_thread(self.failures.failed, engine_id, began):
            log.error("admission: %s", self.failures.failures[engine_id].message())
            return self._failed(engine_id)
        with contextlib.suppress(ModelServeError):
            self.view.update(await asyncio.to_thread(self.engine.models))
            if loaded and body:
                return await engine_call(self.engine.restore_slots, engine_id,
                                         _json_object(body))
        return None

    def _counted(self, models: list[EngineModel]) -> tuple[MemoryReading, StackMemory, int]:
        """The memory reading (each model admitted here counted at least at its estimate until
        the reading shows it: runtime/settling.py), what the stack's processes hold, and the
        memory of model servers the engine no longer lists (stopped, killed, a reload: coming
        back), 0 when none."""
        # What the servers hold is read first: a server just loaded is touching its memory
        # fast, and a reading taken before it would miss what `ours` already counts.
        ours = self.stack_memory()
        reading = self.settling.counted(self.read(),
                                        {m.name for m in models if m.state in LOADED_STATES})
        listed = [m for m in models if m.state in ("loaded", "loading", "sleeping")]
        return reading, ours, ours.servers_bytes if ours.servers > len(listed) else 0

    async def _gpu_shortfall(self, models: list[EngineModel], engine_id: str,
                             need: int) -> GpuShortfall | None:
        """Whether the models in memory plus this one would pass Metal's working-set limit
        (Apple Silicon only); each counts its footprint as last admitted here."""
        limit = await asyncio.to_thread(self.gpu_limit)
        if limit is None:
            return None
        return gpu_shortfall(limit, held_by_others(models, self.footprints, engine_id), need)

    async def evict(self, engine_id: str, idle_seconds: float) -> bool:
        """The unloader's unload (memory pressure, TTL), made here unless a request uses the
        model: the check and the mark are one step of the event loop, so a request admitted
        just before counts as in flight, and one that comes after waits in admission (then
        loads the model again) instead of reaching a server that is going away."""
        in_flight, last_used = self.usage(engine_id)
        if in_flight or engine_id in self.evicting or \
                time.time() - last_used < idle_seconds:
            return False
        self.evicting.add(engine_id)
        try:
            await engine_call(self.engine.unload, engine_id)
            await engine_call(self.engine.wait_unloaded, engine_id, UNLOAD_WAIT)
        finally:
            self.evicting.discard(engine_id)
        return True

    def victim(self, models: list[EngineModel], target: str) -> str | None:
        """The loaded, idle, old enough model used least recently."""
        now = time.time()
        eligible: list[tuple[float, str]] = []
        for model in models:
            if model.state != "loaded" or model.name == target or model.name in self.evicting:
                continue
            in_flight, last_used = self.usage(model.name)
            if in_flight or now - last_used < self.settings.min_model_age_seconds:
                continue
            if self.refused.get(model.name, 0.0) > now:
                continue
            eligible.append((last_used, model.name))
        return min(eligible)[1] if eligible else None

    async def _unload(self, victim: str, why: str, before: MemoryReading, need: int) -> None:
        _in_flight, last_used = self.usage(victim)
        idle = f"idle {time.time() - last_used:.0f}s" if last_used else "never used"
        log.info("admission: %s; unloading %s (least recently used, %s)", why, victim, idle)
        self.evicting.add(victim)  # from here on, its requests wait for this admission
        try:
            await engine_call(self.engine.unload, victim)
            await engine_call(self.engine.wait_unloaded, victim, UNLOAD_WAIT)
            await self._memory_back(victim, before, need)
        except ModelServeError as exc:
            log.error("admission: could not unload %s (%s); not choosing it for %.0fs", victim,
                      exc.message, REFUSED_BACKOFF)
            self.refused[victim] = time.time() + REFUSED_BACKOFF
        finally:
            self.evicting.discard(victim)

    async def _memory_back(self, victim: str, before: MemoryReading, need: int) -> None:
        """Wait until the reading shows the unloaded model's memory back: down by most of its
        estimate, or low enough for the load, within MEMORY_BACK_WAIT."""
        estimate = self.footprints.get(victim, 0)
        if estimate <= 0:
            return
        target = before.used - MEMORY_BACK_SHARE * estimate
        threshold = self.settings.memory_pressure_threshold
        deadline = time.monotonic() + MEMORY_BACK_WAIT
        while True:
            reading = await asyncio.to_thread(self.read)
            if reading.used <= target or not reading.over(threshold, need):
                return
            if time.monotonic() >= deadline:
                log.info("admission: %s is unloaded, but memory is still at %s after %.0fs "
                         "(it was %s)", victim, reading.describe(), MEMORY_BACK_WAIT,
                         before.describe())
                return
            await asyncio.sleep(MEMORY_POLL)


def _log_failure(work: asyncio.Future[Any]) -> None:
    """The work of a request that went away: nobody else reads its failure."""
    if not work.cancelled() and work.exception() is not None:
        log.error("admission failed", exc_info=work.exception())


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
