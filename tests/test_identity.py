"""The engine owns model identity: the id it routes a served name under, every name that
reaches the model, and which running model a name a user types means."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_serve.config.settings import load_settings
from model_serve.engines.base import EngineModel
from model_serve.engines.llama_server import LlamaServerEngine
from model_serve.engines.llama_swap import LlamaSwapEngine
from model_serve.models.plan import ServedModel


def served(name: str, *aliases: str) -> ServedModel:
    """A served model record; identity needs only its names (no file is read)."""
    return ServedModel(name=name, aliases=list(aliases), model=None, ctx_size=4096,  # type: ignore[arg-type]
                       ctx_reason="", ttl=0, parallel=1)


@pytest.fixture(params=[LlamaServerEngine, LlamaSwapEngine])
def engine(request, tmp_path: Path):
    return request.param(load_settings({"HOME": str(tmp_path), "MODEL_SERVE_HOME": str(tmp_path),
                                        "MODELS_DIR": str(tmp_path)}))


def test_ids_and_routed_names(engine) -> None:
    model = served("ls/gemma3:270m-q4_k_m", "g", "ls/small")
    expected_id = ("ls/gemma3-270m-q4_k_m" if isinstance(engine, LlamaServerEngine)
                   else "ls/gemma3:270m-q4_k_m")  # the router's preset parser rewrites ':'
    assert engine.model_id(model.name) == expected_id
    names = engine.routed_names(model)
    assert names[0] == expected_id
    assert sorted(names) == sorted({"ls/gemma3:270m-q4_k_m", "ls/gemma3-270m-q4_k_m", "g",
                                    "ls/small"})


def test_resolve_ignores_case_and_colon_against_dash(engine) -> None:
    listed = [EngineModel("ls/gemma3-270m-q4_k_m", "loaded",
                          aliases=["ls/gemma3:270m-q4_k_m", "g"]),
              EngineModel("ls/other", "unloaded")]
    for name in ("ls/gemma3:270m-q4_k_m", "LS/Gemma3-270M-Q4_K_M", "g", "G"):
        assert engine.resolve(name, listed) == [listed[0]], name
    assert engine.resolve("ls/other", listed) == [listed[1]]
    assert engine.resolve("ls/gemma3", listed) == []
