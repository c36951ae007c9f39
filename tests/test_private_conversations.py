"""What users say to their models stays theirs (issue 24, on disk): saved conversations and
everything describing them are 0600 in 0700 folders whatever the umask, llama-server's own
files included; their descriptions hold hashes, never the text; what earlier versions left is
fixed at start; `model forget` and `model rm` delete them, and erase a loaded model's slots so
its next unload saves nothing. Real files, the real llama-server and the real gemma model."""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from model_serve.config.settings import load_settings
from model_serve.engines import select_engine, slot_cache
from model_serve.fileio import write_if_changed
from model_serve.runtime.sync import build_current_plan
from tests.conftest import Env, llama_servers_under, running
from tests.test_ollama_commands import ollama_env  # noqa: F401 - a fixture
from tests.test_slot_cache import model_server

MARKER = "My bank PIN is 4321"
LINES = "".join(f"Line {i}: the lighthouse keeper counts {i} ships tonight.\n" for i in range(20))
NAME = "ls/gemma-3:270m-q4_k_m"


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def umask_of(pid: int) -> int | None:
    """A process's umask (Linux 4.7+ shows it in /proc)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1], 8) for line in lines if line.startswith("Umask:")), None)


def slot_folder(env: Env) -> Path:
    """Where the stack in `env` saves gemma's slots (as `model show` finds it)."""
    settings = load_settings(dict(env))
    engine = select_engine(settings)
    _catalog, plan = build_current_plan(settings, engine)
    [served] = plan
    return slot_cache.folder_for(settings.kv_cache_dir, engine.model_id(served.name), served)


def plant_old_save(folder: Path, text: str) -> tuple[Path, Path]:
    """A slot saved by an earlier version: its text in the description, 0644 in 0755."""
    folder.mkdir(parents=True, exist_ok=True)
    for level in (folder.parent.parent, folder.parent, folder):
        level.chmod(0o755)
    binary, description = folder / "0f0f0f0f0f0f0f0f.bin", folder / "0f0f0f0f0f0f0f0f.json"
    binary.write_bytes(b"an old slot file")
    description.write_text(json.dumps({"file": binary.name, "text": text, "tokens": 5,
                                       "bytes": 16, "saved_at": 1.0, "last_used": 1.0,
                                       "hits": 2}))
    for path in (binary, description):
        path.chmod(0o644)
    return binary, description


def saved_files(folder: Path) -> list[Path]:
    """What holds conversations: not what a restore showed, the marker or the prune lock."""
    bookkeeping = (slot_cache.CHECK_FILE, slot_cache.MARKER, slot_cache.PRUNE_LOCK)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in bookkeeping)


def test_write_if_changed_gives_the_mode_asked_whatever_the_umask(tmp_path: Path) -> None:
    with umask(0o077):
        write_if_changed(tmp_path / "plain", "x")
        assert mode(tmp_path / "plain") == 0o600  # the umask is honoured, not widened to 0644
    with umask(0o022):
        write_if_changed(tmp_path / "shared", "x")
        assert mode(tmp_path / "shared") == 0o644
        write_if_changed(tmp_path / "private", "x", mode=0o600)
        assert mode(tmp_path / "private") == 0o600
        (tmp_path / "old").write_text("same")
        (tmp_path / "old").chmod(0o644)
        assert not write_if_changed(tmp_path / "old", "same", mode=0o600)  # content unchanged
        assert mode(tmp_path / "old") == 0o600  # and yet made private
    assert not list(tmp_path.glob(".*.tmp"))


def test_the_log_is_private(env: Env) -> None:
    from model_serve.runtime.supervisor import setup_logging

    env["LOG_MAX_BYTES"] = "100000"
    settings = load_settings(dict(env))
    logs = settings.log_file.parent
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    with umask(0o022):
        logs.mkdir(parents=True)  # as `model start` makes it, with its console log
        (logs / "serve-console.log").write_text("started\n")
        try:
            setup_logging(settings, to_stderr=False)
            for i in range(150):  # past LOG_MAX_BYTES: one rotation
                logging.getLogger("model_serve.test").info("%d %s", i, MARKER * 50)
        finally:
            for handler in root.handlers:
                handler.close()
            root.handlers[:], root.level = handlers, level
    assert (logs / "model_serve.log.1").is_file()
    assert mode(logs) == 0o700
    assert {p.name: mode(p) for p in logs.iterdir()} == {
        "model_serve.log": 0o600, "model_serve.log.1": 0o600, "serve-console.log": 0o600}


