"""models.ini for llama-server's router, checked against the real router."""

from __future__ import annotations

import os

import requests

from tests import ollama_store
from tests.conftest import Env, llama_servers_under


def test_awkward_paths_reach_the_real_router_and_load(env: Env, gemma_path) -> None:
    # A folder name with a space, quotes, '#' and ';' (the preset format ends a value at # and ;).
    odd = env.models / "my models #1; it's \"odd\""
    odd.mkdir()
    (odd / "gemma-3-270m-q4_k_m.gguf").symlink_to(gemma_path)
    colon = env.models / "tags"
    colon.mkdir()
    for tag in ("27.4b-q8_0", "12.2b-q8_0"):  # the router would fold these ':' tags together
        (colon / f"g-{tag}.gguf").write_bytes(ollama_store.gguf_bytes(
            size_label=tag.split("-")[0].upper(), file_type="Q8_0",
            extra={"general.basename": "g", "general.name": tag}))
    started = env.run("start")
    assert started.returncode == 0, started.stderr + started.stdout
    try:
        models = requests.get(f"{env.base_url}/models", timeout=10).json()["data"]
        ids = {m["id"] for m in models}
        assert ids == {"ls/gemma-3-270m-q4_k_m", "ls/g-27.4b-q8_0", "ls/g-12.2b-q8_0"}
        aliases = {a for m in models for a in m["aliases"]}
        assert {"ls/gemma-3:270m-q4_k_m", "ls/g:27.4b-q8_0", "ls/g:12.2b-q8_0"} <= aliases
        reply = requests.post(f"{env.base_url}/v1/chat/completions", timeout=120, json={
            "model": "ls/gemma-3:270m-q4_k_m", "max_tokens": 4,
            "messages": [{"role": "user", "content": "Hi"}]})
        assert reply.status_code == 200, reply.text
        # The loaded file is the one behind the odd folder name, reached through a safe link.
        link = next((env.state / "paths").iterdir())
        assert os.path.realpath(link) == os.path.realpath(gemma_path)
        assert os.readlink(link) == str(odd / "gemma-3-270m-q4_k_m.gguf")
        unknown = requests.post(f"{env.base_url}/v1/chat/completions", timeout=30, json={
            "model": "ls/nope", "messages": [{"role": "user", "content": "Hi"}]})
        assert unknown.status_code in (400, 404) and "not found" in unknown.text
    finally:
        env.run("stop")
    assert llama_servers_under(env.home.parent) == []


def test_sync_rewrites_only_when_changed_and_the_router_reloads(env: Env, gemma_path) -> None:
    (env.models / gemma_path.name).symlink_to(gemma_path)
    assert env.run("start").returncode == 0
    try:
        ini = env.state / "models.ini"
        before = ini.stat().st_mtime_ns
        unchanged = env.run("sync", "--no-bridge")
        assert "unchanged" in unchanged.stdout and ini.stat().st_mtime_ns == before
        (env.models / "extra.gguf").write_bytes(ollama_store.gguf_bytes(
            size_label="1B", extra={"general.basename": "extra"}))
        changed = env.run("sync", "--no-bridge")
        assert "written" in changed.stdout and "reloaded" in changed.stdout, changed.stdout
        ids = {m["id"] for m in requests.get(f"{env.base_url}/models", timeout=10).json()["data"]}
        assert "ls/extra-1b-q4_k_m" in ids
    finally:
        env.run("stop")


def test_what_a_reload_restarts_is_what_the_router_restarts(env: Env, gemma_path) -> None:
    """The router compares a running model's preset without its aliases: a new alias keeps it
    running (no hold, nothing saved), a new option restarts it."""
    from model_serve.config.settings import load_settings
    from model_serve.engines.llama_server import LlamaServerEngine
    from tests.conftest import running

    (env.models / gemma_path.name).symlink_to(gemma_path)
    engine = LlamaServerEngine(load_settings(dict(env)))
    model_id, ini = "ls/gemma-3-270m-q4_k_m", env.state / "models.ini"

    def state() -> str:
        return next(m.state for m in engine.models() if m.name == model_id)

    def change(custom: str) -> set[str] | None:
        before = ini.read_text()
        (env.home / "custom_models.yaml").write_text(custom)
        assert env.run("sync", "--no-bridge").returncode == 0
        return engine.restarted_by_reload(before, ini.read_text())

    with running(env):
        requests.post(f"{env.base_url}/v1/completions", timeout=120, json={
            "model": "ls/gemma-3:270m-q4_k_m", "prompt": "Hello", "max_tokens": 1})
        assert state() == "loaded"
        assert change("models:\n  gemma-3:270m-q4_k_m:\n    aliases: [lighthouse]\n") == set()
        assert state() == "loaded"
        assert change("models:\n  gemma-3:270m-q4_k_m:\n    aliases: [lighthouse]\n"
                      "    sampler_args: '--temp 0.5'\n") == {model_id}
        assert state() == "unloaded"
