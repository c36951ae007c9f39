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
def model_server(env: Env, model: Path, folder: Path, swa_full: bool = True,
                 slots: int = 1) -> Iterator[str]:
    settings = load_settings(dict(env))
    binary = resolve_llama_server(settings.llama_server_bin)
    args = ["-m", str(model), "--port", str(port := free_port()), "-c", str(4096 * slots),
            "-np", str(slots),
            "--slot-save-path", str(folder), *(["--swa-full"] if swa_full else [])]
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


def turn(url: str, prompt: str, **fields: int) -> tuple[str, int, int]:
    """(reply, prompt tokens taken from the cache, prompt tokens)."""
    reply = requests.post(url + "/completion", timeout=300, json={
        "prompt": prompt, "n_predict": 8, "temperature": 0, "seed": 1, "cache_prompt": True,
        **fields}).json()
    return reply["content"], reply["timings"]["cache_n"], reply["tokens_evaluated"]


def test_a_saved_conversation_is_restored_into_a_new_server(env: Env, gemma_path: Path,
                                                             tmp_path: Path) -> None:
    folder = tmp_path / "kv" / "gemma" / slot_cache.cache_key(gemma_path, {})
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
        restored = slot_cache.restore_best(url, {}, folder, follow_up)
        assert restored is not None and restored.tokens == saved.tokens
        # The follow-up shares all but the reply's last words with it, known to a block of
        # text (descriptions hold hashes of blocks, not the text).
        block = saved.tokens * slot_cache.BLOCK_CHARS // saved.length + 1
        assert saved.tokens - 10 - block < restored.expected <= saved.tokens
        reply, cached, evaluated = turn(url, follow_up)
    print(f"saved {saved.tokens} tokens in {saved.bytes / 2**20:.1f} MiB; after the restore "
          f"{cached} of {evaluated} prompt tokens came from the cache")
    assert cached > 1000, f"only {cached} of {evaluated} prompt tokens came from the cache"
    assert reply == never_stopped[0]  # the same answer as without the restart
    assert slot_cache.saved_slots(folder)[0].hits == 1
    check = slot_cache.record_check(folder, restored, cached)
    assert check is not None and check.reused and slot_cache.saving_helps(folder)


def test_every_slot_is_saved_and_comes_back(env: Env, gemma_path: Path,
                                           tmp_path: Path) -> None:
    """Two slots holding two conversations: both are saved; after a restart the one the
    request continues goes to slot 0, the other to slot 1, and requests without `id_slot`
    each find their own (llama-server picks the slot sharing most with the prompt)."""
    folder = tmp_path / "kv" / "gemma" / "key"
    folder.mkdir(parents=True)
    other = CONVERSATION.replace("lighthouse keeper", "harbour master")
    follow_ups = [text + "Question: how many ships on line 3? Answer:"
                  for text in (CONVERSATION, other)]
    with model_server(env, gemma_path, folder, slots=2) as url:
        turn(url, CONVERSATION, id_slot=0)
        turn(url, other, id_slot=1)
        saved = slot_cache.save_slots(url, {}, folder)
    assert len(saved) == 2 and all(s.tokens > 1000 for s in saved)
    with model_server(env, gemma_path, folder, slots=2) as url:
        restored = slot_cache.restore_best(url, {}, folder, follow_ups[1])
        assert restored is not None
        for follow_up in follow_ups:
            _reply, cached, evaluated = turn(url, follow_up)
            assert cached > 1000, f"{cached} of {evaluated} prompt tokens from the cache"


def test_a_model_that_does_not_reuse_a_restored_cache_is_no_longer_saved(
        env: Env, gemma_path: Path, tmp_path: Path) -> None:
    """Gemma 3 without --swa-full: llama-server restores the file, but the next request
    computes its whole prompt again. The first reply after each restore shows it (cache_n),
    and after MISSES_TO_STOP such restores in a row nothing is saved for that model and key."""
    folder = tmp_path / "kv" / "gemma" / "key"
    folder.mkdir(parents=True)
    follow_up = CONVERSATION + "Question: how many ships on line 3? Answer:"
    with model_server(env, gemma_path, folder, swa_full=False) as url:
        turn(url, CONVERSATION)
        [saved] = slot_cache.save_slots(url, {}, folder)
    with model_server(env, gemma_path, folder, swa_full=False) as url:
        for miss in range(1, slot_cache.MISSES_TO_STOP + 1):
            restored = slot_cache.restore_best(url, {}, folder, follow_up)
            assert restored is not None and restored.tokens == saved.tokens
            _reply, cached, evaluated = turn(url, follow_up)
            print(f"without --swa-full, {cached} of {evaluated} prompt tokens came from the "
                  "restored cache")
            check = slot_cache.record_check(folder, restored, cached)
            assert check is not None and not check.reused and check.misses == miss
            assert "NOT reused" in check.describe()
        assert slot_cache.saved_slots(folder) == []  # useless files are gone
        turn(url, follow_up)
        assert slot_cache.save_slots(url, {}, folder) == []  # and none are made
    assert slot_cache.check_of(folder) == check


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


