"""`model forget`, and the forgetting in `model rm`: a model's conversations go, those saved
on disk (KV_CACHE_DIR) and those a loaded model holds in its slots. The slots are emptied
through its own llama-server, so its next unload has nothing to save again."""

from __future__ import annotations

from dataclasses import dataclass, field

from model_serve.config.settings import Settings
from model_serve.engines import Engine, select_engine
from model_serve.engines.base import EngineModel
from model_serve.errors import ConfigError
from model_serve.models.names import dash_form


@dataclass
class ForgetResult:
    models: list[str] = field(default_factory=list)  # served names; empty with --all
    saved: int = 0  # saved conversations deleted
    saved_bytes: int = 0
    erased: dict[str, int] = field(default_factory=dict)  # loaded model -> slots emptied


def forget(settings: Settings, name: str | None, forget_all: bool) -> ForgetResult:
    """The conversations of the model `name` (any name `model show` takes), or of all."""
    if not name and not forget_all:
        raise ConfigError("name a model or pass --all",
                          "model forget ls/NAME  |  model forget --all")
    engine = select_engine(settings)
    listed = engine.models() if engine.healthy() else []
    if forget_all:
        result = ForgetResult()
        _erase(settings, listed, result)
        result.saved, result.saved_bytes = _remove_saved(settings, None)
        return result
    assert name is not None
    served, folders = _folders_of(settings, engine, name)
    if served is None and not any((settings.kv_cache_dir / f).is_dir() for f in folders):
        raise ConfigError(f"no model named '{name}', and no saved conversations under that "
                          "name", "run 'model list' to see the names")
    return forget_model(settings, engine, served or name, listed, folders)


def forget_model(settings: Settings, engine: Engine, served_name: str,
                 listed: list[EngineModel] | None = None,
                 folders: set[str] | None = None) -> ForgetResult:
    """`served_name`'s conversations: its live slots first (an unload meanwhile then saves
    none), then its saved files, under every key."""
    from model_serve.engines import slot_cache

    if listed is None:
        listed = engine.models() if engine.healthy() else []
    if folders is None:
        folders = {slot_cache.model_folder_name(n) for n in _ids(engine, served_name)}
    result = ForgetResult([served_name])
    _erase(settings, engine.resolve(served_name, listed), result)
    result.saved, result.saved_bytes = _remove_saved(settings, folders)
    return result


def _ids(engine: Engine, served_name: str) -> list[str]:
    """The names its folder may have: the id of this engine, and of the other one (ids
    differ between engines: a switch leaves the other's folder until the next sync)."""
    return [engine.model_id(served_name), served_name, dash_form(served_name)]


def _folders_of(settings: Settings, engine: Engine, name: str) -> tuple[str | None, set[str]]:
    """The served name `name` means (None when the plan has none) and the folder names its
    conversations may be under."""
    from model_serve.engines import slot_cache
    from model_serve.models.plan import find_served
    from model_serve.runtime.sync import build_current_plan

    catalog, plan = build_current_plan(settings, engine)
    try:
        served: str | None = find_served(plan, catalog, name).name
    except ConfigError:  # gone from the plan: its conversations may still be on disk
        served = None
    ids = _ids(engine, served) if served else [name, dash_form(name)]
    return served, {slot_cache.model_folder_name(n) for n in ids}


def _erase(settings: Settings, models: list[EngineModel], result: ForgetResult) -> None:
    from model_serve import internal_key
    from model_serve.engines import slot_cache

    headers = internal_key.engine_headers(settings)
    for model in models:
        if model.state == "loaded" and model.port:
            url = f"http://127.0.0.1:{model.port}"
            result.erased[model.served_name] = slot_cache.erase_slots(url, headers)


def _remove_saved(settings: Settings, folders: set[str] | None) -> tuple[int, int]:
    from model_serve.engines import slot_cache

    return slot_cache.remove_saved(settings.kv_cache_dir, folders)