def test_saved_conversations_are_private_and_hold_no_text(env: Env, gemma_path: Path) -> None:
    """Under umask 022, with llama-server writing its own file: folders 0700 from the
    kv-cache root down, files 0600, and the conversation's words in no description; a
    restore still finds the saved slot each conversation continues."""
    (env.models / gemma_path.name).symlink_to(gemma_path)
    settings = load_settings(dict(env))
    engine = select_engine(settings)
    conversations = [MARKER + ". " + LINES, "Remember the harbour. " + LINES]
    with umask(0o022):
        _catalog, plan = build_current_plan(settings, engine)
        engine.write_config(plan)  # makes the folder llama-server saves into
        folder = slot_folder(env)
        root = settings.kv_cache_dir
        assert [mode(p) for p in (root, folder.parent, folder)] == [0o700] * 3
        with model_server(env, gemma_path, folder, slots=2) as url:
            replies = [chat(url, [user(text)], id_slot=slot)[0]
                       for slot, text in enumerate(conversations)]
            saved = slot_cache.save_slots(url, {}, folder)
    assert len(saved) == 2
    assert {mode(p) for p in folder.iterdir()} == {0o600}
    assert {p.suffix for p in folder.iterdir()} == {".bin", ".json"}
    for path in saved_files(root):
        data = path.read_bytes()
        if path.suffix == ".bin":
            print(f"{path.name} (llama-server's own file, {len(data)} bytes): the marker is "
                  f"{'IN' if MARKER.encode() in data else 'not in'} it as text")
            continue
        assert MARKER.encode() not in data and b"lighthouse" not in data, path

    follow_ups = [[user(text), {"role": "assistant", "content": reply},
                   user("What did I say first?")]
                  for text, reply in zip(conversations, replies, strict=True)]
    with model_server(env, gemma_path, folder, slots=2) as url:
        prompts = [slot_cache.rendered_prompt(url, {}, {"messages": m}) or ""
                   for m in follow_ups]
        chosen = []
        for prompt in prompts:
            found = slot_cache.best_for(folder, prompt)
            assert found is not None and found[1] > len(LINES)  # the whole first turn
            [other] = [s for s in saved if s.file != found[0].file]
            assert other.shared_with(prompt) < slot_cache.MIN_SHARED_CHARS
            chosen.append(found[0].file)
        assert len(set(chosen)) == 2  # each its own
        restored = slot_cache.restore_best(url, {}, folder, prompts[0])
        assert restored is not None and restored.tokens > 200
        assert restored.expected > restored.tokens * 9 // 10
        _reply, cached = chat(url, follow_ups[0])
    print(f"after the restore {cached} prompt tokens came from the cache "
          f"({restored.tokens} restored, {restored.expected} shared)")
    assert cached >= restored.expected // 2  # what record_check calls reused


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def chat(url: str, messages: list[dict[str, str]], **fields: object) -> tuple[str, int]:
    """(reply, prompt tokens taken from the cache)."""
    reply = requests.post(url + "/v1/chat/completions", timeout=300, json={
        "messages": messages, "max_tokens": 8, "temperature": 0, "seed": 1, **fields}).json()
    return reply["choices"][0]["message"]["content"], reply["timings"]["cache_n"]


def test_files_of_an_earlier_version_are_fixed_and_nothing_else_is_touched(
        tmp_path: Path) -> None:
    root = tmp_path / "kv"
    folder = root / "ls_gemma" / "0123456789abcdef"
    text = MARKER + ". " + LINES
    with umask(0o022):
        binary, description = plant_old_save(folder, text)
        leftovers = [folder / "restore-check.json", folder / "1a2b.0badc0de.partial"]
        for path in leftovers:
            path.write_text("{}")
        # Not ours: KV_CACHE_DIR may hold other things, and links lead out of it.
        outside = tmp_path / "outside.json"
        outside.write_text('{"text": "mine"}')
        elsewhere = tmp_path / "elsewhere" / "0123456789abcdef"
        elsewhere.mkdir(parents=True)
        (elsewhere / "a.json").write_text('{"text": "mine"}')
        others = [root / "notes.txt", root / "photos" / "2024" / "a.jpg",
                  folder / "readme.txt", elsewhere / "a.json", outside]
        for path in others[:3]:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("mine")
        (folder / "link.json").symlink_to(outside)
        (root / "linked").symlink_to(tmp_path / "elsewhere")
    before = {p: (mode(p), p.read_bytes()) for p in others}
    folders_before = {p: mode(p) for p in (root / "photos", root / "photos" / "2024",
                                           tmp_path / "elsewhere", elsewhere)}

    # Met before the upgrade, an old description still finds its slot.
    [old] = slot_cache.saved_slots(folder)
    assert old.shared_with(text + " more") == len(text) and old.hits == 2

    assert slot_cache.secure_saved(root) == 1
    assert [mode(p) for p in (root, folder.parent, folder)] == [0o700] * 3
    assert [mode(p) for p in (binary, description, *leftovers)] == [0o600] * 4
    rewritten = description.read_text()
    assert MARKER not in rewritten and "lighthouse" not in rewritten
    assert "text" not in json.loads(rewritten)
    found = slot_cache.best_for(folder, text + "Question: which line?")
    assert found is not None and found[0].file == binary.name and found[1] == len(text)
    assert found[0].hits == 2 and found[0].tokens == 5
    assert {p: (mode(p), p.read_bytes()) for p in others} == before
    assert {p: mode(p) for p in folders_before} == folders_before
    assert slot_cache.secure_saved(root) == 0  # once is enough


