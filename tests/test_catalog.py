"""The catalog: from Ollama's store and MODELS_DIR to unique, stable, readable served names."""

from __future__ import annotations

import json
from pathlib import Path

from model_serve.config.custom_models import CustomModels
from model_serve.config.settings import load_settings
from model_serve.models.catalog import build_catalog
from model_serve.models.plan import build_plan
from tests import ollama_store
from tests.conftest import Env


def _listed(env: Env) -> dict[str, dict]:
    synced = env.run("sync")
    assert synced.returncode == 0, synced.stderr
    listed = env.run("list", "--json")
    assert listed.returncode == 0, listed.stderr
    return {item["name"]: item for item in json.loads(listed.stdout)}


def _store(env: Env) -> Path:
    return Path(env["OLLAMA_MODELS"])


def test_ollama_models_get_the_original_name_form(env: Env) -> None:
    store = _store(env)
    ollama_store.add_model(store, "gemma3:27b", model_type="27.4B", file_type="Q8_0",
                           arch="gemma3")
    ollama_store.add_model(store, "alice/coder:latest", model_type="7B", file_type="Q4_K_M")
    ollama_store.add_model(store, "hf.co/bartowski/Llama-3.2-3B-Instruct-GGUF:Q8_0",
                           model_type="3.2B", file_type="Q8_0")
    models = _listed(env)
    assert set(models) == {"ls/gemma3:27.4b-q8_0", "ls/coder:7b-q4_k_m",
                           "ls/llama-3.2-3b-instruct-gguf:3.2b-q8_0"}
    assert models["ls/gemma3:27.4b-q8_0"]["ollama_names"] == ["gemma3:27b"]
    assert models["ls/coder:7b-q4_k_m"]["source"] == "ollama"
    names = env.run("names", "gemma")
    assert "gemma3:27b  ->  ls/gemma3:27.4b-q8_0" in names.stdout


def test_two_tags_of_one_blob_are_one_model(env: Env) -> None:
    store = _store(env)
    weights = ollama_store.gguf_bytes(arch="gemma3", size_label="4.3B", file_type="Q4_K_M")
    ollama_store.add_model(store, "gemma3:latest", model_type="4.3B", gguf_bytes=weights)
    ollama_store.add_model(store, "gemma3:4b", model_type="4.3B", gguf_bytes=weights)
    models = _listed(env)
    assert list(models) == ["ls/gemma3:4.3b-q4_k_m"]
    assert models["ls/gemma3:4.3b-q4_k_m"]["ollama_names"] == ["gemma3:4b", "gemma3:latest"]


def test_same_size_and_quant_never_collide_and_names_stay_stable(env: Env) -> None:
    store = _store(env)
    ollama_store.add_model(store, "llama3:8b-instruct-q4_K_M", model_type="8B")
    first = _listed(env)
    assert list(first) == ["ls/llama3:8b-q4_k_m"]
    # A second model with the same size and quant arrives later: the first keeps its name.
    ollama_store.add_model(store, "llama3:8b-text-q4_K_M", model_type="8B")
    second = _listed(env)
    assert set(second) == {"ls/llama3:8b-q4_k_m", "ls/llama3:8b-text-q4_k_m"}
    assert second["ls/llama3:8b-q4_k_m"]["ollama_names"] == ["llama3:8b-instruct-q4_K_M"]
    # And a namespace twin with the very same tag still gets a name of its own.
    ollama_store.add_model(store, "bob/llama3:8b-text-q4_K_M", model_type="8B")
    third = _listed(env)
    assert len(third) == 3 and "ls/bob-llama3:8b-text-q4_k_m" in third
    assert _listed(env) == third  # a re-run changes nothing


