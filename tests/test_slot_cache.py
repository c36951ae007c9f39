"""A conversation's KV cache kept across its model server's exit, with the real llama-server
and the real gemma model: saved before the server stops, restored into a new server, the next
turn reuses it (timings.cache_n) and answers exactly as if the server had never stopped."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from model_serve.config.settings import load_settings
from model_serve.engines import slot_cache
from model_serve.engines.engine_check import ensure_engine_computes
from model_serve.engines.llama_server import resolve_llama_server
from model_serve.runtime.procs import wait_until
from tests.conftest import Env, free_port

CONVERSATION = "".join(f"Line {i}: the lighthouse keeper counts {i} ships tonight.\n"
                       for i in range(80))  # about 1,300 tokens


@contextmanager
def model_server(env: Env, model: Path, folder: Path) -> Iterator[str]:
    settings = load_settings(dict(env))
    binary = resolve_llama_server(settings.llama_server_bin)
    args = ["-m", str(model), "--port", str(port := free_port()), "-c", "4096", "-np", "1",
            "--swa-full", "--slot-save-path", str(folder)]
    for option, value in ensure_engine_computes(settings, binary).options.items():
        args += [f"--{option}"] if value == "true" else [f"--{option}", value]
    proc = subprocess.Popen([str(binary), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, **slot_cache.SERVER_ENV})
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: requests.get(url + "/health", timeout=1).ok, 60,
                          ignore=(requests.RequestException,))
        yield url
    finally:
        proc.kill()
        proc.wait(10)


def turn(url: str, prompt: str) -> tuple[str, int, int]:
    """(reply, prompt tokens taken from the cache, prompt tokens)."""
    reply = requests.post(url + "/completion", timeout=300, json={
        "prompt": prompt, "n_predict": 8, "temperature": 0, "seed": 1, "cache_prompt": True,
    }).json()
    return reply["content"], reply["timings"]["cache_n"], reply["tokens_evaluated"]


def test_a_saved_conversation_is_restored_into_a_new_server(env: Env, gemma_path: Path,
                                                             tmp_path: Path) -> None:
    folder = slot_cache.model_folder(tmp_path / "kv", "ls/gemma-3-270m-q4_k_m",
                                     slot_cache.cache_key(gemma_path, {}))
    folder.mkdir(parents=True)
    first = CONVERSATION + "Question: how many ships on line 3?"
    follow_up = first + " Answer:"
    with model_server(env, gemma_path, folder) as url:
        turn(url, first)
        never_stopped = turn(url, follow_up)
        assert never_stopped[1] > 1000  # the reference: the cache was kept in memory
        [saved] = slot_cache.save_slots(url, {}, folder)
    assert saved.tokens > 1000 and (folder / saved.file).stat().st_size == saved.bytes
    assert not list(folder.glob("*.partial"))

    with model_server(env, gemma_path, folder) as url:  # a new process: nothing in memory
        chosen = slot_cache.best_for(folder, follow_up)
        assert chosen is not None and chosen.file == saved.file
        assert slot_cache.restore(url, {}, folder, chosen) == saved.tokens
        reply, cached, evaluated = turn(url, follow_up)
    print(f"saved {saved.tokens} tokens in {saved.bytes / 2**20:.1f} MiB; after the restore "
          f"{cached} of {evaluated} prompt tokens came from the cache")
    assert cached > 1000, f"only {cached} of {evaluated} prompt tokens came from the cache"
    assert reply == never_stopped[0]  # the same answer as without the restart
    assert slot_cache.saved_slots(folder)[0].hits == 1


def test_a_damaged_cache_file_is_refused_and_removed(env: Env, gemma_path: Path,
                                                     tmp_path: Path) -> None:
    folder = tmp_path / "kv" / "m" / "k"
    folder.mkdir(parents=True)
    with model_server(env, gemma_path, folder) as url:
        turn(url, CONVERSATION)
        [saved] = slot_cache.save_slots(url, {}, folder)
        (folder / saved.file).write_bytes(b"not a cache")
        assert slot_cache.restore(url, {}, folder, saved) == 0
        assert slot_cache.saved_slots(folder) == []
        assert turn(url, CONVERSATION)[0]  # the server still serves


def test_the_stack_keeps_a_conversation_across_an_unload(env: Env, gemma_path: Path) -> None:
    """Through the front on the router (KV_CACHE=on, the default): the unload saves the slot,
    the next request loads the model, gets the saved conversation restored first, and
    answers as before."""
    from tests.conftest import running

    (env.models / gemma_path.name).symlink_to(gemma_path)
    env.update({"DEFAULT_CTX_SIZE": "4096"})
    name = "ls/gemma-3:270m-q4_k_m"
    follow_up = CONVERSATION + "Question: how many ships on line 3? Answer:"

    def ask() -> tuple[str, int, int]:
        reply = requests.post(f"{env.base_url}/completion", timeout=300, json={
            "model": name, "prompt": follow_up, "n_predict": 8, "temperature": 0,
            "seed": 1}).json()
        return reply["content"], reply["timings"]["cache_n"], reply["tokens_evaluated"]

    with running(env):
        assert "swa-full = true" in (env.state / "models.ini").read_text()  # cheap here
        ask()
        never_evicted = ask()
        assert never_evicted[1] > 1000
        assert requests.post(f"{env.base_url}/unload", params={"model": name},
                             timeout=60).status_code == 200
        reply, cached, evaluated = ask()
        log = (env.state / "logs" / "model_serve.log").read_text(errors="replace")
        stats = json.loads(env.run("stats", "--json").stdout)
        text = env.run("stats").stdout
    [row] = [m for m in stats["models"] if m["name"] == name]
    assert row["saved_conversations"] == 1 and row["restores"] == 1
    assert row["saved_bytes"] > 10 * 2**20
    assert f"{name}: 1 saved conversation(s)" in text
    print(f"after the unload {cached} of {evaluated} prompt tokens came from the cache")
    assert "saved 1 slot(s) of ls/gemma-3-270m-q4_k_m" in log
    assert "restored" in log and cached > 1000
    assert reply == never_evicted[0]


def test_saved_caches_follow_the_config_in_effect(env: Env, gemma_path: Path) -> None:
    """A config the router refuses leaves the saved caches of the one that stays; a config it
    takes with other cache settings removes them (they could never be used)."""
    from tests.conftest import running

    (env.models / gemma_path.name).symlink_to(gemma_path)
    name = "ls/gemma-3:270m-q4_k_m"
    with running(env):
        requests.post(f"{env.base_url}/completion", timeout=300, json={
            "model": name, "prompt": CONVERSATION, "n_predict": 1})
        assert env.run("unload", name).returncode == 0
        saved = list((env.state / "kv-cache").glob("*/*/*.bin"))
        assert len(saved) == 1
        (env.home / "custom_models.yaml").write_text(
            "models:\n  gemma-3:270m-q4_k_m:\n    sampler_args: '--min-hits 2'\n")
        assert env.run("sync").returncode == 1  # refused; the last good config is put back
        assert saved[0].is_file()
        (env.home / "custom_models.yaml").write_text(
            "models:\n  gemma-3:270m-q4_k_m:\n    ctx_size: 4096\n")
        assert env.run("sync").returncode == 0
        assert not saved[0].exists()
        assert len(list((env.state / "kv-cache").glob("*/*"))) == 1  # the new key's folder
