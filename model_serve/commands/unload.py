"""`model unload`, and the unloads before `model rm`: which running models a name means, and
unloading them through the engine."""

from __future__ import annotations

from dataclasses import dataclass, field

from model_serve.config.settings import Settings
from model_serve.engines import Engine, select_engine
from model_serve.engines.base import LOADED_STATES, EngineModel
from model_serve.errors import ConfigError


@dataclass
class UnloadResult:
    unloaded: list[str] = field(default_factory=list)  # served names
    not_loaded: list[str] = field(default_factory=list)


def running_models_named(settings: Settings, engine: Engine, name: str,
                         listed: list[EngineModel] | None = None) -> list[EngineModel]:
    """What the engine runs under `name`: a name it routes, else an Ollama name
    (gemma3:270m) or the name without its prefix, through the plan."""
    listed = engine.models() if listed is None else listed
    chosen = engine.resolve(name, listed)
    if chosen:
        return chosen
    from model_serve.models.plan import find_served
    from model_serve.runtime.sync import build_current_plan

    catalog, plan = build_current_plan(settings, engine)
    try:
        served = find_served(plan, catalog, name).name
    except ConfigError:
        return []
    return engine.resolve(served, listed)


def unload_models(engine: Engine, models: list[EngineModel]) -> UnloadResult:
    """Unload those of `models` that are loaded, and wait until their memory is returned."""
    loaded = [m for m in models if m.state in LOADED_STATES]
    for model in loaded:
        engine.unload(model.name)
    for model in loaded:
        engine.wait_unloaded(model.name)
    return UnloadResult([m.served_name for m in loaded],
                        [m.served_name for m in models if m not in loaded])


def unload(settings: Settings, name: str | None, unload_all: bool) -> UnloadResult:
    engine = select_engine(settings)
    engine.require_running()
    listed = engine.models()
    if unload_all:
        chosen = [m for m in listed if m.state in LOADED_STATES]
    elif name:
        chosen = running_models_named(settings, engine, name, listed)
        if not chosen:
            raise ConfigError(f"the engine serves no model named '{name}'",
                              "run 'model list --served' (or 'model names') to see the names")
    else:
        raise ConfigError("name a model or pass --all",
                          "model unload ls/NAME  |  model unload --all")
    # A model failing to load is tried again at its next request (every model, with --all).
    from model_serve.runtime.load_failures import forget_failures

    forget_failures(settings, None if unload_all else [m.name for m in chosen])
    return unload_models(engine, chosen)
