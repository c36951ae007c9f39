"""pull / update and what follows them, with the stand-in `ollama` (tests/ollama and
tests/ollama_server.py, which write real manifests and blobs): pulling needs the registry, and
there is no network here. Everything after the pull is real: bridge, catalog, config. What
needs no registry (create, cp, rm, list, doctor, run) runs against the real Ollama in
tests/test_real_ollama.py; so does the "no server" case here."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from model_serve.runtime.procs import wait_until
from tests import ollama_store
from tests.conftest import REPO, Env, free_port
from tests.real_ollama import BINARY

STANDIN = REPO / "tests" / "ollama"
GEMMA = "ls/gemma3:268.10m-q4_k_m"


SERVER = REPO / "tests" / "ollama_server.py"


@contextlib.contextmanager
def ollama_server(store: Path, registry: Path) -> Iterator[str]:
    """The stand-in Ollama server on a free port, its store `store`; yields its OLLAMA_HOST."""
    port = free_port()
    environ = {**os.environ, "OLLAMA_MODELS": str(store), "OLLAMA_STANDIN_REGISTRY": str(registry)}
    server = subprocess.Popen([sys.executable, str(SERVER), str(port)], env=environ)
    host = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _answers(host), timeout=15), "the stand-in server did not start"
        yield host
    finally:
        server.terminate()
        server.wait(timeout=10)


def _answers(host: str) -> bool:
    import requests

    try:
        return requests.get(host + "/api/version", timeout=1).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture
def ollama_env(env: Env, tmp_path: Path, gemma_path: Path) -> Iterator[Env]:
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({
        "tiny:latest": {"model_type": "1B", "file_type": "Q4_K_M"},
        "tiny:2b": {"model_type": "2B", "file_type": "Q8_0"},
        "alice/coder:latest": {"model_type": "7B", "file_type": "Q4_K_M"},
        "hf.co/bartowski/Small-GGUF:Q8_0": {"model_type": "3B", "file_type": "Q8_0"},
        "gemma3:270m": {"model_type": "268.10M", "file_type": "Q4_K_M", "arch": "gemma3",
                        "gguf_file": str(gemma_path)},
    }))
    env["OLLAMA_BIN"] = str(STANDIN)
    env.registry = registry  # type: ignore[attr-defined]
    # The server's store is the one model_serve bridges (OLLAMA_MODELS of the env fixture).
    with ollama_server(Path(env["OLLAMA_MODELS"]), registry) as host:
        env["OLLAMA_HOST"] = host
        yield env


def test_pull_syncs_and_prints_the_served_name(ollama_env: Env) -> None:
    env = ollama_env
    result = env.run("pull", "tiny")
    assert result.returncode == 0, result.stderr
    assert "success" in result.stderr  # Ollama's own progress is shown
    assert "use it as: ls/tiny:1b-q4_k_m" in result.stdout
    assert "[ls/tiny-1b-q4_k_m]" in (env.state / "models.ini").read_text()
    for name, served in [("alice/coder", "ls/coder:7b-q4_k_m"),
                         ("hf.co/bartowski/Small-GGUF:Q8_0", "ls/small-gguf:3b-q8_0")]:
        pulled = env.run("pull", name)
        assert f"use it as: {served}" in pulled.stdout, pulled.stdout + pulled.stderr


def test_failed_pull_changes_nothing(ollama_env: Env) -> None:
    env = ollama_env
    assert env.run("pull", "tiny").returncode == 0
    ini = (env.state / "models.ini").read_text()
    links = sorted(p.name for p in (env.models / "ollama").rglob("*"))
    result = env.run("pull", "no-such-model")
    assert result.returncode == 1
    assert "ollama pull no-such-model failed" in result.stderr
    assert "file does not exist" in result.stderr
    assert (env.state / "models.ini").read_text() == ini
    assert sorted(p.name for p in (env.models / "ollama").rglob("*")) == links


def test_ollama_missing_or_stopped(env: Env) -> None:
    env["PATH"] = "/usr/bin:/bin"  # no ollama here
    missing = env.run("pull", "tiny")
    assert missing.returncode == 1 and "ollama command was not found" in missing.stderr
    assert "ollama.com/download" in missing.stderr
    env["OLLAMA_BIN"] = str(BINARY)  # the real CLI
    env["OLLAMA_HOST"] = f"http://127.0.0.1:{free_port()}"  # no server there
    down = env.run("pull", "tiny")
    assert down.returncode == 1 and "could not connect" in down.stderr
    assert "Ollama is running" in down.stderr


def test_list_filters_and_json(ollama_env: Env) -> None:
    env = ollama_env
    for name in ("tiny", "tiny:2b", "alice/coder"):
        assert env.run("pull", name).returncode == 0
    listed = env.run("list", "TINY")
    assert "ls/tiny:1b-q4_k_m" in listed.stdout and "ls/tiny:2b-q8_0" in listed.stdout
    assert "coder" not in listed.stdout
    data = json.loads(env.run("list", "--json", "coder").stdout)
    assert [d["name"] for d in data] == ["ls/coder:7b-q4_k_m"]
    assert data[0]["ollama_names"] == ["alice/coder:latest"] and data[0]["quant"] == "Q4_K_M"
    served = env.run("list", "--served")
    assert served.returncode == 3 and "not running" in served.stderr


def test_rm_by_filter_asks_first(ollama_env: Env) -> None:
    env = ollama_env
    for name in ("tiny", "tiny:2b", "alice/coder"):
        assert env.run("pull", name).returncode == 0
    declined = env.run("rm", "--filter", "tiny", input="n\n")
    assert "tiny:latest" in declined.stdout and "nothing removed" in declined.stdout
    assert len(json.loads(env.run("list", "--json").stdout)) == 3
    removed = env.run("rm", "--filter", "tiny", "--yes")
    assert removed.returncode == 0, removed.stderr
    assert "removed tiny:latest" in removed.stdout and "removed tiny:2b" in removed.stdout
    names = [d["name"] for d in json.loads(env.run("list", "--json").stdout)]
    assert names == ["ls/coder:7b-q4_k_m"]
    unknown = env.run("rm", "nothing-like-it", "--yes")
    assert unknown.returncode == 2 and "no Ollama model named" in unknown.stderr


def test_update_reports_what_changed(ollama_env: Env) -> None:
    env = ollama_env
    for name in ("tiny", "alice/coder"):
        assert env.run("pull", name).returncode == 0
    registry = json.loads(env.registry.read_text())  # type: ignore[attr-defined]
    registry["tiny:latest"]["revision"] = 2  # upstream published new weights
    env.registry.write_text(json.dumps(registry))  # type: ignore[attr-defined]
    result = env.run("update")
    assert result.returncode == 0, result.stderr
    assert "tiny:latest: updated" in result.stdout
    assert "alice/coder:latest: already up to date" in result.stdout


def test_doctor(env: Env) -> None:
    env["OLLAMA_BIN"] = str(BINARY)  # the real CLI; no server answers
    env["OLLAMA_HOST"] = f"http://127.0.0.1:{free_port()}"
    result = env.run("doctor")
    assert result.returncode == 0, result.stdout
    assert "[ok  ] engine: llama-server" in result.stdout
    assert "[WARN] ollama:" in result.stdout and "no server answers" in result.stdout
    assert "[ok  ] ollama store:" in result.stdout
    assert "[ok  ] threads: 1 per model server (MODEL_THREADS" in result.stdout
    env["MODEL_THREADS"] = "0"  # llama-server's default: a warning on a small machine only
    threads = env.run("doctor").stdout
    if (os.cpu_count() or 1) <= 4:
        assert "[WARN] threads: each model server starts one thread per core" in threads
        assert "MODEL_THREADS=1" in threads
    else:
        assert "[ok  ] threads: llama-server's choice" in threads
    env["MODELS_DIR"] = str(env.home / "missing")
    broken = env.run("doctor")
    assert broken.returncode == 1 and "[FAIL] MODELS_DIR" in broken.stdout
    assert "mkdir -p" in broken.stdout


def test_rm_and_update_go_on_past_a_failure_and_always_sync(ollama_env: Env) -> None:
    env = ollama_env
    for name in ("tiny", "tiny:2b", "alice/coder"):
        assert env.run("pull", name).returncode == 0
    store = Path(env["OLLAMA_MODELS"])
    ollama_store.manifest_path(store, "tiny:2b").unlink()  # gone behind model_serve's back
    removed = env.run("rm", "--filter", "tiny", "--yes")
    assert removed.returncode == 1
    assert "ollama rm tiny:2b failed: Error: model 'tiny:2b' not found" in removed.stderr
    assert "removed tiny:latest" in removed.stdout  # the one after the failure still went
    assert "model(s) for llama-server" in removed.stdout  # and the sync ran
    assert [d["name"] for d in json.loads(env.run("list", "--json").stdout)] == \
        ["ls/coder:7b-q4_k_m"]

    assert env.run("pull", "tiny").returncode == 0
    registry = json.loads(env.registry.read_text())  # type: ignore[attr-defined]
    del registry["alice/coder:latest"]  # no longer in the registry: its pull fails
    registry["tiny:latest"]["revision"] = 2
    env.registry.write_text(json.dumps(registry))  # type: ignore[attr-defined]
    updated = env.run("update")
    assert updated.returncode == 1
    assert "ollama pull alice/coder:latest failed" in updated.stderr
    assert "tiny:latest: updated" in updated.stdout  # pulled after the failure, then synced


def test_a_server_that_keeps_its_models_elsewhere_is_named(env: Env, tmp_path: Path) -> None:
    """The real CLI is a client: the server decides the store. OLLAMA_MODELS set for
    model_serve does not move the server's pulls, so a mismatch must be caught and said."""
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"tiny:latest": {"model_type": "1B"}}))
    servers_store = tmp_path / "servers-store"
    (servers_store / "blobs").mkdir(parents=True)
    env["OLLAMA_BIN"] = str(STANDIN)
    with ollama_server(servers_store, registry) as host:
        env["OLLAMA_HOST"] = host  # from the environment, as a .env line would give it
        pulled = env.run("pull", "tiny")
        assert pulled.returncode == 1, pulled.stdout + pulled.stderr
        assert "keeps its models in another folder" in pulled.stderr
        assert env["OLLAMA_MODELS"] in pulled.stderr and "set OLLAMA_MODELS" in pulled.stderr
        assert (servers_store / "manifests").is_dir()  # the server did pull it, there
        doctor = {c["name"]: c for c in json.loads(env.run("doctor", "--json").stdout)}
        assert doctor["ollama store"]["status"] == "warn"
        assert "tiny:latest" in doctor["ollama store"]["detail"]
        env["OLLAMA_MODELS"] = str(servers_store)  # the fix the message gives
        assert env.run("sync").returncode == 0
        listed = [d["name"] for d in json.loads(env.run("list", "--json").stdout)]
        assert listed == ["ls/tiny:1b-q4_k_m"]
