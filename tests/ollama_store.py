"""Build real Ollama-layout model stores for tests.

A store is the folder Ollama calls OLLAMA_MODELS: `manifests/<host>/<namespace>/<model>/<tag>`
(JSON) and `blobs/sha256-<hex>` (content-addressed files). The GGUF blobs written here are tiny
but valid GGUF v3 files (header and metadata, no tensors), so anything that reads headers can
read them. Stores the real `ollama create` makes are in tests/test_real_ollama.py; this one is
for what the real binary will not write: thousands of models, broken and hostile layouts,
projectors, names from registries this machine cannot reach.

    store = tmp_path / "ollama"
    info = add_model(store, "gemma3:27b", model_type="27.4B", file_type="Q8_0", arch="gemma3")
    info["model_blob"]        # Path of the GGUF blob
    remove_model(store, "gemma3:27b")
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from typing import Any

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

MEDIA_MODEL = "application/vnd.ollama.image.model"
MEDIA_PROJECTOR = "application/vnd.ollama.image.projector"
MEDIA_PARAMS = "application/vnd.ollama.image.params"
MEDIA_TEMPLATE = "application/vnd.ollama.image.template"
MEDIA_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"

# llama.cpp's llama_ftype numbers for the general.file_type key.
FILE_TYPE_IDS = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
    "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16,
    "Q5_K_M": 17, "Q6_K": 18, "IQ4_XS": 30, "BF16": 32, "MXFP4_MOE": 38,
}

# GGUF metadata value types.
_U32, _I32, _F32, _BOOL, _STRING, _ARRAY, _U64 = 4, 5, 6, 7, 8, 9, 10

GGUFValue = str | int | float | bool | list[str]


def parse_name(name: str) -> tuple[str, str, str, str]:
    """Split an Ollama name into (host, namespace, model, tag), filling Ollama's defaults.

    `gemma3:27b`, `alice/foo`, `hf.co/user/repo:Q8_0` and `host:5000/ns/model:tag` all work.
    """
    path, _, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", "")
    parts = path.split("/")
    if len(parts) == 1:
        parts = [DEFAULT_HOST, DEFAULT_NAMESPACE, *parts]
    elif len(parts) == 2:
        parts = [DEFAULT_HOST, *parts]
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"not an Ollama name: {name!r}")
    host, namespace, model = parts
    return host, namespace, model, tag or DEFAULT_TAG


def manifest_path(store: Path, name: str) -> Path:
    """Where Ollama keeps the manifest of `name`."""
    return Path(store, "manifests", *parse_name(name))


def _gguf_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _gguf_kv(key: str, value: GGUFValue) -> bytes:
    head = _gguf_string(key)
    if isinstance(value, bool):
        return head + struct.pack("<IB", _BOOL, value)
    if isinstance(value, int):
        return head + struct.pack("<II", _U32, value)
    if isinstance(value, float):
        return head + struct.pack("<If", _F32, value)
    if isinstance(value, str):
        return head + struct.pack("<I", _STRING) + _gguf_string(value)
    items = b"".join(_gguf_string(item) for item in value)
    return head + struct.pack("<IIQ", _ARRAY, _STRING, len(value)) + items


def gguf_bytes(
    *,
    arch: str = "llama",
    name: str = "test model",
    size_label: str = "1B",
    file_type: str = "Q4_K_M",
    context_length: int = 4096,
    block_count: int = 4,
    embedding_length: int = 256,
    head_count: int = 8,
    head_count_kv: int = 4,
    general_type: str | None = None,
    tokens: list[str] | None = None,
    extra: dict[str, GGUFValue] | None = None,
    tensors: list[tuple[str, tuple[int, ...]]] | None = None,
) -> bytes:
    """A minimal GGUF v3 file: the header and metadata only; no tensor data.

    `general_type="mmproj"` (with `arch="clip"`) makes a projector file. `tokens` adds a
    `tokenizer.ggml.tokens` string array before the model keys, as real files have it.
    `tensors` (name, dims) adds their descriptions (F32, offsets in order) after the keys.
    """
    kvs: dict[str, GGUFValue] = {"general.architecture": arch}
    if general_type:
        kvs["general.type"] = general_type
    if tokens is not None:
        kvs["tokenizer.ggml.tokens"] = tokens
    kvs.update({
        "general.name": name,
        "general.size_label": size_label,
        "general.file_type": FILE_TYPE_IDS.get(file_type, 0),
        f"{arch}.context_length": context_length,
        f"{arch}.block_count": block_count,
        f"{arch}.embedding_length": embedding_length,
        f"{arch}.attention.head_count": head_count,
        f"{arch}.attention.head_count_kv": head_count_kv,
    })
    kvs.update(extra or {})
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors or []), len(kvs))
    infos, offset = [], 0
    for tensor, dims in tensors or []:
        infos.append(_gguf_string(tensor) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims,
                                                        0, offset))
        offset += 4 * math.prod(dims)
    return header + b"".join(_gguf_kv(key, value) for key, value in kvs.items()) + b"".join(infos)


def write_blob(store: Path, data: bytes) -> str:
    """Store `data` as `blobs/sha256-<hex>` and return its digest `sha256:<hex>`."""
    hex_digest = hashlib.sha256(data).hexdigest()
    blobs = Path(store, "blobs")
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / f"sha256-{hex_digest}").write_bytes(data)
    return f"sha256:{hex_digest}"


def blob_file(store: Path, digest: str) -> Path:
    """The blob file for a `sha256:<hex>` digest."""
    return Path(store, "blobs", digest.replace(":", "-", 1))


def layer(media_type: str, digest: str, size: int) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest, "size": size}


def write_manifest(store: Path, name: str, manifest: dict[str, Any] | str | bytes) -> Path:
    """Write a manifest (an object, or raw text for broken ones) where Ollama keeps it."""
    path = manifest_path(store, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(manifest, dict):
        manifest = json.dumps(manifest)
    if isinstance(manifest, str):
        manifest = manifest.encode("utf-8")
    path.write_bytes(manifest)
    return path


def add_model(
    store: Path,
    name: str,
    *,
    model_type: str = "1B",
    file_type: str = "Q4_K_M",
    arch: str = "llama",
    projector: bool = False,
    params: dict[str, Any] | None = None,
    gguf_bytes: bytes | None = None,
    context_length: int = 4096,
    block_count: int = 4,
    embedding_length: int = 256,
    head_count: int = 8,
    head_count_kv: int = 4,
    template: str | None = "{{ .Prompt }}",
    config: dict[str, Any] | None = None,
    extra_layers: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Add a GGUF model to `store` the way `ollama pull` leaves it; return what was written.

    The GGUF content includes `name`, so every model gets its own blob unless `gguf_bytes`
    is passed (pass the same bytes twice to share one blob between tags). `config` entries
    override or extend the config blob; `extra_layers` are appended to the manifest.

    Returns a dict with: name, manifest_path, manifest (the object), model_digest,
    model_blob, config_digest, params_digest, projector_digest, projector_blob.
    """
    weights = gguf_bytes if gguf_bytes is not None else _default_gguf(
        name, arch, model_type, file_type, context_length, block_count,
        embedding_length, head_count, head_count_kv,
    )
    model_digest = write_blob(store, weights)
    layers = [layer(MEDIA_MODEL, model_digest, len(weights))]
    info: dict[str, Any] = {"name": name, "model_digest": model_digest,
                            "model_blob": blob_file(store, model_digest),
                            "projector_digest": None, "projector_blob": None,
                            "params_digest": None}
    if projector:
        proj = _projector_gguf(name)
        info["projector_digest"] = write_blob(store, proj)
        info["projector_blob"] = blob_file(store, info["projector_digest"])
        layers.append(layer(MEDIA_PROJECTOR, info["projector_digest"], len(proj)))
    if template is not None:
        text = template.encode("utf-8")
        layers.append(layer(MEDIA_TEMPLATE, write_blob(store, text), len(text)))
    if params is not None:
        data = json.dumps(params).encode("utf-8")
        info["params_digest"] = write_blob(store, data)
        layers.append(layer(MEDIA_PARAMS, info["params_digest"], len(data)))
    layers.extend(extra_layers or [])

    families = [arch, "clip"] if projector else [arch]
    config_obj = {"model_format": "gguf", "model_family": arch, "model_families": families,
                  "model_type": model_type, "file_type": file_type,
                  "rootfs": {"type": "layers", "diff_ids": [item["digest"] for item in layers]},
                  **(config or {})}
    config_data = json.dumps(config_obj).encode("utf-8")
    info["config_digest"] = write_blob(store, config_data)
    manifest = {"schemaVersion": 2, "mediaType": MEDIA_MANIFEST,
                "config": layer(MEDIA_CONFIG, info["config_digest"], len(config_data)),
                "layers": layers}
    info["manifest"] = manifest
    info["manifest_path"] = write_manifest(store, name, manifest)
    return info


