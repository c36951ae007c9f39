"""What the stack needs to know about one GGUF file, read from its header and cached.

Headers of big models take tens of milliseconds to walk (tokenizer arrays), so results are
cached by (real path, size, mtime); a sync over hundreds of models then reads almost nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model_serve.fileio import write_if_changed
from model_serve.models import gguf

CACHE_VERSION = 2  # 2: `recurrent`

# Architectures whose Ollama-converted blobs embed vision/audio tensors stock llama.cpp rejects.
_EMBEDDED_TOWER_ARCHS = frozenset({
    "gemma3", "gemma4", "mistral3", "qwen35", "qwen35moe", "llama4", "nemotron_h_omni",
    "nemotron_h_moe",
})
# Header keys only models with a recurrent state have (`<arch>.ssm.state_size`, ...).
_RECURRENT_KEY_PARTS = ("ssm", "wkv", "shortconv")
_EMBEDDED_TOWER_PREFIXES = ("v.", "mm.", "a.", "mtp.", "model.vision_tower.")
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

    @property
    def is_projector(self) -> bool:
        return self.general_type in ("mmproj", "projector") or self.architecture == "clip"


def _int(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


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


def _has_recurrent_state(header: gguf.GGUFHeader) -> bool:
    prefixes = tuple(f"{header.architecture}.{part}." for part in _RECURRENT_KEY_PARTS)
    return any(key.startswith(prefixes) for key in header.metadata)


def info_from_header(header: gguf.GGUFHeader) -> ModelInfo:
    kv_heads = header.arch_key("attention.head_count_kv")
    if isinstance(kv_heads, list):
        head_count_kv = [_int(v) for v in kv_heads]
    elif kv_heads is None:
        head_count_kv = [_int(header.arch_key("attention.head_count"))]
    else:
        head_count_kv = [_int(kv_heads)]
    pattern = header.arch_key("attention.sliding_window_pattern")
    return ModelInfo(
        architecture=header.architecture,
        name=str(header.get("general.name", "") or ""),
        basename=str(header.get("general.basename", "") or ""),
        size_label=str(header.get("general.size_label", "") or ""),
        file_type=header.file_type,
        general_type=str(header.get("general.type", "") or ""),
        context_length=_int(header.arch_key("context_length")),
        block_count=_int(header.arch_key("block_count")),
        embedding_length=_int(header.arch_key("embedding_length")),
        head_count=_int(header.arch_key("attention.head_count")),
        head_count_kv=head_count_kv,
        key_length=_int(header.arch_key("attention.key_length")),
        value_length=_int(header.arch_key("attention.value_length")),
        sliding_window=_int(header.arch_key("attention.sliding_window")),
        sliding_window_pattern=[bool(v) for v in pattern] if isinstance(pattern, list) else [],
        recurrent=_has_recurrent_state(header),
        split_count=_int(header.get("split.count")),
        has_chat_template="tokenizer.chat_template" in header.metadata,
        incompatibility=_incompatibility(header),
    )


def read_model_info(path: Path) -> ModelInfo:
    # Tensor names are only needed to spot embedded towers.
    header = gguf.read_header(path, tensor_names=lambda metadata: metadata.get(
        "general.architecture") in _EMBEDDED_TOWER_ARCHS)
    return info_from_header(header)


class InfoCache:
    """ModelInfo per (real path, size, mtime), persisted as JSON under the state dir."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        self.used: set[str] = set()
        if path is not None:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if data.get("version") == CACHE_VERSION:
                    self.entries = data.get("entries", {})
            except (OSError, ValueError, AttributeError):
                self.entries = {}  # a damaged cache is only a slower sync

    def get(self, path: Path, real: str | None = None,
            stat: os.stat_result | None = None) -> ModelInfo:
        """The file's info; `real` and `stat` when the caller has them already."""
        real = real or os.path.realpath(path)
        stat = stat or os.stat(real)
        key = f"{real}|{stat.st_size}|{stat.st_mtime_ns}"
        self.used.add(key)
        cached = self.entries.get(key)
        if cached is not None:
            try:
                return ModelInfo(**cached)
            except TypeError:
                pass
        info = read_model_info(Path(real))
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
