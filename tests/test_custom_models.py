"""custom_models.yaml: every mistake named with file, line and fix; the old config survives."""

from __future__ import annotations

import json

import pytest

from tests import ollama_store
from tests.conftest import Env


@pytest.fixture
def two_models(env: Env) -> Env:
    (env.models / "alpha.gguf").write_bytes(ollama_store.gguf_bytes(
        size_label="1B", extra={"general.basename": "alpha"}))
    (env.models / "beta.gguf").write_bytes(ollama_store.gguf_bytes(
        size_label="2B", file_type="Q8_0", context_length=32768,
        extra={"general.basename": "beta"}))
    return env


def _write(env: Env, text: str) -> None:
    (env.home / "custom_models.yaml").write_text(text)


def _show(env: Env, name: str) -> dict:
    result = env.run("show", name, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_settings_reach_the_model(two_models: Env) -> None:
    env = two_models
    _write(env, """models:
  beta:2b-q8_0:
    sampler_args: "--temp 0.7 --top-nsigma 1.5 --min-p 0.05"
    ctx_size: 16384
    ttl: 0
    parallel: 2
    aliases: [beta]
  alpha-1b-q4_k_m:        # the dash form of a name works too
  beta-creative:
    base_model: beta:2b-q8_0
    sampler_args: "--temp 1.2 --threads 2"
""")
    beta = _show(env, "ls/beta:2b-q8_0")  # MODEL_THREADS=1 (conftest) fills in --threads
    assert beta["options"] == {"temp": "0.7", "top-nsigma": "1.5", "min-p": "0.05",
                               "threads": "1"}
    assert beta["ctx_size"] == 16384 and "custom_models.yaml:2" in beta["ctx_reason"]
    assert beta["ttl"] == 0 and beta["parallel"] == 2 and beta["aliases"] == ["beta"]
    creative = _show(env, "ls/beta-creative")
    assert creative["path"] == beta["path"]
    assert creative["options"] == {"temp": "1.2", "threads": "2"}  # its own --threads wins
    synced = env.run("sync", "--no-bridge")
    assert synced.returncode == 0, synced.stderr
    ini = (env.state / "models.ini").read_text()
    assert "[ls/beta-creative]" in ini and "top-nsigma = 1.5" in ini
    assert "alias = ls/beta:2b-q8_0,beta" in ini
    section = ini.split("[ls/beta-2b-q8_0]")[1].split("\n\n")[0]
    assert "sleep-idle-seconds" not in section  # ttl 0 = never unload on idle
    assert "threads = 1" in section


@pytest.mark.parametrize("text,expected,hint", [
    ("models:\n  beta:2b-q8_0:\n    ctx_sise: 4096\n", ":3: unknown key 'ctx_sise'",
     "did you mean 'ctx_size'?"),
    ("models:\n  beta:2b-q8_0:\n    ctx_size: big\n", ":3: 'ctx_size' must be a whole number",
     "ctx_size:"),
    ("models:\n  beta:2b-q8_0:\n    jinja: 3\n", ":3: 'jinja' must be true or false", "jinja:"),
    ("models:\n  beta:2b-q8_0:\n    sampler_args: '--temprature 0.7'\n",
     "llama-server has no option '--temprature'", "did you mean --temp"),
    ("models:\n  beta:2b-q8_0:\n    sampler_args: '--port 9999'\n",
     "'--port' is set by model_serve itself", "remove --port"),
    ("models:\n  beta:2b-q8_0:\n   ttl: 5\n  bad\n", "invalid YAML", "last good config"),
    ("modles:\n  beta:2b-q8_0:\n", ":1: unknown top-level key 'modles'", "'models:'"),
])
def test_mistakes_are_named_and_the_old_config_stays(two_models: Env, text: str, expected: str,
                                                     hint: str) -> None:
    env = two_models
    assert env.run("sync", "--no-bridge").returncode == 0
    good = (env.state / "models.ini").read_text()
    _write(env, text)
    result = env.run("sync", "--no-bridge")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "custom_models.yaml" in result.stderr
    assert expected in result.stderr
    assert hint in result.stderr
    assert (env.state / "models.ini").read_text() == good


def test_duplicate_alias_is_refused(two_models: Env) -> None:
    env = two_models
    _write(env, "models:\n  alpha:1b-q4_k_m:\n    aliases: [x]\n"
                "  beta:2b-q8_0:\n    aliases: [x]\n")
    result = env.run("sync", "--no-bridge")
    assert result.returncode == 2 and "'x' is used by both" in result.stderr


def test_entry_for_a_missing_model_is_a_warning_not_a_failure(two_models: Env) -> None:
    # Models come and go (ollama rm, a pull not done yet); their settings may stay.
    env = two_models
    _write(env, "models:\n  beta:2b-q9_0:\n    ttl: 5\n  alpha:1b-q4_k_m:\n    ttl: 7\n")
    result = env.run("sync", "--no-bridge")
    assert result.returncode == 0, result.stderr
    assert "custom_models.yaml: line 2: model 'beta:2b-q9_0' matches no model" in result.stderr
    assert "did you mean 'beta:2b-q8_0'?" in result.stderr
    assert _show(env, "ls/alpha:1b-q4_k_m")["ttl"] == 7
