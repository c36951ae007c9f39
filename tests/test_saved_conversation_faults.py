"""Saved conversations never block and never destroy (issue 25, part 2), on the real stack with
the real gemma model: a save that fails (its folder replaced by a file) is logged and the
unload goes on, for the front's unload and the unloader's TTL alike, and the model serves
again; one request that cannot use a restored conversation (`cache_prompt: false`) does not
turn saving off for its model."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from model_serve.config.settings import load_settings
from model_serve.engines import select_engine, slot_cache
from model_serve.engines.base import LOADED_STATES
from model_serve.runtime.procs import wait_until
from tests.conftest import Env, running
from tests.test_slot_cache import CONVERSATION, model_server, turn

NAME, TWIN = "ls/gemma-3:270m-q4_k_m", "ls/g2"
# The twin unloads itself after 3 idle seconds (the unloader keeps TTLs with KV_CACHE on).
MODELS = "models:\n  g2:\n    base_model: gemma-3:270m-q4_k_m\n    ttl: 3\n"
QUESTION = CONVERSATION + "Question: how many ships on line 3? Answer:"
FAILED = "saving the conversations of"


def ask(env: Env, name: str, prompt: str, **fields: object) -> int:
    """The reply's prompt tokens taken from the cache (it must be answered)."""
    answer = requests.post(f"{env.base_url}/completion", timeout=300, json={
        "model": name, "prompt": prompt, "n_predict": 4, "temperature": 0, **fields})
    assert answer.status_code == 200, answer.text
    return int(answer.json()["timings"]["cache_n"])


def folders(env: Env) -> dict[str, Path]:
    """Each model's slot folder, as the config in effect names it."""
    engine = select_engine(load_settings(dict(env)))
    found = engine.slot_folders()
    return {name: found[engine.model_id(name)] for name in (NAME, TWIN)}


def loaded(env: Env, name: str) -> bool:
    engine = select_engine(load_settings(dict(env)))
    return any(m.state in LOADED_STATES for m in engine.resolve(name))


def log_text(env: Env) -> str:
    return (env.state / "logs" / "model_serve.log").read_text(errors="replace")


def break_folder(folder: Path) -> None:
    """The model's slot folder becomes a file: every save into it fails."""
    folder.rename(folder.with_name("moved-away"))  # the front may be writing into it
    folder.write_text("not a folder")


def mend_folder(folder: Path) -> None:
    folder.unlink()
    folder.with_name("moved-away").rename(folder)


def test_a_failed_save_never_blocks_and_one_request_never_stops_saving(
        engine_env: Env, gemma_path: Path) -> None:
    env = engine_env
    (env.models / gemma_path.name).symlink_to(gemma_path)
    (env.home / "custom_models.yaml").write_text(MODELS)
    env.update({"DEFAULT_CTX_SIZE": "4096", "MIN_MODEL_AGE_SECONDS": "0"})
    with running(env, stop_timeout=90):
        where = folders(env)
        # 1. A request that asks for no cache gets a restored conversation it cannot use:
        # its reply tells nothing about the model, and saving goes on.
        ask(env, NAME, QUESTION)
        assert requests.post(f"{env.base_url}/unload", params={"model": NAME},
                             timeout=120).status_code == 200
        assert list(where[NAME].glob("*.bin"))
        assert ask(env, NAME, QUESTION, cache_prompt=False) == 0
        assert wait_until(lambda: "restored" in log_text(env), 10)
        time.sleep(2)  # the front records its check in the background
        assert slot_cache.saving_helps(where[NAME]), slot_cache.check_of(where[NAME])
        assert requests.post(f"{env.base_url}/unload", params={"model": NAME},
                             timeout=120).status_code == 200
        assert slot_cache.saved_slots(where[NAME]), "saving stopped after one request"

        # 2. A save that fails: the front's unload still unloads, and the model serves again.
        ask(env, NAME, QUESTION)
        break_folder(where[NAME])
        answer = requests.post(f"{env.base_url}/unload", params={"model": NAME}, timeout=120)
        assert answer.status_code == 200, answer.text
        assert not loaded(env, NAME)
        assert f"{FAILED} {_id(env, NAME)} failed" in log_text(env)
        mend_folder(where[NAME])
        ask(env, NAME, QUESTION)
        # A folder gone (removed by hand, or by an old `model forget`): llama-server refuses
        # to start without it, so the load makes it again.
        assert requests.post(f"{env.base_url}/unload", params={"model": NAME},
                             timeout=120).status_code == 200
        shutil.rmtree(where[NAME])
        ask(env, NAME, QUESTION)

        # 3. The unloader's TTL: the twin whose save fails is unloaded once, not retried.
        ask(env, TWIN, QUESTION)
        break_folder(where[TWIN])
        assert wait_until(lambda: not loaded(env, TWIN), 30), "the TTL unload never ended"
        time.sleep(6)  # more than one unloader poll
        failures = [line for line in log_text(env).splitlines()
                    if f"{FAILED} {_id(env, TWIN)} failed" in line]
        assert len(failures) == 1, failures
        assert "ttl check failed" not in log_text(env)
        mend_folder(where[TWIN])
        ask(env, TWIN, "Hi")