def test_lm_studio_layout_split_files_and_projectors(env: Env) -> None:
    repo = env.models / "bartowski" / "Qwen2-VL-GGUF"
    repo.mkdir(parents=True)
    (repo / "Qwen2-VL-7B-Q4_K_M.gguf").write_bytes(ollama_store.gguf_bytes(
        arch="qwen2vl", name="Qwen2 VL", size_label="7B", file_type="Q4_K_M",
        extra={"general.basename": "Qwen2-VL"}))
    (repo / "mmproj-Qwen2-VL-7B-f16.gguf").write_bytes(ollama_store.gguf_bytes(
        arch="clip", general_type="mmproj", size_label="600M", file_type="F16", block_count=0))
    split = env.models / "big"
    split.mkdir()
    for part in (1, 2):
        data = ollama_store.gguf_bytes(arch="llama", name="Big", size_label="70B",
                                       file_type="Q8_0", extra={"split.count": 2})
        (split / f"Big-70B-Q8_0-0000{part}-of-00002.gguf").write_bytes(data)
    models = _listed(env)
    assert set(models) == {"ls/qwen2-vl:7b-q4_k_m", "ls/big:70b-q8_0"}
    assert models["ls/qwen2-vl:7b-q4_k_m"]["mmproj"].endswith("mmproj-Qwen2-VL-7B-f16.gguf")
    assert models["ls/qwen2-vl:7b-q4_k_m"]["options"]["mmproj"].endswith(".gguf")
    big = models["ls/big:70b-q8_0"]
    assert big["path"].endswith("-00001-of-00002.gguf")
    assert big["size_bytes"] == sum(p.stat().st_size for p in split.iterdir())


def test_ollama_projector_is_attached(env: Env) -> None:
    ollama_store.add_model(_store(env), "llava:7b", model_type="7B", projector=True)
    models = _listed(env)
    assert list(models) == ["ls/llava:7b-q4_k_m"]
    assert "mmproj-llava-7b.gguf" in models["ls/llava:7b-q4_k_m"]["mmproj"]


def test_unicode_names_become_safe_names(env: Env) -> None:
    folder = env.models / "modèles"
    folder.mkdir()
    (folder / "café-7B.gguf").write_bytes(ollama_store.gguf_bytes(
        name="Café", size_label="7B", extra={"general.basename": "Café ☕"}))
    models = _listed(env)
    assert list(models) == ["ls/caf:7b-q4_k_m"]


def test_ollama_only_files_are_marked(env: Env) -> None:
    (env.models / "gptoss.gguf").write_bytes(ollama_store.gguf_bytes(arch="gptoss",
                                                                     size_label="20B"))
    models = _listed(env)
    [item] = models.values()
    assert "Ollama" in item["incompatible"]
    assert "cannot load" in env.run("list").stdout


