"""Engines: one module per engine, chosen by ENGINE (auto prefers llama-swap when installed)."""

from __future__ import annotations

from model_serve.config.settings import Settings
from model_serve.engines.base import Engine, EngineModel
from model_serve.programs import find_on_path

__all__ = ["Engine", "EngineModel", "engine_name", "select_engine"]


def engine_name(settings: Settings) -> str:
    if settings.engine != "auto":
        return settings.engine
    if settings.llama_swap_bin is not None or find_on_path("llama-swap"):
        return "llama-swap"
    return "llama-server"


def select_engine(settings: Settings) -> Engine:
    if engine_name(settings) == "llama-swap":
        from model_serve.engines.llama_swap import LlamaSwapEngine

        return LlamaSwapEngine(settings)
    from model_serve.engines.llama_server import LlamaServerEngine

    return LlamaServerEngine(settings)
