"""Broken or hostile model files are ordinary input (STYLE 12): each one is named with a
reason, no scan hangs, crashes or takes long, and every other model is served.

The corpus is built here byte by byte (and from tiny_gguf for real-looking headers cut short).
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from model_serve.models import gguf
from model_serve.models.tiny_gguf import tiny_gguf_bytes
from tests.conftest import Env, running

_U8, _U32, _F32, _STRING, _ARRAY, _U64 = 0, 4, 6, 8, 9, 10
SCAN_SECONDS = 10.0  # a whole `model list` with one hostile file, CLI start-up included


def string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str, kind: int, payload: bytes) -> bytes:
    return string(key) + struct.pack("<I", kind) + payload


def header(kv_count: int, *kvs: bytes, tensor_count: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, tensor_count, kv_count) + b"".join(kvs)


def llama(**numbers: tuple[int, int | float]) -> bytes:
    """A llama header whose keys are given as suffix=(type, value)."""
    kvs = [kv("general.architecture", _STRING, string("llama"))]
    defaults: dict[str, tuple[int, int | float]] = {
        "context_length": (_U32, 2048), "embedding_length": (_U32, 256),
        "block_count": (_U32, 4), "attention.head_count": (_U32, 4)}
    for suffix, (kind, value) in {**defaults, **numbers}.items():
        fmt = {_U32: "<I", _U64: "<Q", _F32: "<f"}[kind]
        kvs.append(kv(f"llama.{suffix}", kind, struct.pack(fmt, value)))
    return header(len(kvs), *kvs)


def nested_arrays(depth: int = 5000) -> bytes:
    """An array of an array of ... (60 KB): a recursive reader runs out of stack."""
    nest = struct.pack("<IQ", _ARRAY, 1) * depth + struct.pack("<IQ", _U8, 0)
    return header(2, kv("general.architecture", _STRING, string("llama")),
                  string("general.nest") + struct.pack("<I", _ARRAY) + nest)


def quadratic(count: int = 20_000) -> bytes:
    """A vocabulary whose bytes are also `count` valid keys, followed by nothing: a reader
    that tries each place where a key could start, and parses on from each, does count^2
    work. Each key is a u8 array whose bytes line up with the string list around it."""
    region = b""
    for i in range(count):
        key = string(f"general.a{i:06d}")
        # as keys: key, u8 array of 10 bytes; as strings: the key, 9 bytes, 1 byte
        region += key + struct.pack("<IIQ", _ARRAY, _U8, 10) + b"x" + struct.pack("<Q", 1) + b"y"
    tokens = (string("tokenizer.ggml.tokens") + struct.pack("<IIQ", _ARRAY, _STRING, 3 * count)
              + region)
    return header(count + 3, kv("general.architecture", _STRING, string("llama")), tokens)


def _tiny_cut(where: Callable[[gguf.GGUFHeader, int], int]) -> Callable[[Path], bytes]:
    def build(tmp: Path) -> bytes:
        data = tiny_gguf_bytes()
        whole = tmp / "whole.gguf"
        whole.write_bytes(data)
        return data[:where(gguf.read_header(whole), len(data))]
    return build


# name -> the file's content (bytes), or a function of a scratch folder that makes it
CORPUS: dict[str, bytes | Callable[[Path], bytes]] = {
    "nested-arrays": nested_arrays(),
    "block-count-2^40": llama(block_count=(_U64, 1 << 40)),
    "block-count-2^32": llama(block_count=(_U64, 1 << 32)),
    "block-count-inf": llama(block_count=(_F32, float("inf"))),
    "heads-2^40": llama(**{"attention.head_count": (_U64, 1 << 40),
                           "embedding_length": (_U64, 1 << 50)}),
    "huge-string": header(2, kv("general.architecture", _STRING, string("llama")),
                          kv("general.name", _STRING, struct.pack("<Q", 1 << 62) + b"abc")),
    "huge-array": header(2, kv("general.architecture", _STRING, string("llama")),
                         kv("tokenizer.ggml.scores", _ARRAY, struct.pack("<IQ", _F32, 1 << 60))),
    "huge-string-array": header(2, kv("general.architecture", _STRING, string("llama")),
                                kv("tokenizer.ggml.tokens", _ARRAY,
                                   struct.pack("<IQ", _STRING, 1 << 60) + string("a") * 4)),
    "kv-count-2^60": header(1 << 60, kv("general.architecture", _STRING, string("llama"))),
    "tensor-count-2^60": header(1, kv("general.architecture", _STRING, string("llama")),
                                tensor_count=1 << 60),
    "quadratic": quadratic(),
    "cut-in-magic": _tiny_cut(lambda _h, _n: 3),
    "cut-in-counts": _tiny_cut(lambda _h, _n: 17),
    "cut-in-first-key": _tiny_cut(lambda _h, _n: 40),
    "cut-in-vocabulary": _tiny_cut(lambda _h, _n: 1500),
    "cut-in-tensor-names": _tiny_cut(lambda h, _n: h.tensor_info_offset + 30),
}


def good_model(env: Env, gemma_path: Path) -> None:
    (env.models / "google").mkdir(exist_ok=True)
    (env.models / "google" / gemma_path.name).symlink_to(gemma_path)


def listed(env: Env) -> tuple[list[str], str]:
    """`model list --json` (the served names) and `model list` (its warnings), each timed."""
    for args in (("list", "--json"), ("list",)):
        started = time.monotonic()
        result = env.run(*args, timeout=60)
        elapsed = time.monotonic() - started
        assert result.returncode == 0, result.stdout + result.stderr
        assert elapsed < SCAN_SECONDS, f"model {' '.join(args)} took {elapsed:.1f} s"
        if args[-1] == "--json":
            names = [m["name"] for m in json.loads(result.stdout)]
    return names, result.stderr


def warned_about(stderr: str, path: Path) -> str:
    """The reason `model list` gave for `path`."""
    lines = [line for line in stderr.splitlines() if line.startswith(f"warning: {path}: ")]
    assert lines, f"no warning about {path}:\n{stderr}"
    return lines[0].split(": ", 2)[2]


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_a_hostile_file_is_named_and_the_good_model_is_listed(env: Env, gemma_path: Path,
                                                               tmp_path: Path, case: str) -> None:
    content = CORPUS[case]
    bad = env.models / f"{case}.gguf"
    bad.write_bytes(content if isinstance(content, bytes) else content(tmp_path))
    good_model(env, gemma_path)
    names, stderr = listed(env)
    assert names == ["ls/gemma-3:270m-q4_k_m"], names
    reason = warned_about(stderr, bad)
    assert "Traceback" not in stderr and len(reason) > 10
    again, stderr = listed(env)  # a second scan (the failure may be remembered) says the same
    assert again == names and warned_about(stderr, bad) == reason


def test_special_files_are_never_opened(env: Env, gemma_path: Path, tmp_path: Path) -> None:
    """A FIFO would block the scan for ever; devices and sockets are no models either, nor
    links to them, nor links that loop."""
    good_model(env, gemma_path)
    os.mkfifo(env.models / "x.gguf")
    os.mkfifo(tmp_path / "pipe")
    (env.models / "to-pipe.gguf").symlink_to(tmp_path / "pipe")
    (env.models / "zero.gguf").symlink_to("/dev/zero")
    (env.models / "loop.gguf").symlink_to(env.models / "loop.gguf")
    (env.models / "a.gguf").symlink_to(env.models / "b.gguf")
    (env.models / "b.gguf").symlink_to(env.models / "a.gguf")
    names, stderr = listed(env)
    assert names == ["ls/gemma-3:270m-q4_k_m"]
    for name in ("x.gguf", "to-pipe.gguf", "zero.gguf"):
        assert "not a regular file" in warned_about(stderr, env.models / name)
    for name in ("loop.gguf", "a.gguf", "b.gguf"):
        assert "loop" in warned_about(stderr, env.models / name)


def test_a_folder_named_like_a_model_is_a_folder(env: Env, gemma_path: Path) -> None:
    """y.gguf/ is walked as any folder (a model inside it is served); it is no model."""
    good_model(env, gemma_path)
    (env.models / "y.gguf").mkdir()
    (env.models / "y.gguf" / "nest.gguf").write_bytes(nested_arrays())
    names, stderr = listed(env)
    assert names == ["ls/gemma-3:270m-q4_k_m"]
    assert "nested" in warned_about(stderr, env.models / "y.gguf" / "nest.gguf")


def test_hostile_state_files_are_warnings(env: Env, gemma_path: Path) -> None:
    """The bridge's record and names.json nested past Python's stack, and a header cache
    holding a block_count no model has (an older version, or anyone, may have written it)."""
    from model_serve.models.model_info import CACHE_VERSION, ModelInfo

    good_model(env, gemma_path)
    deep = "[" * 100_000 + "]" * 100_000
    (env.models / "ollama").mkdir()
    (env.models / "ollama" / ".ollama-bridge.json").write_text(deep)
    env.state.mkdir()
    (env.state / "names.json").write_text(deep)
    real = os.path.realpath(gemma_path)
    stat = os.stat(real)
    poisoned = {**vars(ModelInfo(architecture="gemma3", block_count=1 << 40, head_count=4,
                                 embedding_length=640)), "head_count_kv": [1]}
    (env.state / "model-info-cache.json").write_text(json.dumps({
        "version": CACHE_VERSION,
        "entries": {f"{real}|{stat.st_size}|{stat.st_mtime_ns}": poisoned}}))
    names, stderr = listed(env)
    assert names == ["ls/gemma-3:270m-q4_k_m"]
    assert "bridge" in warned_about(stderr, env.models / "ollama" / ".ollama-bridge.json")
    assert list(env.state.glob("names.json.corrupt-*"))  # kept aside, names given anew


def test_the_bridge_survives_hostile_manifests_and_blobs(env: Env, tmp_path: Path) -> None:
    from tests import ollama_store as ostore

    store = tmp_path / "ollama"
    ostore.add_model(store, "good:1")
    fifo = ostore.manifest_path(store, "fifo:1")
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    deep = ostore.write_manifest(store, "deep:1", b"[" * 100_000 + b"]" * 100_000)
    # Two model layers: the bridge reads both headers to tell a projector from the weights.
    two = ostore.add_model(store, "two:1")
    digest = ostore.write_blob(store, nested_arrays())
    two["manifest"]["layers"].insert(0, ostore.layer(ostore.MEDIA_MODEL, digest, 1))
    ostore.write_manifest(store, "two:1", two["manifest"])
    started = time.monotonic()
    synced = env.run("sync", "--json", timeout=60)
    assert time.monotonic() - started < SCAN_SECONDS
    assert synced.returncode == 0, synced.stdout + synced.stderr
    result = json.loads(synced.stdout)
    assert result["bridge_error"] is None, result["bridge_error"]
    skipped = {s["manifest"]: s["reason"] for s in result["bridge"]["skipped"]}
    assert "not a regular file" in skipped[str(fifo)]
    assert "nested too deeply" in skipped[str(deep)]
    assert [name for name in result["models"] if name.startswith("ls/good")], result["models"]
    # The nested header was linked as the weights; the catalog names it, unserved.
    assert any("nested" in p["reason"] for p in result["problems"]), result["problems"]
    assert not [name for name in result["models"] if name.startswith("ls/two")]


def test_the_reader_refuses_each_with_a_reason_and_quickly(tmp_path: Path) -> None:
    """The reader alone: a GGUFError for each (never RecursionError, MemoryError...)."""
    from model_serve.models.model_info import read_model_info

    for case, content in sorted(CORPUS.items()):
        path = tmp_path / f"{case}.gguf"
        path.write_bytes(content if isinstance(content, bytes) else content(tmp_path))
        started = time.monotonic()
        with pytest.raises(gguf.GGUFError) as caught:
            read_model_info(path)
        assert time.monotonic() - started < 2.0, case
        assert str(path) in caught.value.message, case


def test_the_header_cache_is_used_remembers_refusals_and_checks_entries(
        tmp_path: Path, gemma_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from model_serve.models import model_info

    bad = tmp_path / "nested.gguf"
    bad.write_bytes(nested_arrays())
    cache_file = tmp_path / "cache.json"
    cache = model_info.InfoCache(cache_file)
    good = cache.get(gemma_path)
    with pytest.raises(gguf.GGUFError):
        cache.get(bad)
    cache.save()
    reads: list[Path] = []
    real_read = model_info.read_model_info
    monkeypatch.setattr(model_info, "read_model_info",
                        lambda path: reads.append(path) or real_read(path))
    again = model_info.InfoCache(cache_file)
    assert again.get(gemma_path) == good
    with pytest.raises(gguf.GGUFError) as refused:
        again.get(bad)
    assert "nested" in refused.value.message and reads == []  # both from the cache
    # An entry no header could give (an older version's, or anyone's) is read anew.
    data = json.loads(cache_file.read_text())
    for entry in data["entries"].values():
        if "block_count" in entry:
            entry["block_count"] = 1 << 40
    cache_file.write_text(json.dumps(data))
    assert model_info.InfoCache(cache_file).get(gemma_path) == good
    assert reads == [Path(os.path.realpath(gemma_path))]


def test_long_lists_in_a_row_are_read_without_deep_recursion(tmp_path: Path) -> None:
    """600 string lists long enough to be jumped, one after another (11 MB, and valid): each
    jump is tried inside the one before, so an unbounded reader nests 600 deep."""
    strings = string("a") * (gguf.MIN_JUMPED_STRINGS + 1)
    lists = [kv(f"tokenizer.l{i:04d}", _ARRAY, struct.pack("<IQ", _STRING,
                                                            gguf.MIN_JUMPED_STRINGS + 1) + strings)
             for i in range(600)]
    path = tmp_path / "lists.gguf"
    path.write_bytes(header(601, kv("general.architecture", _STRING, string("llama")), *lists))
    started = time.monotonic()
    read = gguf.read_header(path)
    assert time.monotonic() - started < 5.0
    assert len(read.metadata) == 601


def test_the_real_header_still_reads_fast(gemma_path: Path) -> None:
    started = time.monotonic()
    header = gguf.read_header(gemma_path, tensor_names=True)
    assert time.monotonic() - started < 1.0
    assert header.tensor_count == len(header.tensor_names) == 236


def _chat(env: Env, model: str) -> str:
    reply = requests.post(f"{env.base_url}/v1/chat/completions", timeout=180, json={
        "model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


def test_a_running_stack_serves_the_good_model_beside_hostile_files(env: Env, gemma_path: Path,
                                                                     tmp_path: Path) -> None:
    good_model(env, gemma_path)
    (env.models / "nested-arrays.gguf").write_bytes(nested_arrays())
    os.mkfifo(env.models / "x.gguf")
    with running(env, stop_timeout=90):
        _chat(env, "ls/gemma-3:270m-q4_k_m")
        # Files that arrive while it runs: the sync names them and the stack keeps serving.
        (env.models / "big.gguf").write_bytes(llama(block_count=(_U64, 1 << 40)))
        (env.models / "quadratic.gguf").write_bytes(quadratic())
        (env.models / "cut.gguf").write_bytes(tiny_gguf_bytes()[:1500])
        synced = env.run("sync", "--json", timeout=120)
        assert synced.returncode == 0, synced.stdout + synced.stderr
        result = json.loads(synced.stdout)
        assert result["models"] == ["ls/gemma-3:270m-q4_k_m"]
        named = {Path(p["path"]).name for p in result["problems"]}
        assert {"nested-arrays.gguf", "x.gguf", "big.gguf", "quadratic.gguf",
                "cut.gguf"} <= named
        _chat(env, "ls/gemma-3:270m-q4_k_m")
        status = env.run("status", "--json")
        assert status.returncode == 0, status.stdout + status.stderr


# --- names that would inject lines into an engine's config ---------------------------------
INJECTED = ('models:\n'
            '  "evil\\nmodel = /etc/passwd":\n'
            '    base_model: gemma-3:270m-q4_k_m\n')


def test_a_name_with_a_line_break_is_refused_and_the_last_config_stays(env: Env,
                                                                       gemma_path: Path) -> None:
    good_model(env, gemma_path)
    first = env.run("sync", "--no-bridge")
    assert first.returncode == 0, first.stdout + first.stderr
    ini = env.state / "models.ini"
    good = ini.read_text()
    custom = env.home / "custom_models.yaml"
    custom.write_text(INJECTED)
    refused = env.run("sync", "--no-bridge")
    assert refused.returncode != 0
    message = refused.stderr
    assert f"{custom}:2" in message and "line break" in message, message
    assert "rename" in message.lower(), message
    assert ini.read_text() == good and "/etc/passwd" not in ini.read_text()


@pytest.mark.parametrize("bad", ["a\nb", "a]b", "a[b", "a;b", "a#b", "a\x00b", "a\tb",
                                 "a\u2028b", "a,b"])
def test_names_and_aliases_an_engine_config_cannot_carry_are_refused(tmp_path: Path,
                                                                     bad: str) -> None:
    from model_serve.config.custom_models import load_custom_models
    from model_serve.errors import ConfigError

    path = tmp_path / "custom_models.yaml"
    for text in (f"models:\n  {json.dumps(bad)}:\n    base_model: g\n",
                 f"models:\n  g:\n    aliases: [{json.dumps(bad)}]\n"):
        path.write_text(text)
        with pytest.raises(ConfigError) as caught:
            load_custom_models(path)
        assert f"{path}:" in caught.value.message


@pytest.mark.parametrize("engine_name", ["llama-server", "llama-swap"])
def test_the_renderers_refuse_a_name_that_slipped_through(env: Env, gemma_path: Path,
                                                          engine_name: str) -> None:
    """Defence in depth: a served name or alias with a line break never reaches a file."""
    from model_serve.config.custom_models import load_custom_models
    from model_serve.config.settings import load_settings
    from model_serve.engines.llama_server import LlamaServerEngine
    from model_serve.engines.llama_swap import LlamaSwapEngine
    from model_serve.errors import ConfigError
    from model_serve.models.catalog import build_catalog
    from model_serve.models.plan import build_plan

    good_model(env, gemma_path)
    settings = load_settings(dict(env))
    catalog = build_catalog(settings.models_dir, settings.model_prefix, settings.state_dir)
    plan = build_plan(catalog, load_custom_models(settings.custom_models_file), settings,
                      budget=1 << 40)
    engine = (LlamaServerEngine if engine_name == "llama-server" else LlamaSwapEngine)(settings)
    engine.render_config(plan)  # fine as it is
    for field in ("name", "aliases"):
        served = plan[0]
        original = served.name, list(served.aliases)
        if field == "name":
            served.name = "ls/evil\nmodel = /etc/passwd"
        else:
            served.aliases = ["evil\n[other]"]
        with pytest.raises(ConfigError) as caught:
            engine.render_config(plan)
        assert "line break" in caught.value.message
        served.name, served.aliases = original
