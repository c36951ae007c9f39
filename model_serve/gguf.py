"""A small GGUF header reader: key/values and tensor names, never the weights.

The PyPI `gguf` reader decodes every tokenizer string (15 s on a 253 MB file); this one seeks
past large arrays, so a 70 GB file costs the same as a small one (tens of milliseconds).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from model_serve.errors import ModelServeError

GGUF_MAGIC = b"GGUF"
# Numeric arrays up to this length are decoded (per-layer head counts); longer ones are skipped.
MAX_DECODED_ARRAY = 4096

# value type id -> (struct format, size)
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
_STRING, _ARRAY = 8, 9

# llama_ftype values (llama.h); general.file_type.
FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M",
    30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE",
    39: "NVFP4", 40: "Q1_0", 41: "Q2_0",
}


class GGUFError(ModelServeError):
    """A file that is not a readable GGUF."""


@dataclass
class SkippedArray:
    """An array too large to decode: only its element type and length are kept."""

    elem_type: int
    length: int


@dataclass
class GGUFHeader:
    path: Path
    version: int
    tensor_count: int
    metadata: dict[str, Any]
    tensor_names: list[str] = field(default_factory=list)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str:
        return str(self.get("general.architecture", "") or "")

    def arch_key(self, suffix: str, default: Any = None) -> Any:
        return self.get(f"{self.architecture}.{suffix}", default)

    @property
    def file_type(self) -> str:
        value = self.get("general.file_type")
        if isinstance(value, int):
            return FILE_TYPES.get(value & ~1024, "unknown")  # bit 1024 = "guessed"
        return ""


class _Reader:
    def __init__(self, handle: BinaryIO, path: Path) -> None:
        self.handle = handle
        self.path = path

    def read(self, size: int) -> bytes:
        data = self.handle.read(size)
        if len(data) != size:
            raise GGUFError(f"{self.path}: GGUF header is truncated",
                            "the file is incomplete; download or pull it again")
        return data

    def scalar(self, type_id: int) -> Any:
        fmt, size = _SCALARS[type_id]
        return struct.unpack(fmt, self.read(size))[0]

    def string(self) -> str:
        (length,) = struct.unpack("<Q", self.read(8))
        if length > 1 << 24:
            raise GGUFError(f"{self.path}: implausible string length {length} in GGUF header",
                            "the file is corrupt; download or pull it again")
        return self.read(length).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        (length,) = struct.unpack("<Q", self.read(8))
        self.handle.seek(length, 1)

    def value(self, type_id: int) -> Any:
        if type_id in _SCALARS:
            return self.scalar(type_id)
        if type_id == _STRING:
            return self.string()
        if type_id == _ARRAY:
            elem_type, length = struct.unpack("<IQ", self.read(12))
            return self.array(elem_type, length)
        raise GGUFError(f"{self.path}: unknown GGUF value type {type_id}",
                        "the file is corrupt or from a newer GGUF version")

    def array(self, elem_type: int, length: int) -> Any:
        if elem_type in _SCALARS:
            fmt, size = _SCALARS[elem_type]
            if length <= MAX_DECODED_ARRAY:
                raw = self.read(size * length)
                return list(struct.unpack(f"<{length}{fmt[1]}", raw))
            self.handle.seek(size * length, 1)
            return SkippedArray(elem_type, length)
        if elem_type == _STRING:
            # Token lists: lengths must be walked, but nothing is decoded.
            for _ in range(length):
                self.skip_string()
            return SkippedArray(elem_type, length)
        if elem_type == _ARRAY:
            for _ in range(length):
                inner_type, inner_len = struct.unpack("<IQ", self.read(12))
                self.array(inner_type, inner_len)
            return SkippedArray(elem_type, length)
        raise GGUFError(f"{self.path}: unknown GGUF array type {elem_type}",
                        "the file is corrupt or from a newer GGUF version")


def read_header(path: Path, *, tensor_names: bool = False) -> GGUFHeader:
    """Read a GGUF file's key/values (and optionally its tensor names) without its weights."""
    try:
        handle = open(path, "rb", buffering=1 << 16)  # noqa: SIM115 - closed below
    except OSError as exc:
        raise GGUFError(f"cannot open {path}: {exc.strerror}",
                        "check that the file exists and is readable") from exc
    with handle:
        reader = _Reader(handle, path)
        if handle.read(4) != GGUF_MAGIC:
            raise GGUFError(f"{path} is not a GGUF file (bad magic bytes)",
                            "only GGUF models can be served; convert or re-download it")
        version, tensor_count, kv_count = struct.unpack("<IQQ", reader.read(20))
        if version < 2:
            raise GGUFError(f"{path}: GGUF version {version} is too old",
                            "re-convert the model with a current llama.cpp")
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = reader.string()
            (type_id,) = struct.unpack("<I", reader.read(4))
            metadata[key] = reader.value(type_id)
        names: list[str] = []
        if tensor_names:
            for _ in range(tensor_count):
                names.append(reader.string())
                (n_dims,) = struct.unpack("<I", reader.read(4))
                handle.seek(8 * n_dims + 4 + 8, 1)  # dims, type, offset
    return GGUFHeader(path=path, version=version, tensor_count=tensor_count,
                      metadata=metadata, tensor_names=names)