def test_model_add_links_and_pins_a_name(env: Env, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere" / "My Model.gguf"
    outside.parent.mkdir()
    outside.write_bytes(ollama_store.gguf_bytes(size_label="1B"))
    result = env.run("add", str(outside), "--name", "mine:1b")
    assert result.returncode == 0, result.stderr
    assert "served as ls/mine:1b" in result.stdout
    link = env.models / "added" / "my-model.gguf"
    assert link.is_symlink() and Path(link.resolve()) == outside
    assert "ls/mine:1b" in _listed(env)
    again = env.run("add", str(outside))  # adding twice reuses the link
    assert again.returncode == 0 and len(list(link.parent.iterdir())) == 1
    bad = env.run("add", str(tmp_path / "missing.gguf"))
    assert bad.returncode == 2 and "is not a file" in bad.stderr


def test_context_size_rules(env: Env) -> None:
    (env.models / "small.gguf").write_bytes(ollama_store.gguf_bytes(
        size_label="1B", context_length=4096, block_count=32, embedding_length=4096,
        head_count=32, head_count_kv=8))
    (env.models / "wide.gguf").write_bytes(ollama_store.gguf_bytes(
        name="wide", size_label="2B", context_length=131072, block_count=32,
        embedding_length=4096, head_count=32, head_count_kv=8,
        extra={"general.basename": "wide"}))
    settings = load_settings(dict(env, DEFAULT_CTX_SIZE="65536"))
    catalog = build_catalog(settings.models_dir, settings.model_prefix)
    custom = CustomModels(env.home / "custom_models.yaml", {})
    plan = {s.name: s for s in build_plan(catalog, custom, settings, budget=64 * 2**30)}
    small = plan["ls/small:1b-q4_k_m"]
    assert small.ctx_size == 4096 and "trained context 4096" in small.ctx_reason
    assert plan["ls/wide:2b-q4_k_m"].ctx_size == 65536
    # 65536 tokens x 32 layers x 8 heads x 256 dims x 2 (K,V) x 2 bytes = 8 GiB of KV cache:
    # with a 3 GiB budget the context is cut until it fits, and `show` says why.
    tight = {s.name: s for s in build_plan(catalog, custom, settings, budget=3 * 2**30)}
    wide = tight["ls/wide:2b-q4_k_m"]
    assert wide.ctx_size < 65536 and wide.estimated_bytes <= 3 * 2**30
    assert "reduced from 65536" in wide.ctx_reason


def test_names_that_are_one_engine_id_never_go_to_two_models(env: Env) -> None:
    """`qwen-7b` (no size) and `qwen` size 7B would both be `ls/qwen-7b-q4_k_m` to an engine:
    the router merged the two sections silently, llama-swap refused the whole file."""
    for folder, basename, size in (("a", "qwen-7b", ""), ("b", "qwen", "7B")):
        (env.models / folder).mkdir()
        (env.models / folder / f"{basename}.gguf").write_bytes(ollama_store.gguf_bytes(
            size_label=size, extra={"general.basename": basename}))
    names = sorted(_listed(env))
    assert len(names) == 2
    assert len({n.replace(":", "-") for n in names}) == 2, names
    ini = (env.state / "models.ini").read_text()
    sections = [line for line in ini.splitlines() if line.startswith("[ls/")]
    assert len(sections) == len(set(sections)) == 2


def test_an_alias_that_is_another_models_engine_id_is_refused(env: Env) -> None:
    for basename in ("alpha", "beta"):
        (env.models / f"{basename}.gguf").write_bytes(ollama_store.gguf_bytes(
            size_label="1B", extra={"general.basename": basename}))
    (env.home / "custom_models.yaml").write_text(
        "models:\n  beta:1b-q4_k_m:\n    aliases: [ls/alpha-1b-q4_k_m]\n")
    result = env.run("sync")
    assert result.returncode == 2
    assert "custom_models.yaml" in result.stderr and "ls/alpha-1b-q4_k_m" in result.stderr
    assert "differ only by case or ':' against '-'" in result.stderr


def test_names_json_is_locked_while_it_is_read_changed_and_written(env: Env) -> None:
    import fcntl
    import subprocess
    import sys
    import time

    (env.models / "a.gguf").write_bytes(ollama_store.gguf_bytes(size_label="1B"))
    assert env.run("sync").returncode == 0
    lock_path = env.state / "names.json.lock"
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as another `model list` or `model add` would
        listing = subprocess.Popen([sys.executable, "-m", "model_serve", "list"], env=dict(env),
                                   cwd=env.home, stdout=subprocess.PIPE, text=True)
        time.sleep(2)
        assert listing.poll() is None, "model list wrote names.json without the lock"
    assert listing.wait(timeout=60) == 0


def test_pins_survive_commands_running_at_once(env: Env, tmp_path: Path) -> None:
    import subprocess
    import sys

    files = []
    for i in range(8):
        file = tmp_path / "outside" / f"m{i}.gguf"
        file.parent.mkdir(exist_ok=True)
        file.write_bytes(ollama_store.gguf_bytes(size_label=f"{i + 1}B"))
        files.append(file)
    listers = [subprocess.Popen([sys.executable, "-m", "model_serve", "list"], env=dict(env),
                                cwd=env.home, stdout=subprocess.DEVNULL) for _ in range(4)]
    adders = [subprocess.Popen([sys.executable, "-m", "model_serve", "add", str(file), "--name",
                                f"pin{i}:1b"], env=dict(env), cwd=env.home,
                               stdout=subprocess.DEVNULL) for i, file in enumerate(files)]
    assert all(p.wait(timeout=120) == 0 for p in listers + adders)
    pinned = json.loads((env.state / "names.json").read_text())["pinned"]
    assert sorted(pinned.values()) == [f"ls/pin{i}:1b" for i in range(8)]


def test_a_corrupt_names_json_is_kept_aside(env: Env) -> None:
    (env.models / "a.gguf").write_bytes(ollama_store.gguf_bytes(size_label="1B"))
    env.state.mkdir(parents=True, exist_ok=True)
    broken = '{"names": {}, "pinned": {"/models/a.gguf": "ls/mine:1b"'  # cut short
    (env.state / "names.json").write_text(broken)
    synced = env.run("sync")
    assert synced.returncode == 0, synced.stderr
    assert "was not valid JSON" in synced.stdout + synced.stderr
    [aside] = env.state.glob("names.json.corrupt-*")
    assert aside.read_text() == broken
    assert json.loads((env.state / "names.json").read_text())["names"]
