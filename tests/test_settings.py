"""Settings: defaults, .env, environment precedence, and one clear error per bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_serve.config.settings import SETTINGS_TABLE, env_example, load_settings
from model_serve.errors import ConfigError
from tests.conftest import REPO, Env


def test_defaults_match_the_documented_table(tmp_path: Path) -> None:
    settings = load_settings({"MODEL_SERVE_HOME": str(tmp_path), "HOME": str(tmp_path)})
    assert settings.port == 5847
    assert settings.host == "127.0.0.1"
    assert settings.model_ttl == 1800
    assert settings.memory_pressure_threshold == 75
    assert settings.pressure_check_interval == 30
    assert settings.model_prefix == "ls/"
    assert settings.default_ctx_size == 8192
    assert settings.default_parallel == 1
    assert settings.bridge_sync_interval == 3600
    assert settings.models_dir == tmp_path / ".cache/lm-studio/models"
    assert settings.state_dir == tmp_path / "state"
    assert settings.api_keys == ()


def test_environment_overrides_env_file_overrides_defaults(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("MODEL_TTL=60\nLLAMA_SWAP_PORT=6000\nAPI_KEYS=a, b\n")
    settings = load_settings({"MODEL_SERVE_HOME": str(tmp_path), "LLAMA_SWAP_PORT": "7000"})
    assert settings.model_ttl == 60
    assert settings.port == 7000
    assert settings.api_keys == ("a", "b")
    assert settings.sources["MODEL_TTL"] == str(tmp_path / ".env")


def test_bad_value_names_variable_and_file(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("MODEL_TTL=abc\n")
    with pytest.raises(ConfigError) as err:
        load_settings({"MODEL_SERVE_HOME": str(tmp_path)})
    assert "MODEL_TTL='abc'" in err.value.message
    assert str(tmp_path / ".env") in err.value.message
    assert err.value.exit_code == 2


def test_misspelt_setting_is_refused_with_a_suggestion(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("MODEL_TLL=60\n")
    with pytest.raises(ConfigError) as err:
        load_settings({"MODEL_SERVE_HOME": str(tmp_path)})
    assert "MODEL_TLL" in err.value.message and "MODEL_TTL" in err.value.hint


@pytest.mark.parametrize("name,value", [("LLAMA_SWAP_PORT", "70000"), ("ENGINE", "vllm"),
                                        ("MEMORY_PRESSURE_THRESHOLD", "0")])
def test_out_of_range_values(tmp_path: Path, name: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({"MODEL_SERVE_HOME": str(tmp_path), name: value})
    assert name in err.value.message and "the environment" in err.value.message


def test_cli_reports_bad_setting_in_one_line_with_exit_2(env: Env) -> None:
    (env.home / ".env").write_text("MODEL_TTL=abc\n")
    result = env.run("list")
    assert result.returncode == 2
    first = result.stderr.splitlines()[0]
    assert "MODEL_TTL='abc'" in first and ".env" in first
    assert "Traceback" not in result.stderr


def test_env_example_documents_every_setting() -> None:
    text = (REPO / ".env.example").read_text()
    assert text == env_example(), "regenerate .env.example from model_serve.config.settings"
    for setting in SETTINGS_TABLE:
        assert f"\n{setting.name}={setting.default}\n" in text


def test_readme_documents_every_setting() -> None:
    readme = (REPO / "README.md").read_text()
    missing = [s.name for s in SETTINGS_TABLE if f"`{s.name}`" not in readme]
    assert missing == []


@pytest.mark.parametrize("where", ["models", "models/..", "home", "/"])
def test_kv_cache_dir_never_holds_the_users_models_or_home(tmp_path: Path, where: str) -> None:
    models = tmp_path / "models"
    models.mkdir()
    folder = {"models": str(models), "models/..": str(tmp_path), "home": str(tmp_path / "h"),
              "/": "/"}[where]
    environ = {"MODEL_SERVE_HOME": str(tmp_path), "HOME": str(tmp_path / "h"),
               "MODELS_DIR": str(models), "KV_CACHE_DIR": folder}
    with pytest.raises(ConfigError, match="(?s)KV_CACHE_DIR=.*a folder of its own"):
        load_settings(environ)
    inside = load_settings({**environ, "KV_CACHE_DIR": str(tmp_path / "h" / "kv")})
    assert inside.kv_cache_dir == tmp_path / "h" / "kv"


def test_ollama_host_exported_for_ollamas_clients_is_not_the_users_ollama(
        tmp_path: Path) -> None:
    """A shell that points Ollama's clients at model_serve (OLLAMA_HOST=127.0.0.1:5847; the
    service takes the shell's settings) does not make model_serve call itself for pulls:
    .env's OLLAMA_HOST, else Ollama's default, is the user's Ollama."""
    base = {"MODEL_SERVE_HOME": str(tmp_path), "HOME": str(tmp_path)}
    exported = load_settings({**base, "OLLAMA_HOST": "127.0.0.1:5847"})
    assert exported.ollama_host == "http://127.0.0.1:11434"
    assert "model_serve's own port" in exported.sources["OLLAMA_HOST"]
    (tmp_path / ".env").write_text("OLLAMA_HOST=http://studio.lan:11434\n")
    assert load_settings({**base, "OLLAMA_HOST": "localhost:5847"}).ollama_host == \
        "http://studio.lan:11434"
    other = load_settings({**base, "OLLAMA_HOST": "127.0.0.1:11500"})  # an Ollama elsewhere
    assert other.ollama_host == "127.0.0.1:11500" and other.sources["OLLAMA_HOST"] == \
        "the environment"