def test_the_stack_keeps_a_conversation_across_an_unload(engine_env: Env,
                                                         gemma_path: Path) -> None:
    """Through the front, on the router and on llama-swap (KV_CACHE=on, the default): the
    unload saves the slot, the next request loads the model, gets the saved conversation
    restored first, and answers as before; `model show` reports what that reply showed."""
    from tests.conftest import running

    env = engine_env
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
        config = next(env.state.glob("models.ini"), env.state / "config.yaml").read_text()
        assert "swa-full" in config and "slot-save-path" in config  # cheap here
        ask()
        never_evicted = ask()
        assert never_evicted[1] > 1000
        assert requests.post(f"{env.base_url}/unload", params={"model": name},
                             timeout=60).status_code == 200
        reply, cached, evaluated = ask()
        # The front judges the restore by the reply, once it is sent.
        assert wait_until(lambda: (next((env.state / "kv-cache").glob("*/*/restore-check.json"),
                                        None) is not None), 10)
        log = (env.state / "logs" / "model_serve.log").read_text(errors="replace")
        stats = json.loads(env.run("stats", "--json").stdout)
        text = env.run("stats").stdout
        shown = json.loads(env.run("show", name, "--json").stdout)
    [row] = [m for m in stats["models"] if m["name"] == name]
    assert row["saved_conversations"] == 1 and row["restores"] == 1
    assert row["saved_bytes"] > 10 * 2**20
    assert f"{name}: 1 saved conversation(s)" in text
    print(f"{env['ENGINE']}: after the unload {cached} of {evaluated} prompt tokens came from "
          "the cache")
    assert "saved 1 slot(s) of ls/gemma-3" in log
    assert "restored" in log and cached > 1000
    assert reply == never_evicted[0]
    assert shown["keeps_conversations"] is True
    assert f"took {cached} of " in shown["conversations"], shown["conversations"]


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
        # The new key's folder (beside the marker of model_serve's folders).
        assert len([p for p in (env.state / "kv-cache").glob("*/*") if p.is_dir()]) == 1


def test_a_sync_that_restarts_a_model_saves_its_conversation_first(
        env: Env, gemma_path: Path, tmp_path: Path) -> None:
    """llama-swap restarts every model on any config change. A change that keeps a model's
    cache key (here a new alias) therefore saves its conversation before the restart, and
    the next turn, streamed and by the new alias at once, takes it from the restored cache;
    the front reads cache_n from the stream's last event. (The router keeps a model whose
    alias changed running.)"""
    from tests.conftest import running
    from tests.test_llama_swap import llama_swap_binary, port_block

    env.port = port_block()
    env.update({"ENGINE": "llama-swap", "LLAMA_SWAP_BIN": str(llama_swap_binary(tmp_path)),
                "LLAMA_SWAP_PORT": str(env.port)})
    (env.models / gemma_path.name).symlink_to(gemma_path)
    env.update({"DEFAULT_CTX_SIZE": "4096"})
    name = "ls/gemma-3:270m-q4_k_m"

    def ask() -> int:
        reply = requests.post(f"{env.base_url}/completion", timeout=300, json={
            "model": name, "prompt": CONVERSATION + "Question: how many ships on line 3?",
            "n_predict": 4, "temperature": 0}).json()
        return reply["timings"]["cache_n"]

    with running(env):
        ask()
        (env.home / "custom_models.yaml").write_text(
            "models:\n  gemma-3:270m-q4_k_m:\n    aliases: [lighthouse]\n")
        synced = env.run("sync")
        assert synced.returncode == 0 and "reloaded" in synced.stdout, synced.stdout
        assert len(list((env.state / "kv-cache").glob("*/*/*.bin"))) == 1
        # Streamed this time: the front reads cache_n from the stream's last event.
        answer = requests.post(f"{env.base_url}/v1/completions", timeout=300, stream=True, json={
            "model": "lighthouse", "prompt": CONVERSATION + "Question: how many ships?",
            "max_tokens": 4, "temperature": 0, "stream": True})
        events = [json.loads(line[6:]) for line in answer.iter_lines()
                  if line.startswith(b"data: {")]
        cached = next(e["timings"]["cache_n"] for e in events if "timings" in e)
        assert wait_until(lambda: next((env.state / "kv-cache").glob("*/*/restore-check.json"),
                                       None) is not None, 10)
        [check] = [slot_cache.check_of(f.parent)
                   for f in (env.state / "kv-cache").glob("*/*/restore-check.json")]
    print(f"{env['ENGINE']}: after the restart {cached} prompt tokens came from the cache")
    assert cached > 1000
    assert check is not None and check.reused and check.cache_n == cached
