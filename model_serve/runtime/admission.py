"""Room before a load: the front holds a request for a model that is not in memory, unloads
least-recently-used idle models until memory in use plus the model's footprint (weights + KV
cache at its context, from the GGUF header) is under MEMORY_PRESSURE_THRESHOLD, and only then
starts the load.

- One admission at a time: two loads cannot both count the same free memory. A load is
  finished before the next admission reads memory.
- Requests for a model that is loading are all served by that one load.
- A model with a request in flight, used within MIN_MODEL_AGE_SECONDS, or being unloaded is
  never chosen. When no room can be made, the request waits; after LOAD_QUEUE_TIMEOUT it gets
  HTTP 503 with Retry-After. A load that would cross the line is never started.
- Memory others take (other apps) is still the pressure unloader's job (polls and load events).
- On Apple Silicon the loaded models' footprints together also stay under Metal's working-set
  limit (engines/metal.py), which llama-server checks per process only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
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
from model_serve.runtime.engine_view import EngineView
from model_serve.runtime.memory import MemoryReading, read_memory

log = logging.getLogger("model_serve.front")

QUEUE_POLL = 0.5  # seconds between attempts while no room can be made
UNLOAD_WAIT = 30.0  # seconds an unloaded model gets to leave memory
LOAD_WAIT = 300.0  # seconds a load may take
REFUSED_BACKOFF = 60.0  # a model that refused to unload is not chosen again for this long
GIB = 2**30


@dataclass
class Refusal:
    """Why a request could not be admitted (the front answers 503 with it)."""

    message: str
    retry_after: int


class Admission:
    def __init__(self, settings: Settings, engine: Engine, view: EngineView,
                 usage: Callable[[str], tuple[int, float]],
                 read: Callable[[], MemoryReading] = read_memory,
                 gpu_limit: Callable[[], GpuLimit | None] | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.view = view
        self.usage = usage  # engine id -> (requests in flight, last use), from the front
        self.read = read
        self.lock = asyncio.Lock()
        self.evicting: set[str] = set()
        self.refused: dict[str, float] = {}
        self.gpu_limit = gpu_limit or (lambda: read_gpu_limit(settings.llama_server_bin,
                                                              settings.cache_dir))
        self.footprints: dict[str, int] = {}  # engine id -> its footprint, as last admitted

    async def admit(self, engine_id: str, need: int,
                    body: bytes | None = None) -> Refusal | Restored | None:
        """Return once `engine_id` is loaded or loading, or why it cannot be (Refusal). A
        model this request loads gets the saved conversation that fits the request (its
        `body`) before any request reaches it; what was restored is returned, for the front
        to check in the reply."""
        self.footprints[engine_id] = need
        if self.view.state(engine_id) == "loaded" and engine_id not in self.evicting:
            return None  # the common case: no lock, no read, no await
        async with self.lock:
            return await self._make_room_and_load(engine_id, need, body)

    async def _make_room_and_load(self, engine_id: str, need: int,
                                  body: bytes | None) -> Refusal | Restored | None:
        threshold = self.settings.memory_pressure_threshold
        deadline = time.monotonic() + self.settings.load_queue_timeout
        waiting_said = False
        while True:
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
            reading = await asyncio.to_thread(self.read)
            gpu = await self._gpu_shortfall(models, engine_id, need)
            if not stopping and not reading.over(threshold, need) and gpu is None:
                break
            why = (f"loading {engine_id} needs {need / GIB:.2f} GiB; memory {reading.describe()}"
                   f" would cross {threshold:g}%") if gpu is None else \
                f"loading {engine_id} needs {need / GIB:.2f} GiB; {gpu.why}"
            fix = "raise MEMORY_PRESSURE_THRESHOLD" if gpu is None else gpu.fix
            if not stopping:
                victim = self.victim(models, engine_id)
                if victim is not None:
                    await self._unload(victim, why)
                    continue
                if not any(m.state in LOADED_STATES and m.name != engine_id for m in models):
                    return Refusal(f"{why}, and no other model is loaded: it does not fit. "
                                   f"Lower its ctx_size in custom_models.yaml, or {fix}", 60)
            if time.monotonic() >= deadline:
                return Refusal(f"{why}, and every loaded model is busy or was used in the last "
                               f"{self.settings.min_model_age_seconds}s (waited "
                               f"{self.settings.load_queue_timeout}s)"
                               + (f"; or {gpu.fix}" if gpu else ""), 10)
            if not waiting_said and not stopping:
                log.info("admission: %s; every loaded model is busy or recently used: waiting",
                         why)
                waiting_said = True
            await asyncio.sleep(QUEUE_POLL)
        log.info("admission: loading %s (%.2f GiB) with memory at %s", engine_id, need / GIB,
                 reading.describe())
        started = time.monotonic()
        loaded = await asyncio.to_thread(self.engine.load, engine_id, LOAD_WAIT)
        log.info("admission: %s %s in %.0f ms", engine_id, "loaded" if loaded else "did not load",
                 (time.monotonic() - started) * 1000)
        with contextlib.suppress(ModelServeError):
            self.view.update(await asyncio.to_thread(self.engine.models))
            if loaded and body:
                return await asyncio.to_thread(self.engine.restore_slots, engine_id,
                                               _json_object(body))
        return None

    async def _gpu_shortfall(self, models: list[EngineModel], engine_id: str,
                             need: int) -> GpuShortfall | None:
        """Whether the models in memory plus this one would pass Metal's working-set limit
        (Apple Silicon only); each counts its footprint as last admitted here."""
        limit = await asyncio.to_thread(self.gpu_limit)
        if limit is None:
            return None
        return gpu_shortfall(limit, held_by_others(models, self.footprints, engine_id), need)

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

    async def _unload(self, victim: str, why: str) -> None:
        _in_flight, last_used = self.usage(victim)
        idle = f"idle {time.time() - last_used:.0f}s" if last_used else "never used"
        log.info("admission: %s; unloading %s (least recently used, %s)", why, victim, idle)
        self.evicting.add(victim)  # from here on, its requests wait for this admission
        try:
            await asyncio.to_thread(self.engine.unload, victim)
            await asyncio.to_thread(self.engine.wait_unloaded, victim, UNLOAD_WAIT)
        except ModelServeError as exc:
            log.error("admission: could not unload %s (%s); not choosing it for %.0fs", victim,
                      exc.message, REFUSED_BACKOFF)
            self.refused[victim] = time.time() + REFUSED_BACKOFF
        finally:
            self.evicting.discard(victim)


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