def _id(env: Env, name: str) -> str:
    engine = select_engine(load_settings(dict(env)))
    return engine.model_id(name)


def test_a_file_replaced_in_place_gets_another_key(tmp_path: Path) -> None:
    """`cp -p` over a model keeps its size and mtime (and its inode); the key must change, or
    a slot saved from the old file would be restored into the new one."""
    model, other = tmp_path / "model.gguf", tmp_path / "other.gguf"
    model.write_bytes(b"A" * 4096)
    other.write_bytes(b"B" * 4096)
    os.utime(other, (1_700_000_000, 1_700_000_000))
    os.utime(model, (1_700_000_000, 1_700_000_000))
    before = slot_cache.cache_key(model, {"ctx": 4096})
    inode = model.stat().st_ino
    time.sleep(0.01)
    subprocess.run(["cp", "-p", str(other), str(model)], check=True)
    assert model.stat().st_ino == inode and int(model.stat().st_mtime) == 1_700_000_000
    assert slot_cache.cache_key(model, {"ctx": 4096}) != before
    moved = tmp_path / "moved.gguf"
    shutil.copy2(model, moved)
    after = slot_cache.cache_key(model, {"ctx": 4096})
    os.replace(moved, model)  # another file renamed into place
    assert slot_cache.cache_key(model, {"ctx": 4096}) != after
    assert slot_cache.cache_key(model, {"ctx": 4096}) == slot_cache.cache_key(model,
                                                                              {"ctx": 4096})


def test_one_miss_does_not_stop_saving(tmp_path: Path) -> None:
    """A reply that took nothing from a restored cache may come from a concurrent request that
    took slot 0 first; saving stops only after MISSES_TO_STOP misses in a row, and a reply
    that could not use the cache at all counts for nothing."""
    folder = tmp_path / "kv" / "m" / "0123456789abcdef"
    folder.mkdir(parents=True)
    restored = slot_cache.Restored(folder, tokens=1000, expected=900)
    for _ in range(2):
        check = slot_cache.record_check(folder, restored, 0)
        assert check is not None and not check.reused and slot_cache.saving_helps(folder)
    assert slot_cache.MISSES_TO_STOP == 3
    assert not slot_cache.reply_can_tell({"prompt": "x", "cache_prompt": False})
    assert not slot_cache.reply_can_tell({"prompt": "x", "id_slot": 1})
    assert slot_cache.reply_can_tell({"prompt": "x", "id_slot": 0, "cache_prompt": True})
    unusable = slot_cache.Restored(folder, 1000, 900, checkable=False)
    assert slot_cache.record_check(folder, unusable, 0) is None
    check = slot_cache.record_check(folder, restored, 900)  # reused: the count starts again
    assert check is not None and check.misses == 0
    for _ in range(slot_cache.MISSES_TO_STOP):
        slot_cache.record_check(folder, restored, 0)
    assert not slot_cache.saving_helps(folder)
    assert "no longer saved" in (slot_cache.check_of(folder) or check).describe()


def test_a_stop_verdict_of_an_earlier_version_counts_as_one_miss(tmp_path: Path) -> None:
    """Earlier versions stopped saving after one miss, which may have been a concurrent
    request: such a record lets saving go on."""
    folder = tmp_path / "kv" / "m" / "0123456789abcdef"
    folder.mkdir(parents=True)
    (folder / slot_cache.CHECK_FILE).write_text(
        '{"reused": false, "expected": 900, "cache_n": 0, "checked_at": 1.0}')
    assert slot_cache.saving_helps(folder)
    check = slot_cache.check_of(folder)
    assert check is not None and check.misses == 1


