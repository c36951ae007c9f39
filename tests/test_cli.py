"""The CLI as a user meets it: help, bad input, clear errors, nothing deleted."""

from __future__ import annotations

import socket
import subprocess

from tests.conftest import REPO, Env

MISSION_COMMANDS = ("pull", "rm", "list", "sync", "stats", "run", "start", "stop", "status")


def test_repo_root_executable_lists_every_command() -> None:
    out = subprocess.run([str(REPO / "model"), "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Usage: model ")
    for command in MISSION_COMMANDS:
        assert f"\n  {command} " in out.stdout


def test_missing_models_dir(env: Env) -> None:
    env["MODELS_DIR"] = str(env.home / "nope")
    for command in ("sync", "start"):
        result = env.run(command)
        assert result.returncode == 2, result.stderr
        assert "MODELS_DIR" in result.stderr and "does not exist" in result.stderr
    assert not (env.home / "nope").exists()


def test_empty_models_dir_syncs_to_an_empty_config(env: Env) -> None:
    result = env.run("sync", "--no-bridge")
    assert result.returncode == 0, result.stderr
    assert "0 model(s)" in result.stdout
    listed = env.run("list")
    assert listed.returncode == 0 and "no models found" in listed.stdout


def test_port_in_use_is_refused_before_anything_starts(env: Env, gemma_path) -> None:
    (env.models / gemma_path.name).symlink_to(gemma_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", env.port))
        busy.listen()
        result = env.run("start")
    assert result.returncode == 1
    assert f"port {env.port} is already in use" in result.stderr
    assert not (env.state / "supervisor.json").exists()


def test_missing_llama_server(env: Env) -> None:
    env["LLAMA_SERVER_BIN"] = str(env.home / "no-such-llama-server")
    result = env.run("start")
    assert result.returncode == 1
    assert "LLAMA_SERVER_BIN" in result.stderr and "not an executable" in result.stderr


def test_broken_symlink_is_reported_and_kept(env: Env, gemma_path) -> None:
    (env.models / gemma_path.name).symlink_to(gemma_path)
    broken = env.models / "gone.gguf"
    broken.symlink_to(env.home / "deleted.gguf")
    result = env.run("sync", "--no-bridge")
    assert result.returncode == 0, result.stderr
    assert "gone.gguf" in result.stderr and "broken link" in result.stderr
    assert "1 model(s)" in result.stdout
    assert broken.is_symlink(), "a user's link is never deleted"


def test_not_a_gguf_is_skipped_with_a_warning(env: Env) -> None:
    (env.models / "notes.gguf").write_text("not a model")
    result = env.run("sync", "--no-bridge")
    assert result.returncode == 0
    assert "notes.gguf" in result.stderr and "not a GGUF" in result.stderr
    assert (env.models / "notes.gguf").exists()


def test_stop_when_not_running(env: Env) -> None:
    result = env.run("stop")
    assert result.returncode == 0 and "not running" in result.stdout


def test_bad_custom_models_stops_start_before_anything_runs(env: Env, gemma_path) -> None:
    (env.models / gemma_path.name).symlink_to(gemma_path)
    (env.home / "custom_models.yaml").write_text(
        "models:\n  gemma-3:270m-q4_k_m:\n    ttl: soon\n")
    result = env.run("start")
    assert result.returncode == 2
    assert "custom_models.yaml:3" in result.stderr and "must be a whole number" in result.stderr
    assert not (env.state / "supervisor.json").exists()


def test_readme_documents_every_command() -> None:
    from model_serve.cli import main

    readme = (REPO / "README.md").read_text()
    missing = [name for name in main.commands if f"`model {name}" not in readme]
    assert missing == []
    for script in ("install.sh", "setup_service.sh", "setup_cron.sh"):
        assert f"./{script}" in readme
