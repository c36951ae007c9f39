"""What the stack needs to know about one GGUF file, read from its header and cached.

Headers of big models take tens of milliseconds to walk (tokenizer arrays), so results are
cached by (real path, size, mtime); a sync over hundreds of models then reads almost nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model_serve.fileio import write_if_changed
from model_serve.models import gguf

# 2: `recurrent`; 3: numbers checked, failures remembered; 4: pooling; 5: input embedding
CACHE_VERSION = 5

# Header numbers that feed arithmetic (the footprint estimate walks the layers), with far more
# than any real model has: a file beyond them is refused, the key named, so no estimate can
# run out of memory or for minutes. A trained context beyond its cap only caps less.
LIMITS: dict[str, int] = {
    "block_count": 1 << 12, "embedding_length": 1 << 20, "head_count": 1 << 14,
    "head_count_kv": 1 << 14, "key_length": 1 << 16, "value_length": 1 << 16,
    "split_count": 1 << 16,
}
MAX_CONTEXT = 1 << 30  # context_length and sliding_window are clamped to it

# Architectures whose Ollama-converted blobs embed vision/audio tensors stock llama.cpp rejects.
_EMBEDDED_TOWER_ARCHS = frozenset({
    "gemma3", "gemma4", "mistral3", "qwen35", "qwen35moe", "llama4", "nemotron_h_omni",
    "nemotron_h_moe",
})
# Header keys only models with a recurrent state have (`<arch>.ssm.state_size`, ...).
_RECURRENT_KEY_PARTS = ("ssm", "wkv", "shortconv")
_EMBEDDED_TOWER_PREFIXES = ("v.", "mm.", "a.", "mtp.", "model.vision_tower.")
POOLING_NAMES = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}
# Architecture names only Ollama's converter writes; llama.cpp does not know them.
_OLLAMA_ONLY_ARCHS = frozenset({
    "gptoss", "mllama", "qwen25vl", "glm4moelite", "deepseekocr", "glmocr", "nemotron_h_omni",
    "olmo3",
})


@dataclass
class ModelInfo:
    """Header facts of one GGUF file (the first shard of a split model)."""

    architecture: str = ""
    name: str = ""
    basename: str = ""
    size_label: str = ""
    file_type: str = ""
    general_type: str = ""
    context_length: int = 0
    block_count: int = 0
    embedding_length: int = 0
    head_count: int = 0
    # One value per layer when the file stores a list (hybrid models), else a single value.
    head_count_kv: list[int] = field(default_factory=list)
    key_length: int = 0
    value_length: int = 0
    sliding_window: int = 0
    sliding_window_pattern: list[bool] = field(default_factory=list)
    # A recurrent state (Mamba/RWKV/short-conv layers, alone or in a hybrid): llama-server
    # cannot reuse a restored cache for it.
    recurrent: bool = False
    split_count: int = 0
    has_chat_template: bool = False
    incompatibility: str = ""
    # `<arch>.pooling_type` by llama.cpp's name (none, mean, cls, last, rank); '' when absent.
    pooling: str = ""
    classifier: bool = False  # `<arch>.classifier.output_labels`: a classification head
    tokenizer_pre: str = ""  # `tokenizer.ggml.pre`: which vocabulary (llama-bpe: Llama 3)
    input_embedding_bytes: int = 0  # token_embd.weight: stays local when layers go to RPC

    @property
    def is_projector(self) -> bool:
        return self.general_type in ("mmproj", "projector") or self.architecture == "clip"


def _int(value: Any) -> int:
    if isinstance(value, float):
        return int(value) if math.isfinite(value) else 0
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _counted(header: gguf.GGUFHeader, key: str, value: Any, limit: int) -> int:
    """A count the estimate computes with: 0 when absent, refused when no model has it."""
    number = _int(value)
    if isinstance(value, float) and not math.isfinite(value) or not 0 <= number <= limit:
        raise gguf.GGUFError(f"{header.path}: {key} is {value!r}, which no real model has "
                             f"(0 to {limit})", gguf.CORRUPT_HINT)
    return number


def _context(value: Any) -> int:
    return min(max(_int(value), 0), MAX_CONTEXT)


def _incompatibility(header: gguf.GGUFHeader) -> str:
    """Why stock llama.cpp cannot load this file (an Ollama-format blob), or ''."""
    arch = header.architecture
    if arch in _OLLAMA_ONLY_ARCHS:
        return f"architecture '{arch}' is Ollama's own naming; stock llama.cpp cannot load it"
    if arch in _EMBEDDED_TOWER_ARCHS and any(
        name.startswith(_EMBEDDED_TOWER_PREFIXES) for name in header.tensor_names
    ):
        return ("vision/audio tensors are embedded in the weights (Ollama format); "
                "stock llama.cpp rejects the file")
    meta = header.metadata
    if arch == "gemma3" and ("gemma3.attention.layer_norm_rms_epsilon" not in meta
                             or "gemma3.mm.tokens_per_image" in meta):
        return "Ollama-format gemma3 file (keys llama.cpp needs are missing)"
    if arch == "mistral3" and any(
        k in meta for k in ("mistral3.rope.scaling.beta_fast", "mistral3.rope.scaling_beta")
    ):
        return "Ollama-format mistral3 file"
    if arch in ("qwen3vl", "qwen3vlmoe") and f"{arch}.rope.dimension_sections" not in meta:
        return f"Ollama-format {arch} file (rope.dimension_sections missing)"
    return ""


def _pooling(value: Any) -> str:
    """llama_pooling_type (llama.h) by the name `--pooling` takes; an unknown value is ''."""
    if isinstance(value, int) and not isinstance(value, bool):
        return POOLING_NAMES.get(value, "")
    return ""


def _has_recurrent_state(header: gguf.GGUFHeader) -> bool:
    prefixes = tuple(f"{header.architecture}.{part}." for part in _RECURRENT_KEY_PARTS)
    return any(key.startswith(prefixes) for key in header.metadata)


def info_from_header(header: gguf.GGUFHeader) -> ModelInfo:
    def count(key: str, value: Any = None) -> int:
        value = header.arch_key(key) if value is None else value
        field = key.rsplit(".", 1)[-1]
        return _counted(header, f"{header.architecture}.{key}", value, LIMITS[field])

    kv_heads = header.arch_key("attention.head_count_kv")
    if isinstance(kv_heads, list):
        head_count_kv = [count("attention.head_count_kv", v) for v in kv_heads]
    elif kv_heads is None:
        head_count_kv = [count("attention.head_count")]
    else:
        head_count_kv = [count("attention.head_count_kv", kv_heads)]
    pattern = header.arch_key("attention.sliding_window_pattern")
    return ModelInfo(
        architecture=header.architecture,
        name=str(header.get("general.name", "") or ""),
        basename=str(header.get("general.basename", "") or ""),
        size_label=str(header.get("general.size_label", "") or ""),
        file_type=header.file_type,
        general_type=str(header.get("general.type", "") or ""),
        context_length=_context(header.arch_key("context_length")),
        block_count=count("block_count"),
        embedding_length=count("embedding_length"),
        head_count=count("attention.head_count"),
        head_count_kv=head_count_kv,
        key_length=count("attention.key_length"),
        value_length=count("attention.value_length"),
        sliding_window=_context(header.arch_key("attention.sliding_window")),
        sliding_window_pattern=[bool(v) for v in pattern] if isinstance(pattern, list) else [],
        recurrent=_has_recurrent_state(header),
        split_count=_counted(header, "split.count", header.get("split.count"),
                             LIMITS["split_count"]),
        has_chat_template="tokenizer.chat_template" in header.metadata,
        incompatibility=_incompatibility(header),
        pooling=_pooling(header.arch_key("pooling_type")),
        classifier=header.arch_key("classifier.output_labels") is not None,
        tokenizer_pre=str(header.get("tokenizer.ggml.pre", "") or "")[:100],
        input_embedding_bytes=header.input_embedding_bytes,
    )


def read_model_info(path: Path) -> ModelInfo:
    # Tensor names are only needed to spot embedded towers.
    header = gguf.read_header(path, tensor_names=lambda metadata: metadata.get(
        "general.architecture") in _EMBEDDED_TOWER_ARCHS)
    return info_from_header(header)


def _sane(info: ModelInfo) -> bool:
    """Whether a cached entry holds what info_from_header can give (the cache is a file a
    user or an older version may have written)."""
    for f in dataclasses.fields(ModelInfo):
        value = getattr(info, f.name)
        if f.name == "head_count_kv":
            ok = isinstance(value, list) and all(
                type(v) is int and 0 <= v <= LIMITS["head_count_kv"] for v in value)
        elif f.name in LIMITS:
            ok = type(value) is int and 0 <= value <= LIMITS[f.name]
        elif f.name in ("context_length", "sliding_window"):
            ok = type(value) is int and 0 <= value <= MAX_CONTEXT
        elif f.name == "pooling":  # it becomes an option in an engine config
            ok = value in ("", *POOLING_NAMES.values())
        elif f.name == "sliding_window_pattern":
            ok = isinstance(value, list) and len(value) <= gguf.MAX_DECODED_ARRAY and all(
                type(v) is bool for v in value)
        else:
            ok = isinstance(value, type(f.default))
        if not ok:
            return False
    return True


class InfoCache:
    """ModelInfo per (real path, size, mtime), persisted as JSON under the state dir. A file
    whose header is refused is remembered too, so it costs one read, not one per sync."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        self.used: set[str] = set()
        if path is not None:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if data.get("version") == CACHE_VERSION and isinstance(data.get("entries"), dict):
                    self.entries = data["entries"]
            except (OSError, ValueError, AttributeError, RecursionError):
                self.entries = {}  # a damaged cache is only a slower sync

    def get(self, path: Path, real: str | None = None,
            stat: os.stat_result | None = None) -> ModelInfo:
        """The file's info (or its GGUFError); `real` and `stat` when the caller has them."""
        real = real or os.path.realpath(path)
        stat = stat or os.stat(real)
        key = f"{real}|{stat.st_size}|{stat.st_mtime_ns}"
        self.used.add(key)
        cached = self.entries.get(key)
        if isinstance(cached, dict):
            if isinstance(cached.get("error"), str) and isinstance(cached.get("hint"), str):
                raise gguf.GGUFError(cached["error"], cached["hint"])
            try:
                info = ModelInfo(**cached)
                if _sane(info):
                    return info
            except TypeError:
                pass
        try:
            info = read_model_info(Path(real))
        except gguf.GGUFOpenError:
            raise  # about access, not content: tried again next time
        except gguf.GGUFError as exc:
            self.entries[key] = {"error": exc.message, "hint": exc.hint}
            raise
        self.entries[key] = dict(vars(info))  # flat: lists of ints and bools at most
        return info

    def save(self) -> None:
        if self.path is None:
            return
        kept = {k: v for k, v in self.entries.items() if k in self.used}
        content = json.dumps({"version": CACHE_VERSION, "entries": kept}, sort_keys=True)
        # The cache is an optimisation; a read-only state dir must not fail a sync.
        with contextlib.suppress(OSError):
            write_if_changed(self.path, content)
