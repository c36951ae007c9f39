"""Only model_serve reaches the engine and the model servers behind the front: they answer to
the key the supervisor makes at each start (STATE_DIR/internal-key), never on a command line.
Real programs: the llama-server router and the real llama-swap (v250), with the real gemma
model; FRONT=off keeps the user's API_KEYS, the model servers included."""

from __future__ import annotations

import shlex
import stat
from pathlib import Path

import psutil
import pytest
import requests
import yaml
from openai import OpenAI

from model_serve.config.custom_models import load_custom_models
from model_serve.config.settings import load_settings
from model_serve.engines import select_engine
from model_serve.engines.base import EngineModel
from model_serve.engines.llama_server import LlamaServerEngine
from model_serve.engines.llama_swap import KEY_ENV, LlamaSwapEngine
from model_serve.models.catalog import build_catalog
from model_serve.models.plan import build_plan
from tests.conftest import TWIN, Env, running, stack_processes_under
from tests.ollama_store import gguf_bytes
from tests.test_llama_swap import llama_swap_binary, port_block, validate_config

A = "ls/gemma-3:270m-q4_k_m"
PROMPT = [{"role": "user", "content": "Say hi."}]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def loaded_model(env: Env, name: str = A) -> EngineModel:
    """`name` as the engine lists it (its own port: the router's `status.args --port`,
    llama-swap's `/running` proxy), read with the key model_serve uses."""
    model = next(m for m in select_engine(load_settings(dict(env))).models()
                 if m.served_name == name)
    assert model.state == "loaded" and model.port, model
    return model


def assert_keyed(url: str, key: str) -> None:
    """`url` refuses a request without `key` (or with another one) and takes one with it;
    its /health stays open (the engines' own health checks ask it without a key)."""
    assert requests.get(f"{url}/v1/models", timeout=10).status_code == 401, url
    assert requests.get(f"{url}/v1/models", headers=bearer("guess"),
                        timeout=10).status_code == 401, url
    refused = requests.post(f"{url}/v1/chat/completions", timeout=30,
                            json={"model": A, "messages": PROMPT, "max_tokens": 2})
    assert refused.status_code == 401, url
    assert requests.get(f"{url}/v1/models", headers=bearer(key), timeout=10).status_code == 200
    assert requests.get(f"{url}/health", timeout=10).status_code == 200, url


def test_engine_and_model_servers_answer_only_to_the_internal_key(both: Env) -> None:
    client = OpenAI(base_url=f"{both.base_url}/v1", api_key="x", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model=A, messages=PROMPT, max_tokens=3)
    assert reply.usage.completion_tokens > 0
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=A, messages=PROMPT, max_tokens=3, stream=True) if c.choices]
    assert "".join(pieces)

    key_file = both.state / "internal-key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip()
    engine_url = f"http://127.0.0.1:{both['ENGINE_PORT']}"
    assert_keyed(engine_url, key)

    model_url = f"http://127.0.0.1:{loaded_model(both).port}"
    assert_keyed(model_url, key)
    # /slots shows prompts (with KV_CACHE on): the model server's own port keeps it closed.
    assert requests.get(f"{model_url}/slots", timeout=10).status_code == 401
    assert requests.get(f"{model_url}/slots", headers=bearer(key), timeout=10).status_code == 200

    for pid in stack_processes_under(both.home.parent):
        try:
            cmdline = " ".join(psutil.Process(pid).cmdline())
        except psutil.Error:
            continue
        assert key not in cmdline, f"pid {pid} shows the key: {cmdline}"


@pytest.fixture
def front_off(engine_env: Env, gemma_path: Path) -> Env:
    engine_env.update({"FRONT": "off", "API_KEYS": "sekret,other"})
    (engine_env.models / gemma_path.name).symlink_to(gemma_path)
    (engine_env.home / "custom_models.yaml").write_text(TWIN)
    return engine_env


def test_front_off_model_servers_answer_only_to_the_users_keys(front_off: Env) -> None:
    with running(front_off, stop_timeout=90):
        client = OpenAI(base_url=f"{front_off.base_url}/v1", api_key="other", max_retries=0,
                        timeout=120)
        assert client.chat.completions.create(
            model=A, messages=PROMPT, max_tokens=2).usage.completion_tokens > 0
        assert_keyed(front_off.base_url, "sekret")
        # No front, no dashboard: the status says so.
        status = front_off.run("status")
        assert "page:     none (FRONT=off" in status.stdout, status.stdout
        model_url = f"http://127.0.0.1:{loaded_model(front_off).port}"
        assert_keyed(model_url, "sekret")
        assert requests.get(f"{model_url}/slots", timeout=10).status_code == 401
        keys_file = front_off.state / "api-keys"
        assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
        assert not (front_off.state / "internal-key").exists()


