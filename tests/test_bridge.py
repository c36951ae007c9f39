"""The Ollama bridge, run as a real program against Ollama-layout stores in tmp_path, written by
tests/ollama_store.py for every layout the real binary will not make (broken, hostile, large,
projectors). Stores made by the real `ollama create`/`cp`/`rm`: tests/test_real_ollama.py."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

try:  # tests/ may or may not become a package
    from . import ollama_store as ostore
except ImportError:
    import ollama_store as ostore

BRIDGE = Path(__file__).resolve().parents[1] / "lm-studio-ollama-bridge" / "ollama-bridge"
RECORD = ".ollama-bridge.json"
SYSTEM_STORES = [Path("/usr/share/ollama/.ollama/models"), Path("/var/lib/ollama")]


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    @property
    def data(self) -> dict[str, Any]:
        return json.loads(self.stdout)


@dataclass
class Env:
    """One isolated world: a home, an Ollama store and a destination folder."""

    home: Path
    store: Path
    dest: Path

    def run(self, *args: str, store: bool = True, env: dict[str, str] | None = None) -> Run:
        argv = [sys.executable, str(BRIDGE), "--dest", str(self.dest)]
        if store:
            argv += ["--store", str(self.store)]
        full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.home),
                    "LANG": "C.UTF-8", **(env or {})}
        done = subprocess.run([*argv, *args], env=full_env, capture_output=True, text=True,
                              timeout=60, check=False)
        return Run(done.returncode, done.stdout, done.stderr)

    def sync(self, *args: str, **kwargs: Any) -> dict[str, Any]:
        """Run with --json, insist on success, return the report."""
        result = self.run("--json", *args, **kwargs)
        assert result.returncode == 0, result.stderr
        return result.data

    def record(self) -> dict[str, Any]:
        return json.loads((self.dest / RECORD).read_text(encoding="utf-8"))

    def record_links(self) -> dict[str, dict[str, Any]]:
        return {link["path"]: link for link in self.record()["links"]}

    def links(self) -> dict[str, str]:
        """Every symlink under DEST: relative path -> its target."""
        return {str(p.relative_to(self.dest)): os.readlink(p)
                for p in sorted(self.dest.rglob("*")) if p.is_symlink()}

    def add(self, name: str, **kwargs: Any) -> dict[str, Any]:
        return ostore.add_model(self.store, name, **kwargs)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    home = tmp_path / "home"
    home.mkdir()
    store = tmp_path / "ollama"
    (store / "manifests").mkdir(parents=True)
    (store / "blobs").mkdir()
    return Env(home=home, store=store, dest=tmp_path / "models" / "ollama")


def blob_target(env: Env, info: dict[str, Any], key: str = "model_digest") -> str:
    return str(ostore.blob_file(env.store, info[key]))


def snapshot(root: Path) -> dict[str, tuple[int, int, str | None]]:
    """Every entry under root with its inode, mtime and link target: any change shows."""
    if not root.exists():
        return {}
    return {str(p): (p.lstat().st_ino, p.lstat().st_mtime_ns,
                     os.readlink(p) if p.is_symlink() else None)
            for p in [root, *root.rglob("*")]}


# --------------------------------------------------------------------------- naming


def test_library_model_is_linked_with_full_record(env: Env) -> None:
    info = env.add("gemma3:27b", model_type="27.4B", file_type="Q8_0", arch="gemma3",
                   params={"temperature": 0.6, "stop": ["<end_of_turn>"]})
    report = env.sync()
    path = "gemma3/gemma3-27b-27.4B-Q8_0.gguf"
    assert report["linked"] == [path]
    assert report["store"] == str(env.store) and report["dry_run"] is False
    assert env.links() == {path: blob_target(env, info)}
    assert os.path.isabs(env.links()[path])
    assert (env.dest / path).read_bytes()[:4] == b"GGUF"
    record = env.record()
    assert record["version"] == 1 and record["store"] == str(env.store)
    assert record["links"] == [{
        "path": path, "target": blob_target(env, info), "role": "model",
        "ollama_name": "gemma3:27b", "host": "registry.ollama.ai", "namespace": "library",
        "model": "gemma3", "tag": "27b", "digest": info["model_digest"],
        "model_type": "27.4B", "file_type": "Q8_0", "model_family": "gemma3",
        "projector": None, "params": {"temperature": 0.6, "stop": ["<end_of_turn>"]},
        "manifest": str(info["manifest_path"]),
    }]


def test_user_namespace_and_hf_names(env: Env) -> None:
    env.add("alice/foo")
    env.add("hf.co/bartowski/Llama-3.2-3B-Instruct-GGUF:Q8_0", model_type="3.2B",
            file_type="Q8_0")
    env.add("example.com:5000/team/bar:v1")
    env.sync()
    links = env.record_links()
    assert set(links) == {
        "alice--foo/foo-latest-1B-Q4_K_M.gguf",
        "hf.co--bartowski--Llama-3.2-3B-Instruct-GGUF/"
        "Llama-3.2-3B-Instruct-GGUF-Q8_0-3.2B-Q8_0.gguf",
        "example.com_5000--team--bar/bar-v1-1B-Q4_K_M.gguf",
    }
    by_name = {link["ollama_name"]: link for link in links.values()}
    assert set(by_name) == {"alice/foo:latest",
                            "hf.co/bartowski/Llama-3.2-3B-Instruct-GGUF:Q8_0",
                            "example.com:5000/team/bar:v1"}
    hf = by_name["hf.co/bartowski/Llama-3.2-3B-Instruct-GGUF:Q8_0"]
    assert (hf["host"], hf["namespace"], hf["model"], hf["tag"]) == (
        "hf.co", "bartowski", "Llama-3.2-3B-Instruct-GGUF", "Q8_0")
    assert by_name["alice/foo:latest"]["namespace"] == "alice"
    assert set(env.links()) == set(links)


def test_same_model_name_in_two_namespaces_does_not_collide(env: Env) -> None:
    env.add("llama3:8b")
    env.add("alice/llama3:8b")
    env.add("hf.co/unsloth/X-GGUF:Q4_K_M")
    env.add("hf.co/bartowski/X-GGUF:Q4_K_M")
    assert len(env.sync()["linked"]) == 4
    assert len(set(env.links().values())) == 4


def test_two_tags_with_same_size_and_quant_do_not_collide(env: Env) -> None:
    a = env.add("llama3:8b-instruct-q4_K_M", model_type="8.0B")
    b = env.add("llama3:8b-text-q4_K_M", model_type="8.0B")
    env.sync()
    assert env.links() == {
        "llama3/llama3-8b-instruct-q4_K_M-8.0B-Q4_K_M.gguf": blob_target(env, a),
        "llama3/llama3-8b-text-q4_K_M-8.0B-Q4_K_M.gguf": blob_target(env, b),
    }


def test_two_tags_sharing_one_blob_get_two_links(env: Env) -> None:
    weights = ostore.gguf_bytes(name="shared")
    a = env.add("gemma3:latest", gguf_bytes=weights, model_type="4.3B")
    b = env.add("gemma3:4b", gguf_bytes=weights, model_type="4.3B")
    assert a["model_digest"] == b["model_digest"]
    env.sync()
    links = env.links()
    assert set(links) == {"gemma3/gemma3-latest-4.3B-Q4_K_M.gguf",
                          "gemma3/gemma3-4b-4.3B-Q4_K_M.gguf"}
    assert set(links.values()) == {blob_target(env, a)}


def test_empty_or_unknown_size_and_quant_are_left_out(env: Env) -> None:
    env.add("gpt-oss-20b-GGUF:Q8_K_XL", model_type="", file_type="unknown")
    env.add("bare:v2", model_type="unknown", file_type="")
    env.add("half:v3", model_type="", file_type="Q8_0")
    env.sync()
    assert set(env.links()) == {"gpt-oss-20b-GGUF/gpt-oss-20b-GGUF-Q8_K_XL.gguf",
                                "bare/bare-v2.gguf", "half/half-v3-Q8_0.gguf"}


def test_unicode_names_become_safe_ascii_paths(env: Env) -> None:
    info = env.add("alicé/mödel:täg", model_type="1B")
    env.sync()
    link = next(iter(env.record_links().values()))
    assert link["path"] == "alic_--m_del/m_del-t_g-1B-Q4_K_M.gguf"
    assert link["ollama_name"] == "alicé/mödel:täg"
    assert env.links() == {link["path"]: blob_target(env, info)}
    assert link["path"].isascii()


def test_names_differing_only_in_case_get_a_digest_suffix(env: Env) -> None:
    a = env.add("Foo:latest")
    b = env.add("foo:latest")
    env.sync()
    paths = sorted(env.record_links())
    assert len(paths) == 2
    assert paths[0] == "Foo/Foo-latest-1B-Q4_K_M.gguf"  # manifests are taken in sorted order
    sha = hashlib.sha256(b["manifest_path"].read_bytes()).hexdigest()
    assert paths[1] == f"foo/foo-latest-1B-Q4_K_M-{sha[:8]}.gguf"
    assert {env.record_links()[p]["ollama_name"] for p in paths} == {"Foo:latest", "foo:latest"}
    assert a["model_digest"] != b["model_digest"]


# --------------------------------------------------------------------------- projectors


def test_projector_layer_is_linked_as_mmproj_beside_the_model(env: Env) -> None:
    info = env.add("llava:7b", model_type="7B", projector=True)
    env.sync()
    model_path = "llava/llava-7b-7B-Q4_K_M.gguf"
    proj_path = "llava/mmproj-llava-7b.gguf"
    assert env.links() == {model_path: blob_target(env, info),
                           proj_path: blob_target(env, info, "projector_digest")}
    links = env.record_links()
    assert links[model_path]["projector"] == proj_path
    assert links[proj_path]["role"] == "projector"
    assert links[proj_path]["model_link"] == model_path
    assert links[proj_path]["digest"] == info["projector_digest"]
    assert links[proj_path]["ollama_name"] == "llava:7b"


def test_second_model_layer_with_mmproj_header_is_the_projector(env: Env) -> None:
    proj = ostore.gguf_bytes(arch="clip", general_type="mmproj", name="proj",
                             tokens=[f"t{i}" for i in range(2000)])
    proj_digest = ostore.write_blob(env.store, proj)
    weights = ostore.gguf_bytes(name="weights", tokens=["a", "b"])
    weights_digest = ostore.write_blob(env.store, weights)
    info = env.add("vision:latest", gguf_bytes=weights)
    # The mmproj comes first, as an import with two FROM lines could leave it.
    manifest = info["manifest"]
    manifest["layers"].insert(0, ostore.layer(ostore.MEDIA_MODEL, proj_digest, len(proj)))
    ostore.write_manifest(env.store, "vision:latest", manifest)
    env.sync()
    assert env.links() == {
        "vision/vision-latest-1B-Q4_K_M.gguf": str(ostore.blob_file(env.store, weights_digest)),
        "vision/mmproj-vision-latest.gguf": str(ostore.blob_file(env.store, proj_digest)),
    }


def test_two_projector_headers_never_share_one_blob(env: Env) -> None:
    first = ostore.gguf_bytes(arch="clip", general_type="mmproj", name="p1")
    second = ostore.gguf_bytes(arch="clip", general_type="mmproj", name="p2")
    d1, d2 = ostore.write_blob(env.store, first), ostore.write_blob(env.store, second)
    info = env.add("odd:1", gguf_bytes=first)
    info["manifest"]["layers"][0] = ostore.layer(ostore.MEDIA_MODEL, d1, len(first))
    info["manifest"]["layers"].insert(1, ostore.layer(ostore.MEDIA_MODEL, d2, len(second)))
    ostore.write_manifest(env.store, "odd:1", info["manifest"])
    env.sync()
    # No weights to tell apart: the first layer is the model, the other the projector.
    assert env.links() == {"odd/odd-1-1B-Q4_K_M.gguf": str(ostore.blob_file(env.store, d1)),
                           "odd/mmproj-odd-1.gguf": str(ostore.blob_file(env.store, d2))}


def test_clip_architecture_second_layer_is_the_projector(env: Env) -> None:
    proj = ostore.gguf_bytes(arch="clip", name="clip only")  # no general.type key
    proj_digest = ostore.write_blob(env.store, proj)
    info = env.add("cv:1")
    info["manifest"]["layers"].append(ostore.layer(ostore.MEDIA_MODEL, proj_digest, len(proj)))
    ostore.write_manifest(env.store, "cv:1", info["manifest"])
    env.sync()
    assert env.links()["cv/mmproj-cv-1.gguf"] == str(ostore.blob_file(env.store, proj_digest))
    assert env.links()["cv/cv-1-1B-Q4_K_M.gguf"] == blob_target(env, info)


# --------------------------------------------------------------------------- runs and output


def test_dry_run_changes_nothing(env: Env, tmp_path: Path) -> None:
    env.add("gemma3:27b")
    before = snapshot(tmp_path)
    result = env.run("--dry-run")
    assert result.returncode == 0
    assert "would link  gemma3/gemma3-27b-1B-Q4_K_M.gguf -> sha256-" in result.stdout
    assert "1 linked, 0 unchanged, 0 removed, 0 skipped (dry run" in result.stdout
    assert snapshot(tmp_path) == before
    assert not env.dest.exists()

    env.sync()
    ostore.remove_model(env.store, "gemma3:27b")
    before = snapshot(tmp_path)
    report = env.sync("--dry-run")
    assert report["removed"] == ["gemma3/gemma3-27b-1B-Q4_K_M.gguf"] and report["dry_run"]
    assert snapshot(tmp_path) == before


def test_second_run_changes_nothing(env: Env) -> None:
    env.add("gemma3:27b", projector=True)
    env.add("alice/foo:latest")
    first = env.run()
    assert first.returncode == 0 and first.stdout.count("link  ") == 3
    before = snapshot(env.dest)
    second = env.run()
    assert second.returncode == 0
    assert "0 linked, 3 unchanged, 0 removed, 0 skipped: nothing to do" in second.stdout
    assert "link  " not in second.stdout
    assert snapshot(env.dest) == before  # record mtime and every link inode untouched


def test_text_output_and_quiet(env: Env) -> None:
    info = env.add("gemma3:27b", model_type="27.4B", file_type="Q8_0")
    hex12 = info["model_digest"].split(":")[1][:12]
    result = env.run()
    assert f"link  gemma3/gemma3-27b-27.4B-Q8_0.gguf -> sha256-{hex12}…" in result.stdout
    assert result.stdout.strip().endswith("1 linked, 0 unchanged, 0 removed, 0 skipped")
    ostore.remove_model(env.store, "gemma3:27b")
    quiet = env.run("--quiet")
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    assert env.links() == {}


def test_json_report_shape(env: Env) -> None:
    env.add("a:1")
    report = env.sync()
    assert set(report) == {"linked", "unchanged", "removed", "skipped", "store", "dry_run"}
    assert report["linked"] == ["a/a-1-1B-Q4_K_M.gguf"]
    assert report["unchanged"] == [] and report["removed"] == [] and report["skipped"] == []
    again = env.sync()
    assert again["linked"] == [] and again["unchanged"] == ["a/a-1-1B-Q4_K_M.gguf"]


def test_non_gguf_models_are_skipped_with_info(env: Env) -> None:
    env.add("good:1")
    st = env.add("flux:latest", config={"model_format": "safetensors"})
    cloud = ostore.add_model(env.store, "gpt-oss:120b-cloud",
                             config={"remote_host": "https://ollama.com:443"})
    cloud["manifest"]["layers"] = []  # cloud stubs have no weights at all
    ostore.write_manifest(env.store, "gpt-oss:120b-cloud", cloud["manifest"])
    result = env.run()
    assert result.returncode == 0
    assert "skip  flux:latest: not a GGUF model (model_format safetensors)" in result.stdout
    assert "skip  gpt-oss:120b-cloud: not a local GGUF model (cloud model)" in result.stdout
    assert "1 linked, 0 unchanged, 0 removed, 2 skipped" in result.stdout
    assert result.stderr == ""  # expected skips are not warnings
    assert set(env.links()) == {"good/good-1-1B-Q4_K_M.gguf"}
    skipped = env.sync()["skipped"]
    assert {s["manifest"] for s in skipped} == {
        str(st["manifest_path"]), str(cloud["manifest_path"])}


# --------------------------------------------------------------------------- removal


def test_link_removed_after_manifest_deleted(env: Env) -> None:
    env.add("gemma3:27b")
    env.add("gemma3:4b")
    env.add("solo:1")
    env.sync()
    ostore.remove_model(env.store, "gemma3:27b")
    ostore.remove_model(env.store, "solo:1")
    result = env.run()
    assert "remove  gemma3/gemma3-27b-1B-Q4_K_M.gguf" in result.stdout
    assert "remove  solo/solo-1-1B-Q4_K_M.gguf" in result.stdout
    assert "0 linked, 1 unchanged, 2 removed, 0 skipped" in result.stdout
    assert set(env.links()) == {"gemma3/gemma3-4b-1B-Q4_K_M.gguf"}
    assert not (env.dest / "solo").exists()  # its folder held only the bridge's link
    assert set(env.record_links()) == {"gemma3/gemma3-4b-1B-Q4_K_M.gguf"}


def test_link_removed_when_blob_goes_missing(env: Env) -> None:
    info = env.add("gemma3:27b")
    env.sync()
    info["model_blob"].unlink()
    result = env.run("--json")
    assert result.returncode == 0
    assert result.data["removed"] == ["gemma3/gemma3-27b-1B-Q4_K_M.gguf"]
    assert result.data["skipped"][0]["manifest"] == str(info["manifest_path"])
    assert "is missing" in result.data["skipped"][0]["reason"]
    assert str(info["manifest_path"]) in result.stderr
    assert env.links() == {} and env.record()["links"] == []


def test_name_change_moves_the_link(env: Env) -> None:
    old = env.add("qwen3:8b", file_type="unknown")
    env.sync()
    new = env.add("qwen3:8b", file_type="IQ4_XS")  # a newer Ollama knows the quant
    report = env.sync()
    assert report["linked"] == ["qwen3/qwen3-8b-1B-IQ4_XS.gguf"]
    assert report["removed"] == ["qwen3/qwen3-8b-1B.gguf"]
    assert env.links() == {"qwen3/qwen3-8b-1B-IQ4_XS.gguf": blob_target(env, new)}
    assert old["model_digest"] != new["model_digest"]


def test_repull_with_new_blob_replaces_link_in_place(env: Env) -> None:
    old = env.add("gemma3:27b")
    env.sync()
    path = env.dest / "gemma3/gemma3-27b-1B-Q4_K_M.gguf"
    old_inode = path.lstat().st_ino
    new = env.add("gemma3:27b", gguf_bytes=ostore.gguf_bytes(name="gemma3 v2"))
    old["model_blob"].unlink()  # Ollama prunes the blob no manifest uses any more
    report = env.sync()
    assert report["linked"] == ["gemma3/gemma3-27b-1B-Q4_K_M.gguf"] and report["removed"] == []
    assert os.readlink(path) == blob_target(env, new)
    assert path.lstat().st_ino != old_inode  # a new link renamed over the old one
    assert path.read_bytes() == new["model_blob"].read_bytes()
    assert env.record_links()[f"gemma3/{path.name}"]["digest"] == new["model_digest"]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp left over


def test_never_touches_files_it_did_not_make(env: Env, tmp_path: Path) -> None:
    env.add("gemma3:27b")
    env.sync()
    outside = tmp_path / "precious.gguf"
    outside.write_bytes(b"GGUF mine")
    folder = env.dest / "gemma3"
    (folder / "notes.txt").write_text("mine")
    (folder / "foreign.gguf").symlink_to(outside)
    (folder / "dangling.gguf").symlink_to(tmp_path / "gone.gguf")
    (env.dest / "other").mkdir()
    (env.dest / "other" / "dangling.gguf").symlink_to(tmp_path / "gone2.gguf")
    (env.dest / "empty-mine").mkdir()
    ostore.remove_model(env.store, "gemma3:27b")
    report = env.sync()
    assert report["removed"] == ["gemma3/gemma3-27b-1B-Q4_K_M.gguf"]
    assert (folder / "notes.txt").read_text() == "mine"
    assert os.readlink(folder / "foreign.gguf") == str(outside)
    assert os.readlink(folder / "dangling.gguf") == str(tmp_path / "gone.gguf")
    assert os.readlink(env.dest / "other" / "dangling.gguf") == str(tmp_path / "gone2.gguf")
    assert (env.dest / "empty-mine").is_dir()
    assert outside.read_bytes() == b"GGUF mine"


def test_occupied_link_path_is_left_alone(env: Env, tmp_path: Path) -> None:
    env.add("gemma3:27b")
    env.add("gemma3:4b")
    folder = env.dest / "gemma3"
    folder.mkdir(parents=True)
    (folder / "gemma3-27b-1B-Q4_K_M.gguf").write_bytes(b"a real file")
    (folder / "gemma3-4b-1B-Q4_K_M.gguf").symlink_to(tmp_path / "elsewhere.gguf")
    result = env.run("--json")
    assert result.returncode == 0
    assert result.data["linked"] == []
    assert len(result.data["skipped"]) == 2
    assert all("left alone" in s["reason"] for s in result.data["skipped"])
    assert "gemma3-27b-1B-Q4_K_M.gguf is taken" in result.stderr
    assert (folder / "gemma3-27b-1B-Q4_K_M.gguf").read_bytes() == b"a real file"
    assert os.readlink(folder / "gemma3-4b-1B-Q4_K_M.gguf") == str(tmp_path / "elsewhere.gguf")
    assert env.record()["links"] == []
    # Once the user clears the path, the link appears.
    (folder / "gemma3-27b-1B-Q4_K_M.gguf").unlink()
    assert env.sync()["linked"] == ["gemma3/gemma3-27b-1B-Q4_K_M.gguf"]


def test_recorded_link_replaced_by_user_is_not_removed(env: Env) -> None:
    env.add("gemma3:27b")
    env.add("keep:1")
    env.sync()
    path = env.dest / "gemma3/gemma3-27b-1B-Q4_K_M.gguf"
    path.unlink()
    path.write_bytes(b"the user's own copy")
    ostore.remove_model(env.store, "gemma3:27b")
    report = env.sync()
    assert report["removed"] == []
    assert path.read_bytes() == b"the user's own copy"
    assert set(env.record_links()) == {"keep/keep-1-1B-Q4_K_M.gguf"}


def test_tampered_record_cannot_make_it_delete_anything(env: Env, tmp_path: Path) -> None:
    victim = tmp_path / "victim.gguf"
    victim.write_bytes(b"x")
    escape = tmp_path / "escape-link"
    escape.symlink_to(victim)
    env.dest.mkdir(parents=True)
    (env.dest / "real").mkdir()
    (env.dest / "real" / "file.gguf").write_bytes(b"y")
    (env.dest / "ln").mkdir()
    (env.dest / "ln" / "x.gguf").symlink_to(victim)
    (env.dest / "bad").symlink_to(tmp_path)  # a symlinked folder leading out of DEST
    record = {"version": 1, "store": str(env.store), "links": [
        {"path": "../escape-link", "target": str(victim)},
        {"path": str(escape), "target": str(victim)},
        {"path": "real/file.gguf", "target": str(env.store / "blobs" / ("sha256-" + "0" * 64))},
        {"path": "ln/x.gguf", "target": str(victim)},  # not a target inside the store
        {"path": "bad/escape-link", "target": str(victim)},
    ]}
    (env.dest / RECORD).write_text(json.dumps(record))
    report = env.sync()
    assert report["removed"] == []
    assert escape.is_symlink() and victim.read_bytes() == b"x"
    assert (env.dest / "real" / "file.gguf").read_bytes() == b"y"
    assert (env.dest / "ln" / "x.gguf").is_symlink()
    assert env.record()["links"] == []


def test_malformed_record_is_replaced_without_deleting(env: Env) -> None:
    env.add("a:1")
    env.dest.mkdir(parents=True)
    (env.dest / RECORD).write_text("{not json")
    result = env.run("--json")
    assert result.returncode == 0 and "not valid JSON" in result.stderr
    assert result.data["linked"] == ["a/a-1-1B-Q4_K_M.gguf"]
    assert set(env.record_links()) == {"a/a-1-1B-Q4_K_M.gguf"}


def test_lost_record_adopts_identical_links(env: Env) -> None:
    env.add("a:1")
    env.sync()
    (env.dest / RECORD).unlink()
    report = env.sync()
    assert report["linked"] == [] and report["unchanged"] == ["a/a-1-1B-Q4_K_M.gguf"]
    assert set(env.record_links()) == {"a/a-1-1B-Q4_K_M.gguf"}


# --------------------------------------------------------------------------- hostile stores


def hostile_manifest(env: Env, name: str, layers: list[dict[str, Any]],
                     config_digest: str | None = None) -> Path:
    if config_digest is None:
        config_digest = ostore.write_blob(env.store, b'{"model_format":"gguf"}')
    return ostore.write_manifest(env.store, name, {
        "schemaVersion": 2, "config": ostore.layer(ostore.MEDIA_CONFIG, config_digest, 1),
        "layers": layers})


def assert_only_good_linked(env: Env, result: Run) -> None:
    assert result.returncode == 0, result.stderr
    assert result.data["linked"] == ["good/good-1-1B-Q4_K_M.gguf"]


def test_digest_path_traversal_is_rejected(env: Env, tmp_path: Path) -> None:
    env.add("good:1")
    path = hostile_manifest(env, "evil:1", [
        ostore.layer(ostore.MEDIA_MODEL, "sha256:../../etc/passwd", 1)])
    path2 = hostile_manifest(env, "evil:2", [], config_digest="sha256:../../../etc/passwd")
    upper = "sha256:" + "A" * 64
    path3 = hostile_manifest(env, "evil:3", [ostore.layer(ostore.MEDIA_MODEL, upper, 1)])
    result = env.run("--json")
    assert_only_good_linked(env, result)
    reasons = {s["manifest"]: s["reason"] for s in result.data["skipped"]}
    assert reasons == {str(path): "invalid digest 'sha256:../../etc/passwd'",
                       str(path2): "invalid digest 'sha256:../../../etc/passwd'",
                       str(path3): f"invalid digest '{upper}'"}
    assert str(path) in result.stderr
    assert not any("passwd" in target for target in env.links().values())


def test_blob_symlink_escaping_the_store_is_rejected(env: Env, tmp_path: Path) -> None:
    env.add("good:1")
    outside = tmp_path / "outside.gguf"
    outside.write_bytes(ostore.gguf_bytes(name="outside"))
    hex_digest = "1" * 64
    (env.store / "blobs" / f"sha256-{hex_digest}").symlink_to(outside)
    path = hostile_manifest(env, "evil:1", [
        ostore.layer(ostore.MEDIA_MODEL, f"sha256:{hex_digest}", 1)])
    result = env.run("--json")
    assert_only_good_linked(env, result)
    assert result.data["skipped"] == [{
        "manifest": str(path),
        "reason": f"blob sha256-{hex_digest} resolves outside the store ({outside})"}]


def test_blob_symlink_loop_is_skipped(env: Env) -> None:
    env.add("good:1")
    blobs = env.store / "blobs"
    a, b = "2" * 64, "3" * 64
    (blobs / f"sha256-{a}").symlink_to(blobs / f"sha256-{b}")
    (blobs / f"sha256-{b}").symlink_to(blobs / f"sha256-{a}")
    path = hostile_manifest(env, "loop:1", [ostore.layer(ostore.MEDIA_MODEL, f"sha256:{a}", 1)])
    result = env.run("--json")
    assert_only_good_linked(env, result)
    (skip,) = result.data["skipped"]
    assert skip["manifest"] == str(path) and "cannot be resolved" in skip["reason"]


def test_non_gguf_blob_is_skipped(env: Env) -> None:
    env.add("good:1")
    info = env.add("notgguf:1", gguf_bytes=b"PK\x03\x04 a zip, not a model")
    proj_bad = env.add("badproj:1")
    junk = ostore.write_blob(env.store, b"not gguf either")
    proj_bad["manifest"]["layers"].append(ostore.layer(ostore.MEDIA_PROJECTOR, junk, 15))
    ostore.write_manifest(env.store, "badproj:1", proj_bad["manifest"])
    result = env.run("--json")
    assert result.returncode == 0
    assert sorted(result.data["linked"]) == ["good/good-1-1B-Q4_K_M.gguf"]
    reasons = {s["manifest"]: s["reason"] for s in result.data["skipped"]}
    sha = info["model_digest"].replace(":", "-")
    assert reasons[str(info["manifest_path"])] == f"blob {sha} is not a GGUF file"
    assert "is not a GGUF file" in reasons[str(proj_bad["manifest_path"])]


def test_malformed_manifest_and_config_do_not_stop_the_scan(env: Env) -> None:
    env.add("good:1")
    bad_json = ostore.write_manifest(env.store, "broken:1", "{this is not json")
    not_object = ostore.write_manifest(env.store, "broken:2", "[1, 2, 3]")
    bad_config = env.add("badcfg:1")
    cfg_digest = ostore.write_blob(env.store, b"\xff\xfe not json")
    bad_config["manifest"]["config"]["digest"] = cfg_digest
    ostore.write_manifest(env.store, "badcfg:1", bad_config["manifest"])
    list_config = env.add("badcfg:2")
    list_config["manifest"]["config"]["digest"] = ostore.write_blob(env.store, b"[]")
    ostore.write_manifest(env.store, "badcfg:2", list_config["manifest"])
    bad_params = env.add("badparams:1")
    params_digest = ostore.write_blob(env.store, b"temperature 0.1")
    bad_params["manifest"]["layers"].append(
        ostore.layer(ostore.MEDIA_PARAMS, params_digest, 15))
    ostore.write_manifest(env.store, "badparams:1", bad_params["manifest"])
    result = env.run("--json")
    assert_only_good_linked(env, result)
    reasons = {s["manifest"]: s["reason"] for s in result.data["skipped"]}
    assert reasons[str(bad_json)].startswith("manifest is not valid JSON")
    assert reasons[str(not_object)] == "manifest is not an Ollama manifest object"
    assert "config blob" in reasons[str(bad_config["manifest_path"])]
    assert "not valid JSON" in reasons[str(bad_config["manifest_path"])]
    assert "is not a JSON object" in reasons[str(list_config["manifest_path"])]
    assert "params blob" in reasons[str(bad_params["manifest_path"])]
    for path in reasons:
        assert path in result.stderr  # every warning names its file


def test_manifests_at_the_wrong_depth_are_ignored(env: Env) -> None:
    env.add("good:1")
    manifests = env.store / "manifests"
    shallow = manifests / "registry.ollama.ai" / "library" / "shallow"
    shallow.write_text("{}")
    deep = manifests / "registry.ollama.ai" / "library" / "deep" / "tag" / "extra"
    deep.parent.mkdir(parents=True)
    deep.write_text(json.dumps(ostore.add_model(env.store, "x:1")["manifest"]))
    ostore.remove_model(env.store, "x:1", prune=False)
    (manifests / ".DS_Store").write_text("junk")
    result = env.run("--json")
    assert_only_good_linked(env, result)
    skipped = {s["manifest"] for s in result.data["skipped"]}
    assert skipped == {str(shallow), str(deep.parent)}
    assert ".DS_Store" not in result.stderr


def test_manifest_symlinked_from_outside_the_store_is_skipped(env: Env, tmp_path: Path) -> None:
    env.add("good:1")
    info = env.add("twin:1")
    outside = tmp_path / "outside-manifest"
    outside.write_bytes(info["manifest_path"].read_bytes())
    ostore.remove_model(env.store, "twin:1", prune=False)
    link = ostore.manifest_path(env.store, "twin:1")
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    result = env.run("--json")
    assert_only_good_linked(env, result)
    assert "outside the store" in result.data["skipped"][0]["reason"]


def test_unreadable_manifest_folder_does_not_stop_the_scan(env: Env) -> None:
    env.add("good:1")
    env.add("alice/hidden:1")
    env.sync()
    env.add("new:1")
    hidden = "alice--hidden/hidden-1-1B-Q4_K_M.gguf"
    locked = env.store / "manifests" / "registry.ollama.ai" / "alice"
    locked.chmod(0)
    try:
        result = env.run("--json")
    finally:
        locked.chmod(0o755)
    assert result.returncode == 0
    assert result.data["linked"] == ["new/new-1-1B-Q4_K_M.gguf"]  # the scan went on
    assert result.data["removed"] == []
    # Either way the hidden model's link survives: root reads through mode 000, and for
    # anyone else a folder that cannot be read is no proof that its models are gone.
    assert hidden in env.links() and hidden in env.record_links()
    assert sorted(result.data["unchanged"]) == [hidden, "good/good-1-1B-Q4_K_M.gguf"]
    if os.geteuid() == 0:
        assert result.data["skipped"] == []
    else:
        assert result.data["skipped"] == [
            {"manifest": str(locked), "reason": "cannot read folder: Permission denied"}]
        assert str(locked) in result.stderr
    # Once readable again and the model is really gone, its link goes.
    ostore.remove_model(env.store, "alice/hidden:1")
    assert env.sync()["removed"] == [hidden]


def test_undecodable_folder_name_is_skipped_without_crashing(env: Env) -> None:
    env.add("good:1")
    info = env.add("victim:1")
    manifest_bytes = info["manifest_path"].read_bytes()
    ostore.remove_model(env.store, "victim:1", prune=False)
    library = os.fsencode(env.store / "manifests" / "registry.ollama.ai" / "library")
    os.makedirs(library + b"/bad\xffname")
    with open(library + b"/bad\xffname/1", "wb") as handle:
        handle.write(manifest_bytes)
    result = env.run("--json")
    assert_only_good_linked(env, result)
    (skip,) = result.data["skipped"]
    assert skip["reason"] == "name is not valid UTF-8"
    assert skip["manifest"].endswith("bad\udcffname/1")  # surrogate-escaped, as Python reads it
    text = env.run()
    assert text.returncode == 0 and "name is not valid UTF-8" in text.stderr


def test_lone_surrogates_in_params_do_not_break_the_record(env: Env) -> None:
    info = env.add("odd:1")
    params = b'{"stop": ["\\ud800"], "temperature": 0.2}'
    digest = ostore.write_blob(env.store, params)
    info["manifest"]["layers"].append(ostore.layer(ostore.MEDIA_PARAMS, digest, len(params)))
    ostore.write_manifest(env.store, "odd:1", info["manifest"])
    report = env.sync()
    assert report["linked"] == ["odd/odd-1-1B-Q4_K_M.gguf"]
    assert env.record_links()["odd/odd-1-1B-Q4_K_M.gguf"]["params"] == {
        "stop": ["\ud800"], "temperature": 0.2}
    assert env.record()["links"][0]["ollama_name"] == "odd:1"


def test_hostile_gguf_header_in_extra_model_layer(env: Env) -> None:
    # A header claiming a 2**62-element array: must be seen as "not a projector", not hang.
    hostile = (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 3) + b"big"
               + struct.pack("<IIQ", 9, 10, 2**62))
    digest = ostore.write_blob(env.store, hostile)
    info = env.add("two:1")
    info["manifest"]["layers"].insert(0, ostore.layer(ostore.MEDIA_MODEL, digest, len(hostile)))
    ostore.write_manifest(env.store, "two:1", info["manifest"])
    env.sync()
    # Neither layer is a projector, so the first model layer is the weights.
    assert env.links() == {"two/two-1-1B-Q4_K_M.gguf": str(ostore.blob_file(env.store, digest))}


def test_adapter_layer_is_reported(env: Env) -> None:
    adapter = ostore.gguf_bytes(arch="llama", general_type="adapter", name="lora")
    digest = ostore.write_blob(env.store, adapter)
    info = env.add("tuned:1", extra_layers=[
        ostore.layer("application/vnd.ollama.image.adapter", digest, len(adapter))])
    result = env.run()
    assert result.returncode == 0
    assert "tuned:1 has a LoRA adapter layer" in result.stderr
    assert str(info["manifest_path"]) in result.stderr
    assert env.links() == {"tuned/tuned-1-1B-Q4_K_M.gguf": blob_target(env, info)}


def test_legacy_colon_blob_names_are_accepted(env: Env) -> None:
    info = env.add("old:1")
    legacy = env.store / "blobs" / info["model_digest"]  # sha256:<hex>
    info["model_blob"].rename(legacy)
    env.sync()
    assert env.links() == {"old/old-1-1B-Q4_K_M.gguf": str(legacy)}


def test_partial_download_is_never_linked(env: Env) -> None:
    info = env.add("pulling:1")
    info["model_blob"].rename(str(info["model_blob"]) + "-partial")
    report = env.sync()
    assert report["linked"] == [] and "is missing" in report["skipped"][0]["reason"]
    assert env.links() == {}


def test_store_is_never_written(env: Env) -> None:
    env.add("gemma3:27b", projector=True, params={"num_ctx": 8192})
    before = snapshot(env.store)
    env.sync()
    ostore.remove_model(env.store, "gemma3:27b", prune=False)
    after_rm = snapshot(env.store)
    env.sync()
    assert snapshot(env.store) == after_rm
    assert set(after_rm) < set(before)


def test_dest_inside_store_is_refused(env: Env) -> None:
    env.add("a:1")
    before = snapshot(env.store)
    env.dest = env.store / "blobs" / "links"
    result = env.run()
    assert result.returncode == 2
    assert "inside the Ollama store" in result.stderr
    assert snapshot(env.store) == before


# --------------------------------------------------------------------------- store discovery


def test_store_found_through_ollama_models(env: Env) -> None:
    env.add("a:1")
    report = env.sync(store=False, env={"OLLAMA_MODELS": str(env.store)})
    assert report["store"] == str(env.store)
    assert report["linked"] == ["a/a-1-1B-Q4_K_M.gguf"]
    assert env.record()["store"] == str(env.store)


def test_store_found_in_home(env: Env) -> None:
    home_store = env.home / ".ollama" / "models"
    info = ostore.add_model(home_store, "b:1")
    # An OLLAMA_MODELS without manifests/ is passed over.
    report = env.sync(store=False, env={"OLLAMA_MODELS": str(env.home / "nothing-here")})
    assert report["store"] == str(home_store)
    assert env.links() == {"b/b-1-1B-Q4_K_M.gguf": str(info["model_blob"])}


def test_no_store_found_removes_only_its_own_links(env: Env, tmp_path: Path) -> None:
    env.add("a:1")
    env.sync()
    (env.dest / "mine.txt").write_text("keep")
    system_store = next((p for p in SYSTEM_STORES if (p / "manifests").is_dir()), None)
    result = env.run(store=False, env={"OLLAMA_MODELS": str(tmp_path / "gone")})
    assert result.returncode == 0
    if system_store is None:
        assert "no Ollama store found" in result.stdout
        assert str(tmp_path / "gone") in result.stdout
        assert str(env.home / ".ollama" / "models") in result.stdout
        assert "/usr/share/ollama/.ollama/models" in result.stdout
        assert "remove  a/a-1-1B-Q4_K_M.gguf" in result.stdout
        assert env.links() == {}
        assert env.record() == {"version": 1, "store": None, "links": []}
    else:  # this machine has a system-wide Ollama: it is found instead, and a:1 is not in it
        assert env.record()["store"] == str(system_store)
        assert "a/a-1-1B-Q4_K_M.gguf" not in env.links()
    assert (env.dest / "mine.txt").read_text() == "keep"


def test_no_store_and_no_previous_run_changes_nothing(env: Env, tmp_path: Path) -> None:
    if any((p / "manifests").is_dir() for p in SYSTEM_STORES):
        result = env.run(store=False)
        assert result.returncode == 0 and "no Ollama store found" not in result.stdout
        return
    before = snapshot(tmp_path)
    result = env.run(store=False)
    assert result.returncode == 0 and "no Ollama store found; looked in:" in result.stdout
    assert snapshot(tmp_path) == before and not env.dest.exists()


def test_bad_store_and_usage_exit_2(env: Env, tmp_path: Path) -> None:
    missing = env.run("--store", str(tmp_path / "nope"), store=False)
    assert missing.returncode == 2 and "no such folder" in missing.stderr
    other = tmp_path / "other"
    (other / "photos").mkdir(parents=True)
    not_ollama = env.run("--store", str(other), store=False)
    assert not_ollama.returncode == 2 and "not an Ollama store" in not_ollama.stderr
    assert str(other) in not_ollama.stderr
    no_dest = subprocess.run([sys.executable, str(BRIDGE)], capture_output=True, text=True,
                             env={"HOME": str(env.home)}, check=False)
    assert no_dest.returncode == 2 and "--dest" in no_dest.stderr
    (tmp_path / "file").write_text("x")
    env.dest = tmp_path / "file"
    assert env.run().returncode == 2
    assert not (tmp_path / "nope").exists() and not (other / "manifests").exists()


def test_fresh_store_without_manifests_has_no_models(env: Env, tmp_path: Path) -> None:
    """Ollama makes manifests/ only with the first pull: before that, 0 models, no error."""
    for fresh in (tmp_path / "empty", tmp_path / "blobs-only"):
        fresh.mkdir()
        if fresh.name == "blobs-only":
            (fresh / "blobs").mkdir()
        summary = env.sync("--store", str(fresh), store=False)
        assert summary["store"] == str(fresh) and summary["linked"] == []
        assert not (fresh / "manifests").exists()
    default_store = env.home / ".ollama" / "models"
    (default_store / "blobs").mkdir(parents=True)
    found = env.sync(store=False)  # found by the default search, not named
    assert found["store"] == str(default_store) and found["linked"] == []


def test_executable_is_stdlib_only_and_runnable() -> None:
    assert os.access(BRIDGE, os.X_OK)
    assert BRIDGE.read_text().startswith("#!/usr/bin/env python3\n")
    module = BRIDGE.with_name("ollama_bridge.py").read_text()
    imports = {line.split()[1].split(".")[0] for line in module.splitlines()
               if line.startswith(("import ", "from "))}
    assert imports <= set(sys.stdlib_module_names) | {"__future__"}


# --------------------------------------------------------------------------- the test helper


def test_helper_writes_a_readable_gguf_header(env: Env) -> None:
    sys.path.insert(0, str(BRIDGE.parent))
    try:
        import ollama_bridge
    finally:
        sys.path.remove(str(BRIDGE.parent))
    info = env.add("gemma3:27b", arch="gemma3", model_type="27.4B", file_type="Q8_0",
                   context_length=131072, block_count=62)
    keys = ollama_bridge.read_gguf_keys(str(info["model_blob"]), {
        "general.architecture", "general.name", "general.size_label", "general.file_type",
        "gemma3.context_length", "gemma3.block_count", "gemma3.attention.head_count_kv"})
    assert keys == {"general.architecture": "gemma3", "general.name": "gemma3:27b",
                    "general.size_label": "27.4B", "general.file_type": 7,
                    "gemma3.context_length": 131072, "gemma3.block_count": 62,
                    "gemma3.attention.head_count_kv": 4}
    assert ostore.parse_name("hf.co/u/r:Q8_0") == ("hf.co", "u", "r", "Q8_0")
    assert ostore.parse_name("alice/foo") == ("registry.ollama.ai", "alice", "foo", "latest")
    assert ostore.parse_name("h:5000/n/m") == ("h:5000", "n", "m", "latest")