def plant(folder: Path, stem: str, size: int, last_used: float, age: float = 0) -> Path:
    """A saved slot as save_slots leaves it: its .bin and its description."""
    folder.mkdir(parents=True, exist_ok=True)
    binary = folder / f"{stem}.bin"
    binary.write_bytes(b"k" * size)
    slot = slot_cache.SavedSlot.of_text(binary.name, "text " * 40, tokens=10, size=size)
    slot.last_used = last_used
    (folder / f"{stem}.json").write_text(json.dumps(dataclasses.asdict(slot)))
    for path in (binary, folder / f"{stem}.json"):
        os.utime(path, (time.time() - age, time.time() - age))
    return binary


def test_the_budget_counts_and_cleans_leftovers(tmp_path: Path) -> None:
    """KV_CACHE_MAX_GB is a real bound: unfinished saves and orphans count. A killed save's
    leftovers go once they are old; a younger one may be a save under way, and stays."""
    root = tmp_path / "kv"
    folder = slot_cache.make_folder(root / "ls_m" / "0123456789abcdef")
    kept = plant(folder, "a" * 16, 1000, last_used=2.0)
    oldest = plant(folder, "b" * 16, 1000, last_used=1.0)
    old = time.time() - slot_cache.STALE_SECONDS - 5
    gone = slot_cache.SavedSlot.of_text("gone.bin", "text", tokens=1, size=1)
    leftovers = {folder / "c.1234abcd.partial": b"x" * 5000,  # a killed save's
                 folder / ("d" * 16 + ".bin"): b"x" * 3000,  # a slot without description
                 folder / ("e" * 16 + ".json"): json.dumps(dataclasses.asdict(gone)).encode()}
    for path, content in leftovers.items():
        path.write_bytes(content)
        os.utime(path, (old, old))
    under_way = folder / "f.5678abcd.partial"
    under_way.write_bytes(b"x" * 2000)
    total = sum(p.stat().st_size for p in folder.iterdir() if p.name != slot_cache.MARKER)
    assert slot_cache.used_bytes(root) == total

    removed = slot_cache.keep_within(root, 4000)
    assert not any(path.exists() for path in leftovers)
    assert under_way.exists() and kept.exists()
    assert not oldest.exists()  # the save under way counts: one slot had to go too
    assert oldest.name in removed
    assert slot_cache.used_bytes(root) <= 4000


def test_cleanups_touch_only_folders_model_serve_made(tmp_path: Path) -> None:
    """No cleanup deletes under a folder without the marker; a folder an earlier version made
    (our layout and descriptions) is recognised once and marked."""
    root = tmp_path / "kv"
    ours = slot_cache.make_folder(root / "ls_m" / "0123456789abcdef")
    earlier = root / "ls_old" / "fedcba9876543210"
    old_slot = plant(earlier, "a" * 16, 100, last_used=1.0, age=3600)
    # The user's: a folder that happens to look like ours, with files of our suffixes.
    users = root / "photos" / "00112233aabbccdd"
    users.mkdir(parents=True)
    theirs = [users / "album.json", users / "raw.bin", users / "x.partial"]
    for path in theirs:
        path.write_text("mine")
        os.utime(path, (1.0, 1.0))

    slot_cache.keep_within(root, 0)
    slot_cache.remove_other_keys(root, {ours})
    assert all(path.read_text() == "mine" for path in theirs)
    assert (ours.parent / slot_cache.MARKER).is_file()
    slot_cache.remove_saved(root)
    assert all(path.read_text() == "mine" for path in theirs)
    assert not (root / "photos" / slot_cache.MARKER).exists()
    assert not old_slot.exists()  # the earlier version's: recognised as ours
    assert not (root / "ls_old").exists()