# --- what the engines are started with --------------------------------------------------
def test_router_gets_its_key_file_by_its_environment(env: Env) -> None:
    engine = LlamaServerEngine(load_settings(dict(env)))
    assert not any(word.startswith("--api-key") for word in engine.command())
    assert engine.environment() == {"LLAMA_ARG_API_KEY_FILE": str(env.state / "internal-key")}
    env.update({"FRONT": "off", "API_KEYS": "alpha,beta"})
    engine = LlamaServerEngine(load_settings(dict(env)))
    assert not any(word.startswith("--api-key") for word in engine.command())
    keys_file = env.state / "api-keys"
    assert engine.environment() == {"LLAMA_ARG_API_KEY_FILE": str(keys_file)}
    assert keys_file.read_text() == "alpha\nbeta\n"
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    env["API_KEYS"] = ""
    assert LlamaServerEngine(load_settings(dict(env))).environment() == {}


def swap_config(env: Env) -> tuple[LlamaSwapEngine, str, dict]:
    settings = load_settings(dict(env))
    catalog = build_catalog(settings.models_dir, settings.model_prefix, settings.state_dir)
    custom = load_custom_models(settings.custom_models_file)
    plan = build_plan(catalog, custom, settings, budget=1 << 40)
    engine = LlamaSwapEngine(settings)
    text = engine.render_config(plan)
    return engine, text, yaml.safe_load(text)


@pytest.fixture
def swap_home(env: Env, tmp_path: Path) -> Env:
    env.port = port_block()
    env.update({"ENGINE": "llama-swap", "LLAMA_SWAP_BIN": str(llama_swap_binary(tmp_path)),
                "LLAMA_SWAP_PORT": str(env.port), "DEFAULT_CTX_SIZE": "2048"})
    (env.models / "tiny-1b-q4_k_m.gguf").write_bytes(gguf_bytes(name="Tiny", size_label="1B"))
    (env.home / "custom_models.yaml").write_text(
        "models:\n  own:\n    base_model: tiny:1b-q4_k_m\n"
        "    cmd: /opt/llama-server -m ${MODEL_PATH} --port ${PORT}\n")
    return env


def test_llama_swap_config_names_the_key_but_never_holds_it(swap_home: Env) -> None:
    from model_serve import internal_key

    settings = load_settings(dict(swap_home))
    key = internal_key.make(settings)
    engine, text, config = swap_config(swap_home)
    validate_config(text)
    assert key not in text
    assert config["apiKeys"] == [f"${{env.{KEY_ENV}}}"]  # filled by llama-swap at its start
    assert engine.environment() == {KEY_ENV: key}
    assert config["captureBuffer"] == 0  # llama-swap's own default keeps 5 MB of prompts
    argv = shlex.split(config["models"]["ls/tiny:1b-q4_k_m"]["cmd"])
    assert argv[argv.index("--api-key-file") + 1] == str(settings.internal_key_file)
    # A cmd the user wrote is theirs (README: add --api-key-file to it).
    assert "--api-key-file" not in config["models"]["ls/own"]["cmd"]
    # A new key at the next start leaves config.yaml as it was.
    internal_key.make(settings)
    assert swap_config(swap_home)[1] == text

    swap_home.update({"FRONT": "off", "API_KEYS": "alpha,beta", "LLAMA_SWAP_CAPTURE_MB": "3"})
    engine, text, config = swap_config(swap_home)
    assert config["apiKeys"] == ["alpha", "beta"] and config["captureBuffer"] == 3
    argv = shlex.split(config["models"]["ls/tiny:1b-q4_k_m"]["cmd"])
    assert Path(argv[argv.index("--api-key-file") + 1]).read_text() == "alpha\nbeta\n"
    assert engine.environment() == {}


@pytest.mark.parametrize("release", [200, 150])
def test_older_llama_swap_builds_keep_serving(swap_home: Env, tmp_path: Path,
                                              release: int) -> None:
    """v179-v224 drop the client's key before the model server, so a key there would refuse
    every request; builds before v184 cannot fill ${env.…}, so behind the front they stay
    open rather than answer to a key nobody has."""
    old = tmp_path / f"llama-swap-{release}"
    old.write_text(f"#!/bin/sh\nprintf 'version: {release} (4f1a2b3c), built at 2025-05-01'\n")
    old.chmod(0o755)
    swap_home["LLAMA_SWAP_BIN"] = str(old)
    engine, text, config = swap_config(swap_home)
    assert "--api-key-file" not in text
    if release >= 184:
        assert config["apiKeys"] == [f"${{env.{KEY_ENV}}}"]
    else:
        assert "apiKeys" not in config and engine.environment() == {}