def test_forget_all_deletes_saved_conversations_only(env: Env) -> None:
    """With the stack stopped: every model's saved conversations go; what a restore showed
    and whatever else is in KV_CACHE_DIR stays."""
    from model_serve.runtime.forget import forget

    settings = load_settings(dict(env))
    root = settings.kv_cache_dir
    kept = [root / "notes.txt", root / "ls_a" / "0123456789abcdef" / "restore-check.json"]
    for model in ("ls_a", "ls_b"):
        plant_old_save(root / model / "0123456789abcdef", LINES)
    for path in kept:
        path.write_text("{}")
    size = sum(p.stat().st_size for p in saved_files(root) if p.name != "notes.txt")
    result = forget(settings, None, True)
    assert (result.saved, result.saved_bytes, result.erased) == (2, size, {})
    ours = [root / slot_cache.PRUNE_LOCK, root / "ls_a" / slot_cache.MARKER]
    assert sorted(p for p in root.rglob("*") if p.is_file()) == sorted(kept + ours)
    assert not (root / "ls_b").exists()  # emptied folders go, with their marker
    shown = env.run("forget", "--all", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["saved_removed"] == 0
    assert env.run("forget").returncode == 2  # neither a name nor --all


def test_forget_erases_saved_and_loaded_conversations(engine_env: Env,
                                                      gemma_path: Path) -> None:
    """Through the stack under umask 022: what an earlier version saved is made private at
    start, the engine's processes write with umask 077, and after `model forget` no saved
    file of the model remains, and its next unload saves nothing (its slots were erased)."""
    env = engine_env
    (env.models / gemma_path.name).symlink_to(gemma_path)
    env.update({"DEFAULT_CTX_SIZE": "4096"})
    folder = slot_folder(env)
    first = [user(MARKER + ". " + LINES)]
    with umask(0o022):
        binary, description = plant_old_save(folder, "an old, unrelated conversation " * 4)
        with running(env):
            assert [mode(p) for p in (folder.parent.parent, folder.parent, folder)] == \
                [0o700] * 3
            assert mode(binary) == mode(description) == 0o600
            assert "text" not in json.loads(description.read_text())
            reply, _cached = chat(env.base_url, first, model=NAME)
            servers = llama_servers_under(env.home.parent)
            assert servers and all(umask_of(pid) in (0o077, None) for pid in servers), \
                {pid: umask_of(pid) for pid in servers}
            assert env.run("unload", NAME).returncode == 0
            new = [p for p in saved_files(folder) if p not in (binary, description)]
            assert {p.suffix for p in new} == {".bin", ".json"}
            assert {mode(p) for p in new} == {0o600}
            for path in new:
                if path.suffix == ".json":
                    assert MARKER not in path.read_text()
            # Loaded again, its conversation restored into its slot and continued.
            chat(env.base_url, [*first, {"role": "assistant", "content": reply},
                                user("And then?")], model=NAME)
            forgotten = env.run("forget", NAME, "--json")
            assert forgotten.returncode == 0, forgotten.stderr
            result = json.loads(forgotten.stdout)
            assert result["saved_removed"] == 2  # the old one and the new one
            assert list(result["slots_erased"].values()) == [1]
            assert saved_files(folder.parent.parent) == []
            assert env.run("unload", NAME).returncode == 0
            assert saved_files(folder.parent.parent) == []  # nothing saved again
            again = env.run("forget", NAME)
            assert "no saved conversations" in again.stdout


def test_rm_forgets_the_models_conversations(ollama_env: Env) -> None:  # noqa: F811
    """`model rm` of a loaded model: its slots are erased before the unload (which then
    saves nothing), and what was saved before goes with it."""
    env = ollama_env
    assert env.run("pull", "gemma3:270m").returncode == 0
    name = "ls/gemma3:268.10m-q4_k_m"
    with running(env):
        chat(env.base_url, [user(MARKER + ". " + LINES)], model=name)
        assert env.run("unload", name).returncode == 0
        assert len([p for p in saved_files(env.state / "kv-cache") if p.suffix == ".bin"]) == 1
        chat(env.base_url, [user("Remember the harbour. " + LINES)], model=name)
        removed = env.run("rm", "gemma3:270m", "--yes")
        assert removed.returncode == 0, removed.stderr
        assert "1 saved conversation(s) deleted" in removed.stdout, removed.stdout
        assert "1 conversation(s) in memory erased" in removed.stdout, removed.stdout
        assert saved_files(env.state / "kv-cache") == []