def test_a_crafted_description_deletes_nothing_outside_its_folder(tmp_path: Path) -> None:
    """A description names its slot file, which the prune deletes: one naming a path ('..',
    absolute) is skipped as damaged, as one whose numbers are not numbers; the real slot
    beside them is still pruned, and the prune does not fail."""
    root = tmp_path / "kv"
    folder = slot_cache.make_folder(root / "ls_m" / "0123456789abcdef")
    real = plant(folder, "a" * 16, 100, last_used=1.0)
    victims = [tmp_path / "victim.bin", tmp_path / "home" / "notes.bin"]
    victims[1].parent.mkdir()
    for victim in victims:
        victim.write_text("mine")
    crafted = [{"file": "../../../victim.bin"}, {"file": str(victims[1])},
               {"file": "b" * 16 + ".bin", "last_used": "soon"}]
    template = dataclasses.asdict(slot_cache.SavedSlot.of_text("x.bin", "t", 1, 1))
    for number, fields in enumerate(crafted):
        (folder / f"{number:016x}.json").write_text(json.dumps({**template, **fields}))
    (folder / ("b" * 16 + ".bin")).write_bytes(b"k")

    slot_cache.keep_within(root, 0)
    assert all(victim.read_text() == "mine" for victim in victims)
    assert not real.exists()


def test_prunes_take_turns(tmp_path: Path) -> None:
    """One prune at a time across processes: while another holds the lock, a prune waits
    and removes nothing; then it does its work."""
    root = tmp_path / "kv"
    folder = slot_cache.make_folder(root / "ls_m" / "0123456789abcdef")
    slot = plant(folder, "a" * 16, 1000, last_used=1.0)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"lock = open({str(root / '.prune.lock')!r}, 'a')\n"
        "fcntl.flock(lock, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "time.sleep(1.5)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        started = time.monotonic()
        pruning = threading.Thread(target=slot_cache.keep_within, args=(root, 0))
        pruning.start()
        time.sleep(0.5)
        assert slot.exists()  # waiting for the other prune
        pruning.join(30)
        assert time.monotonic() - started >= 1.0 and not slot.exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_save_is_skipped_when_the_disk_lacks_room(env: Env, gemma_path: Path,
                                                    tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Free space is checked before a save: a slot sized (by what this model's slots took
    before) beyond the free space plus a margin is not saved, and the log says why."""
    folder = slot_cache.make_folder(tmp_path / "kv" / "ls_m" / "0123456789abcdef")
    free = shutil.disk_usage(folder).free
    # An earlier save of this model: few tokens, and so many bytes per token that the slot
    # below cannot fit the disk.
    earlier = slot_cache.SavedSlot.of_text("e" * 16 + ".bin", "x", tokens=1, size=free)
    (folder / earlier.file).write_bytes(b"k")
    (folder / ("e" * 16 + ".json")).write_text(json.dumps(dataclasses.asdict(earlier)))
    with model_server(env, gemma_path, folder) as url:
        turn(url, CONVERSATION)
        with caplog.at_level(logging.WARNING, logger="model_serve.slot_cache"):
            assert slot_cache.save_slots(url, {}, folder) == []
    assert "not saved" in caplog.text and "MiB free on the disk" in caplog.text
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [earlier.file, "e" * 16 + ".json"])


def test_model_stop_saves_the_conversations(engine_env: Env, gemma_path: Path) -> None:
    """`model stop` (restart, the service's stop) saves what the loaded models hold, and the
    next start takes the conversation up from the restored cache."""
    env = engine_env
    (env.models / gemma_path.name).symlink_to(gemma_path)
    env.update({"DEFAULT_CTX_SIZE": "4096"})
    with running(env):
        ask(env, NAME, QUESTION)
    log = log_text(env)
    assert "saved 1 slot(s) of" in log, log[-3000:]
    with running(env):
        cached = ask(env, NAME, QUESTION + " Four.")
    print(f"{env['ENGINE']}: after a stop and a start {cached} prompt tokens came from the cache")
    assert cached > 1000


def test_a_save_past_its_deadline_is_skipped(env: Env, gemma_path: Path, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """The stop's budget: a slot the deadline leaves no time for is not saved, and said."""
    folder = slot_cache.make_folder(tmp_path / "kv" / "ls_m" / "0123456789abcdef")
    with model_server(env, gemma_path, folder) as url:
        turn(url, CONVERSATION)
        with caplog.at_level(logging.WARNING, logger="model_serve.slot_cache"):
            assert slot_cache.save_slots(url, {}, folder, time.monotonic()) == []
        assert "no time left" in caplog.text
        [saved] = slot_cache.save_slots(url, {}, folder, time.monotonic() + 60)
    assert saved.tokens > 1000