def _default_gguf(name: str, arch: str, model_type: str, file_type: str, context_length: int,
                  block_count: int, embedding_length: int, head_count: int,
                  head_count_kv: int) -> bytes:
    return gguf_bytes(arch=arch, name=name, size_label=model_type, file_type=file_type,
                      context_length=context_length, block_count=block_count,
                      embedding_length=embedding_length, head_count=head_count,
                      head_count_kv=head_count_kv)


def _projector_gguf(name: str) -> bytes:
    return gguf_bytes(arch="clip", name=f"{name} projector", general_type="mmproj",
                      size_label="400M", file_type="F16", block_count=0,
                      extra={"clip.has_vision_encoder": True})


def remove_model(store: Path, name: str, *, prune: bool = True) -> None:
    """Delete a model like `ollama rm`: its manifest, then (with `prune`) the blobs that no
    other manifest still uses. Empty manifest folders are removed too, as Ollama does."""
    path = manifest_path(store, name)
    manifest = json.loads(path.read_bytes())
    path.unlink()
    manifests = Path(store, "manifests")
    folder = path.parent
    while folder != manifests and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent
    if prune:
        mine = {manifest["config"]["digest"], *(item["digest"] for item in manifest["layers"])}
        for digest in mine - referenced_digests(store):
            blob_file(store, digest).unlink(missing_ok=True)


def referenced_digests(store: Path) -> set[str]:
    """Every digest named by a manifest still in the store."""
    found: set[str] = set()
    for path in Path(store, "manifests").glob("*/*/*/*"):
        try:
            manifest = json.loads(path.read_bytes())
        except (OSError, ValueError):
            continue
        found.add(manifest["config"]["digest"])
        found.update(item["digest"] for item in manifest["layers"])
    return found
