"""When was each loaded model last USED: a request served or in flight, not merely seen.

With the front (FRONT=on) every request passes through it, and it records each one's start
and end: one read of its record gives the exact figures. Without it, each loaded model's own
llama-server counters (tokens, decode calls) and its in-flight gauge are read straight from
its port; a model counts as used at the moment its counters move or a request is in progress.
Listing or probing a model never loads it and never resets its timer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from model_serve.config.settings import Settings
from model_serve.engines.base import LOADED_STATES, Engine
from model_serve.fileio import write_if_changed

_WORK_COUNTERS = ("n_decode_total", "prompt_tokens_total", "prompt_tokens_cached_total",
                  "tokens_predicted_total")
_IN_FLIGHT = ("requests_processing", "requests_deferred")


@dataclass
class ModelActivity:
    name: str
    state: str
    port: int | None
    loaded_at: float
    last_used: float
    in_flight: int = 0
    prompt_tokens: int = 0
    predicted_tokens: int = 0
    work: float = -1.0  # sum of the work counters at the last probe (-1: never probed)
    keep_alive: float | None = None  # an Ollama client's keep_alive (seconds, -1 never)

    def idle_seconds(self, now: float) -> float:
        return 0.0 if self.in_flight else max(0.0, now - self.last_used)


class ActivityTracker:
    """Keeps last-use times of the loaded models across polls."""

    def __init__(self, engine: Engine, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.clock = clock
        self.models: dict[str, ModelActivity] = {}
        # From the engine's request events (llama-swap): exact, and for models whose own
        # counters cannot be read (a model server run without --metrics).
        self.requests_in_flight: dict[str, int] = {}
        self.last_request_event: dict[str, float] = {}  # model -> when one started or ended

    def request_event(self, model: str, started: bool) -> None:
        count = self.requests_in_flight.get(model, 0) + (1 if started else -1)
        self.requests_in_flight[model] = max(0, count)
        self.last_request_event[model] = self.clock()
        act = self.models.get(model)
        if act is not None:
            act.last_used = self.clock()
            act.in_flight = max(act.in_flight, self.requests_in_flight[model])

    def refresh(self) -> dict[str, ModelActivity]:
        """Poll the engine and every loaded model once (raises EngineError if unreachable)."""
        now = self.clock()
        current: dict[str, ModelActivity] = {}
        front = front_record(self.engine.settings)
        for model in self.engine.models():
            if model.state not in LOADED_STATES:
                continue
            act = self.models.get(model.name)
            if act is None:  # a model appears because a request asked for it
                act = ModelActivity(model.name, model.state, model.port, now, now)
            act.state, act.port = model.state, model.port
            if model.state == "loading":
                act.last_used = now
            elif front is not None:
                record = front.get(model.name, {})
                act.in_flight = int(record.get("in_flight", 0))
                act.last_used = max(act.last_used, float(record.get("last_used", 0.0)))
                keep = record.get("keep_alive")
                act.keep_alive = float(keep) if isinstance(keep, (int, float)) else None
            elif model.state == "loaded":
                self._probe(act, model, now)
            busy = self.requests_in_flight.get(model.name, 0)
            act.in_flight = max(act.in_flight, busy)
            if busy:
                act.last_used = now
            act.last_used = max(act.last_used, self.last_request_event.get(model.name, 0.0))
            current[model.name] = act
        self.models = current
        return current

    def _probe(self, act: ModelActivity, model: Any, now: float) -> None:
        metrics = self.engine.model_metrics(model)
        if metrics is None:
            return
        work = sum(metrics.get(key, 0.0) for key in _WORK_COUNTERS)
        act.in_flight = int(sum(metrics.get(key, 0.0) for key in _IN_FLIGHT))
        if act.in_flight or (act.work >= 0 and work != act.work):
            act.last_used = now
        act.work = work
        act.prompt_tokens = int(metrics.get("prompt_tokens_total", 0))
        act.predicted_tokens = int(metrics.get("tokens_predicted_total", 0))

    def save(self, path: Path, extra: dict[str, Any] | None = None) -> None:
        data = {"models": {name: asdict(act) for name, act in sorted(self.models.items())},
                **(extra or {})}
        # Rewritten every poll while models work, and made anew from memory: no drive flush.
        write_if_changed(path, json.dumps(data, indent=1, sort_keys=True),
                         through_drive_cache=False)


def front_record(settings: Settings) -> dict[str, dict[str, Any]] | None:
    """The front's record of requests, by engine id; None without a front, or when it does
    not answer."""
    if not settings.front_enabled:
        return None
    from model_serve import internal_key
    from model_serve.loopback import LoopbackError, call

    try:
        answer = call("GET", f"{settings.base_url}/api/model_serve/activity",
                      internal_key.own_headers(settings), timeout=2,
                      unix_socket=internal_key.front_socket(settings))
        record = answer.json() if answer.status_code == 200 else None
    except (LoopbackError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    return {str(item.get("engine_id", name)): item for name, item in record.items()
            if isinstance(item, dict)}


def load_activity(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
