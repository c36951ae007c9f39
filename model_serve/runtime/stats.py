"""`model stats`: what each model costs and does right now, whichever engine runs."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from model_serve.config.settings import Settings
from model_serve.engines import Engine, select_engine
from model_serve.engines.base import LOADED_STATES
from model_serve.errors import ModelServeError
from model_serve.models.plan import ServedModel
from model_serve.runtime import procs
from model_serve.runtime.activity import front_record, load_activity
from model_serve.runtime.load_failures import FAILING, load_failures
from model_serve.runtime.memory import MemoryReading, read_memory
from model_serve.runtime.model_exits import load_exits
from model_serve.runtime.state import read_state


@dataclass
class ModelStats:
    name: str
    state: str
    ctx_size: int | None = None
    slots: int | None = None
    ttl: int | None = None
    ttl_left: float | None = None
    idle_seconds: float | None = None
    rss_bytes: int | None = None
    in_flight: int = 0
    prompt_tokens: int = 0
    predicted_tokens: int = 0
    port: int | None = None
    last_exit: str | None = None  # why its server last ended when nobody asked it to
    load_failure: str | None = None  # why its loads fail, while requests are refused for it
    saved_conversations: int = 0  # KV caches kept on disk (KV_CACHE), their size and restores
    saved_bytes: int = 0
    restores: int = 0
    kind: str | None = None  # chat, embedding or rerank (models/kinds.py)
    estimate_bytes: int | None = None  # what it takes once loaded, from its GGUF header
    workers: list[str] = field(default_factory=list)  # RPC workers holding its layers


@dataclass
class StatsReport:
    engine: str
    memory: MemoryReading
    models: list[ModelStats] = field(default_factory=list)

    @property
    def total_rss(self) -> int:
        return sum(m.rss_bytes or 0 for m in self.models)

    def to_json(self) -> dict[str, Any]:
        return {"engine": self.engine, "models": [asdict(m) for m in self.models],
                "total_model_rss_bytes": self.total_rss,
                "memory": {"total_bytes": self.memory.total, "used_bytes": self.memory.used,
                           "percent": round(self.memory.percent, 1),
                           "pressure_level": self.memory.pressure_level}}


def _rss_by_port(settings: Settings) -> dict[int, int]:
    """Resident memory of each model server we started, keyed by its --port."""
    import psutil

    state = read_state(settings.pid_file)
    engine = state.child("engine").pid if state else None
    # The engine's children now, plus what the supervisor recorded (it samples once a second).
    refs = procs.descendants(engine) if engine else []
    refs += state.model_procs if state else []
    found: dict[int, int] = {}
    for ref in refs:
        proc = ref.process()
        if proc is None:
            continue
        try:
            argv = proc.cmdline()
            port = int(argv[argv.index("--port") + 1])
            found[port] = proc.memory_info().rss
        except (ValueError, IndexError, psutil.Error):  # gone, or not a model server
            continue
    return found


def _saved_conversations(folder: Path | None, stats: ModelStats) -> None:
    if folder is None:
        return
    from model_serve.engines.slot_cache import saved_slots

    slots = saved_slots(folder) if folder.is_dir() else []
    stats.saved_conversations = len(slots)
    stats.saved_bytes = sum(slot.bytes for slot in slots)
    stats.restores = sum(slot.hits for slot in slots)


def collect_stats(settings: Settings, engine: Engine | None = None,
                  front_activity: dict[str, dict[str, Any]] | None = None,
                  plan: list[ServedModel] | None = None) -> StatsReport:
    """When the front itself asks (its dashboard), it gives its record of requests by engine
    id (else read from it over HTTP) and the plan its names come from (else built anew)."""
    from model_serve.runtime.sync import build_current_plan

    engine = engine or select_engine(settings)
    engine.require_running()
    listed = engine.models()
    served_models = plan
    if served_models is None:
        try:
            _catalog, served_models = build_current_plan(settings, engine)
        except ModelServeError:
            served_models = []  # stats still show the engine's view
    plan = {engine.model_id(s.name): s for s in served_models}
    activity = load_activity(settings.state_dir / "activity.json").get("models", {})
    # Exact, when there is one.
    activity.update(front_activity if front_activity is not None else
                    front_record(settings) or {})
    exits = load_exits(settings)
    failures = load_failures(settings)
    rss = _rss_by_port(settings)
    folders = engine.slot_folders()
    now = time.time()
    report = StatsReport(engine.name, read_memory())
    for model in listed:
        served = plan.get(model.name)
        stats = ModelStats(model.served_name, model.state, port=model.port)
        if served is not None:
            stats.ctx_size, stats.slots, stats.ttl = served.ctx_size, served.parallel, served.ttl
            stats.kind, stats.estimate_bytes = served.kind, served.estimated_bytes
            stats.workers = list(served.workers)
        _saved_conversations(folders.get(model.name), stats)
        crash = exits.get(model.name)
        if crash is not None:
            stats.last_exit = crash.cause
            if model.state not in LOADED_STATES:
                stats.state = f"crashed ({crash.signal})" if crash.signal else "crashed"
        failure = failures.get(model.name)
        if failure is not None and model.state not in LOADED_STATES:
            stats.state, stats.load_failure = FAILING, failure.message()
        if model.state in LOADED_STATES:
            act = activity.get(model.name)
            if act is not None:
                stats.idle_seconds = 0.0 if act.get("in_flight") else now - act["last_used"]
                stats.in_flight = int(act.get("in_flight", 0))
            metrics = engine.model_metrics(model) if model.state == "loaded" else None
            if metrics:  # fresher than the unloader's last write
                stats.in_flight = int(metrics.get("requests_processing", 0))
                stats.prompt_tokens = int(metrics.get("prompt_tokens_total", 0))
                stats.predicted_tokens = int(metrics.get("tokens_predicted_total", 0))
            if stats.ttl and stats.idle_seconds is not None:
                stats.ttl_left = max(0.0, stats.ttl - stats.idle_seconds)
            stats.rss_bytes = rss.get(model.port) if model.port else None
        report.models.append(stats)
    report.models.sort(key=lambda m: (m.state not in LOADED_STATES, m.name))
    return report
