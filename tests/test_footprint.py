"""The KV cache estimate from the GGUF header against what the real llama-server allocates
(its own `llama_kv_cache: size = … MiB` lines), with and without --swa-full."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from model_serve.config.settings import load_settings
from model_serve.engines.engine_check import ensure_engine_computes
from model_serve.engines.llama_server import resolve_llama_server
from model_serve.models.footprint import kv_cache_bytes
from model_serve.models.model_info import read_model_info
from tests.conftest import Env, free_port

KV_LINE = re.compile(r"llama_kv_cache: size =\s+([\d.]+) MiB")


def allocated_kv(env: Env, model: Path, *args: str) -> float:
    """MiB of KV cache the real llama-server reports once the model is loaded."""
    settings = load_settings(dict(env))
    binary = resolve_llama_server(settings.llama_server_bin)
    needed = ensure_engine_computes(settings, binary).options  # what this CPU needs
    for option, value in needed.items():
        args += (f"--{option}",) if value == "true" else (f"--{option}", value)
    proc = subprocess.Popen([str(binary), "-m", str(model), "--port", str(free_port()), "-v",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace")
    sizes: list[float] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            sizes += [float(m) for m in KV_LINE.findall(line)]
            if "memory breakdown" in line or "server is listening" in line:
                break
    finally:
        proc.kill()
        proc.wait(10)
    assert sizes, "llama-server printed no KV cache size"
    return sum(sizes)


@pytest.mark.parametrize("swa_full", [False, True])
def test_kv_estimate_is_what_llama_server_allocates(env: Env, gemma_path: Path,
                                                    swa_full: bool) -> None:
    info = read_model_info(gemma_path)
    args = ["-c", "8192", "-np", "1"] + (["--swa-full"] if swa_full else [])
    estimate = kv_cache_bytes(info, 8192, 1, swa_full=swa_full) / 2**20
    assert allocated_kv(env, gemma_path, *args) == estimate  # 39 and 144 MiB


def test_swa_full_reaches_the_engine_and_the_estimate(env: Env, gemma_path: Path) -> None:
    (env.models / gemma_path.name).symlink_to(gemma_path)
    (env.home / "custom_models.yaml").write_text(
        "models:\n  g2:\n    base_model: gemma-3:270m-q4_k_m\n    swa_full: true\n"
        "  g3:\n    base_model: gemma-3:270m-q4_k_m\n    swa_full: false\n")

    def sections() -> dict[str, str]:
        assert env.run("sync").returncode == 0
        config = (env.state / "models.ini").read_text()
        return {part.split("]")[0]: part for part in config.split("\n[")[1:]}

    # Without saved conversations, only the model that asks for it.
    env.update({"DEFAULT_CTX_SIZE": "8192", "KV_CACHE": "off"})
    shown = sections()
    assert "swa-full = true" in shown["ls/g2"]
    assert "swa-full" not in shown["ls/gemma-3-270m-q4_k_m"] + shown["ls/g3"]
    listed = {m["name"]: m for m in json.loads(env.run("list", "--json").stdout)}
    extra = listed["ls/g2"]["estimated_bytes"] - listed["ls/gemma-3:270m-q4_k_m"]["estimated_bytes"]
    assert extra == (144 - 39) * 2**20  # the full cache of the 15 sliding-window layers

    # With them (the default) it is on by itself where it is cheap (here +105 MiB), unless a
    # model says no.
    env.update({"KV_CACHE": "on"})
    shown = sections()
    assert "swa-full = true" in shown["ls/gemma-3-270m-q4_k_m"] and "swa-full" not in shown[
        "ls/g3"]

    # `model show` says which models keep their conversations across an unload, and why not.
    def conversations(name: str) -> tuple[bool, str]:
        shown = json.loads(env.run("show", name, "--json").stdout)
        return shown["keeps_conversations"], shown["conversations"]

    assert conversations("ls/gemma-3:270m-q4_k_m") == (
        True, "saved before unload, restored at the next load (--swa-full on, +105 MiB)")
    assert "slot-save-path" in shown["ls/gemma-3-270m-q4_k_m"]
    keeps, why = conversations("ls/g3")
    assert not keeps and "slot-save-path" not in shown["ls/g3"]
    assert why == ("sliding-window attention without --swa-full, so a restored cache would not "
                   "be reused (swa_full: false in custom_models.yaml); set swa_full: true for "
                   "+105 MiB")
    env.update({"KV_CACHE": "off"})
    assert conversations("ls/g2") == (False, "KV_CACHE=off")


def test_a_recurrent_model_keeps_no_conversations(env: Env) -> None:
    """Mamba-style state (`<arch>.ssm.*` keys, alone or in a hybrid): llama-server does not
    reuse a restored cache for it, so nothing is saved, and `model show` says why."""
    from tests.ollama_store import gguf_bytes

    (env.models / "hybrid.gguf").write_bytes(gguf_bytes(
        arch="granitehybrid", name="hybrid", extra={"granitehybrid.ssm.state_size": 128,
                                                    "granitehybrid.ssm.conv_kernel": 4}))
    assert env.run("sync").returncode == 0
    [listed] = json.loads(env.run("list", "--json").stdout)
    assert listed["keeps_conversations"] is False
    assert listed["conversations"] == ("granitehybrid keeps a recurrent state: llama-server "
                                       "does not reuse a restored cache for it")
    assert "slot-save-path" not in (env.state / "models.ini").read_text()
