"""The bridge, `model list/rm/update/pull/doctor/run` and OLLAMA_HOST against the real Ollama
0.32.15 (../shared/tools/ollama): its store is made by the real binary (`ollama create` from
the gemma GGUF, `ollama cp`, `ollama rm`), through one real `ollama serve` the whole module
shares (private store, HOME and port). Only pulling from the registry needs the network; that
part keeps the stand-in (tests/test_ollama_commands.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from tests.conftest import Env, running
from tests.real_ollama import BINARY, Ollama, serving

BRIDGE = Path(__file__).resolve().parents[1] / "lm-studio-ollama-bridge" / "ollama-bridge"
GEMMA = "ls/gemma3:268.10m-q4_k_m"  # what model_serve serves `ollama create gemma3` as


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ollama]:
    assert BINARY.exists(), f"{BINARY} is missing (the real Ollama for tests)"
    with serving(tmp_path_factory.mktemp("real-ollama")) as ollama:
        yield ollama


@pytest.fixture
def ollama(server: Ollama) -> Iterator[Ollama]:
    """The shared server, its store emptied by `ollama rm` after each test."""
    yield server
    import requests

    for model in requests.get(f"{server.host}/api/tags", timeout=10).json()["models"]:
        server.cli("rm", model["name"])


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.lstat().st_ino, p.lstat().st_mtime_ns) for p in [root, *root.rglob("*")]}


def bridge(store: Path, dest: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BRIDGE), "--store", str(store), "--dest",
                           str(dest), *args], capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "HOME": str(dest.parent),
                               "LANG": "C.UTF-8"})


def model_digest(ollama: Ollama, name: str, tag: str = "latest") -> str:
    manifest = ollama.store / "manifests" / "registry.ollama.ai" / name / tag
    [layer] = [item for item in json.loads(manifest.read_text())["layers"]
               if item["mediaType"] == "application/vnd.ollama.image.model"]
    return layer["digest"]


def test_bridge_links_what_ollama_create_cp_and_rm_leave(ollama: Ollama, gemma_path: Path,
                                                          tmp_path: Path) -> None:
    ollama.create("gemma3-test", gemma_path, "PARAMETER temperature 0.6")
    ollama.cli("cp", "gemma3-test", "alice/gemma:v1")
    digest = model_digest(ollama, "library/gemma3-test")
    blob = ollama.store / "blobs" / digest.replace(":", "-")
    assert model_digest(ollama, "alice/gemma", "v1") == digest  # cp shares the blob
    dest = tmp_path / "models" / "ollama"
    store_before = snapshot(ollama.store)

    first = bridge(ollama.store, dest, "--json")
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    ours = "gemma3-test/gemma3-test-latest-268.10M-Q4_K_M.gguf"
    copy = "alice--gemma/gemma-v1-268.10M-Q4_K_M.gguf"
    assert sorted(report["linked"]) == sorted([ours, copy]) and report["skipped"] == []
    assert {os.readlink(dest / path) for path in (ours, copy)} == {str(blob)}
    assert (dest / ours).read_bytes()[:4] == b"GGUF"
    record = {link["path"]: link for link in
              json.loads((dest / ".ollama-bridge.json").read_text())["links"]}
    assert record[ours]["ollama_name"] == "gemma3-test:latest"
    assert record[copy]["ollama_name"] == "alice/gemma:v1"
    assert (record[ours]["model_type"], record[ours]["file_type"],
            record[ours]["model_family"]) == ("268.10M", "Q4_K_M", "gemma3")
    assert record[ours]["params"] == {"temperature": 0.6}  # from the Modelfile's PARAMETER
    again = bridge(ollama.store, dest)
    assert "0 linked, 2 unchanged, 0 removed, 0 skipped: nothing to do" in again.stdout
    assert snapshot(ollama.store) == store_before  # the bridge never writes the store

    ollama.cli("rm", "alice/gemma:v1")
    assert blob.exists()  # still used by gemma3-test
    after_rm = json.loads(bridge(ollama.store, dest, "--json").stdout)
    assert after_rm["removed"] == [copy] and not (dest / "alice--gemma").exists()
    assert os.readlink(dest / ours) == str(blob)
    ollama.cli("rm", "gemma3-test")
    assert not blob.exists()  # Ollama pruned it: the link would dangle
    last = json.loads(bridge(ollama.store, dest, "--json").stdout)
    assert last["removed"] == [ours] and not any(p.is_symlink() for p in dest.rglob("*"))


def real_env(env: Env, ollama: Ollama) -> Env:
    """model_serve pointed at the real server: its CLI, its URL and the store it writes."""
    env.update({"OLLAMA_BIN": str(BINARY), "OLLAMA_HOST": ollama.host,
                "OLLAMA_MODELS": str(ollama.store)})
    return env


def names(env: Env) -> dict[str, list[str]]:
    return {m["name"]: m["ollama_names"] for m in json.loads(env.run("list", "--json").stdout)}


def test_list_rm_update_pull_and_doctor_through_the_real_cli(ollama: Ollama, env: Env,
                                                              gemma_path: Path) -> None:
    env = real_env(env, ollama)
    ollama.create("gemma3", gemma_path)
    ollama.cli("cp", "gemma3", "alice/coder")
    assert env.run("sync").returncode == 0
    listed = names(env)
    assert sorted(map(sorted, listed.values())) == [["alice/coder:latest", "gemma3:latest"]], \
        listed  # one file under two names: one served model

    doctor = {c["name"]: c for c in json.loads(env.run("doctor", "--json").stdout)}
    assert doctor["ollama"]["status"] == "ok", doctor["ollama"]
    assert f"server 0.32.15 at {ollama.host}" in doctor["ollama"]["detail"]
    assert doctor["ollama store"]["status"] == "ok", doctor["ollama store"]

    declined = env.run("rm", "--filter", "coder", input="n\n")
    assert "alice/coder:latest" in declined.stdout and "nothing removed" in declined.stdout
    removed = env.run("rm", "alice/coder", "--yes")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert "removed alice/coder" in removed.stdout
    assert "alice/coder" not in ollama.cli("list").stdout  # the real server's own view
    assert names(env) == {GEMMA: ["gemma3:latest"]}

    # Offline the registry cannot answer: Ollama's own error, and nothing is lost.
    pulled = env.run("pull", "no-such-model-here")
    assert pulled.returncode == 1 and "ollama pull no-such-model-here failed" in pulled.stderr
    updated = env.run("update")
    assert updated.returncode == 1 and "ollama pull gemma3:latest failed" in updated.stderr
    assert names(env) == {GEMMA: ["gemma3:latest"]}
    assert "gemma3:latest" in ollama.cli("list").stdout

    unknown = env.run("rm", "nothing-like-it", "--yes")
    assert unknown.returncode == 2 and "no Ollama model named" in unknown.stderr


def test_doctor_names_a_server_that_keeps_its_models_elsewhere(ollama: Ollama, env: Env,
                                                               gemma_path: Path) -> None:
    env = real_env(env, ollama)
    ollama.create("gemma3", gemma_path)
    env["OLLAMA_MODELS"] = str(env.home.parent / "ollama")  # not the server's store
    doctor = {c["name"]: c for c in json.loads(env.run("doctor", "--json").stdout)}
    assert doctor["ollama store"]["status"] == "warn"
    assert "gemma3:latest" in doctor["ollama store"]["detail"]
    assert "another folder" in doctor["ollama store"]["detail"]


def test_run_chats_through_the_stack_and_rm_unloads_first(ollama: Ollama, env: Env,
                                                           gemma_path: Path) -> None:
    env = real_env(env, ollama)
    # A base model rambles on; the custom setting (applied through our port) keeps it short.
    (env.home / "custom_models.yaml").write_text(
        "models:\n  gemma3:268.10m-q4_k_m:\n    sampler_args: '--n-predict 24'\n")
    ollama.create("gemma3:270m", gemma_path)
    with running(env):
        chat = pexpect.spawn(sys.executable, ["-m", "model_serve", "run", "gemma3:270m"],
                             env=dict(env), cwd=str(env.home), encoding="utf-8", timeout=120)
        chat.expect(f"chatting with {GEMMA}")
        chat.expect(">>> ")
        chat.sendline("Say hello in one word.")
        chat.expect(">>> ")  # the reply streamed, then the prompt came back
        reply = chat.before
        chat.sendline("And again?")  # history is kept: a second turn works
        chat.expect(">>> ")
        chat.sendline("/exit")
        chat.expect(pexpect.EOF)
        chat.close()
        assert chat.exitstatus == 0
        assert len(reply.strip()) > len("Say hello in one word."), reply
        stats = json.loads(env.run("stats", "--json").stdout)
        # The name the user created and chatted with, not the router's dash form.
        assert any(m["name"] == GEMMA and m["state"] == "loaded" for m in stats["models"])
        assert GEMMA in env.run("stats").stdout
        served = json.loads(env.run("list", "--served", "--json").stdout)
        assert [m["name"] for m in served] == [GEMMA]
        by_ollama_name = env.run("unload", "gemma3:270m")  # the name it was created by
        assert by_ollama_name.returncode == 0, by_ollama_name.stderr
        assert f"unloaded: {GEMMA}" in by_ollama_name.stdout
        unknown = env.run("unload", "no-such-model")
        assert unknown.returncode == 2 and "model list --served" in unknown.stderr
        from openai import OpenAI

        OpenAI(base_url=f"{env.base_url}/v1", api_key="x").completions.create(
            model=GEMMA, prompt="Hi", max_tokens=2)  # loaded again, for rm to unload
        removed = env.run("rm", "gemma3:270m", "--yes")
        assert removed.returncode == 0, removed.stderr
        assert f"unloaded {GEMMA}" in removed.stdout and "removed gemma3:270m" in removed.stdout
        assert json.loads(env.run("list", "--json").stdout) == []
        assert "gemma3:270m" not in ollama.cli("list").stdout  # gone from the real server
