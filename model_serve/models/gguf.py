"""A small GGUF header reader: key/values and tensor names, never the weights.

The PyPI `gguf` reader decodes every tokenizer string (15 s on a 253 MB file); this one seeks
past large arrays, so a 70 GB file costs the same as a small one.

A list of strings (a 262k-token vocabulary, 280k BPE merges) stores no total size: walking its
lengths one by one took 0.18 s per gemma-3 header. So the reader looks for where the next key
starts instead (a C-speed byte search for the key prefixes a GGUF uses), and takes a place
only when everything after it parses: every remaining key and value, then the first tensor's
description. A place inside the list would fail that; then the next one is tried, and when
none holds, the list is walked as before.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from model_serve.errors import ModelServeError

GGUF_MAGIC = b"GGUF"
# Numeric arrays up to this length are decoded (per-layer head counts); longer ones are skipped.
MAX_DECODED_ARRAY = 4096
# String lists longer than this are jumped over (see the module docstring), shorter ones walked.
MIN_JUMPED_STRINGS = 2048
MAX_KEY_LENGTH = 256
GGML_MAX_DIMS = 4
KEY_SEARCH_WINDOW = 1 << 20

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
    tensor_info_offset: int = 0  # where the tensors' descriptions start

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
        self._map: mmap.mmap | None = None
        self.key_prefixes: tuple[bytes, ...] = (b"general.", b"tokenizer.")

    def close(self) -> None:
        if self._map is not None:
            self._map.close()

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

    def key(self) -> str:
        (length,) = struct.unpack("<Q", self.read(8))
        if not 0 < length <= MAX_KEY_LENGTH:
            raise GGUFError(f"{self.path}: implausible key length {length} in GGUF header",
                            "the file is corrupt; download or pull it again")
        raw = self.read(length)
        if not raw.isascii() or not raw.decode().isprintable():
            raise GGUFError(f"{self.path}: a GGUF key is not printable text",
                            "the file is corrupt; download or pull it again")
        return raw.decode()

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

    # --- jumping over long string lists -------------------------------------------------------
    def key_starts(self, data: mmap.mmap, start: int) -> Iterator[int]:
        """Places after `start` where a key could begin: a length, then a known prefix.
        Searched a window at a time, so a prefix that never comes costs one window."""
        window_start = start + 8
        while window_start < len(data):
            window_end = min(window_start + KEY_SEARCH_WINDOW, len(data))
            hits = []
            for prefix in self.key_prefixes:
                at = data.find(prefix, window_start, window_end + len(prefix) - 1)
                while at >= 0:
                    hits.append((at, len(prefix)))
                    at = data.find(prefix, at + 1, window_end + len(prefix) - 1)
            for at, prefix_length in sorted(hits):
                (length,) = struct.unpack_from("<Q", data, at - 8)
                if prefix_length <= length <= MAX_KEY_LENGTH:
                    yield at - 8
            window_start = window_end

    def read_kvs(self, count: int, metadata: dict[str, Any], tensor_count: int,
                 strict: bool = False) -> None:
        for index in range(count):
            key = self.key() if strict else self.string()
            (type_id,) = struct.unpack("<I", self.read(4))
            if type_id == _ARRAY:
                elem_type, length = struct.unpack("<IQ", self.read(12))
                if elem_type == _STRING and length > MIN_JUMPED_STRINGS:
                    metadata[key] = SkippedArray(elem_type, length)
                    if self.jump_strings(count - index - 1, metadata, tensor_count):
                        return
                metadata[key] = self.array(elem_type, length)
            else:
                metadata[key] = self.value(type_id)

    def jump_strings(self, remaining: int, metadata: dict[str, Any], tensor_count: int) -> bool:
        """Past a long string list: parse the rest from the first place where all of it
        parses (into `metadata`); False, with the position unchanged, when none does."""
        start = self.handle.tell()
        if self._map is None:
            try:
                self._map = mmap.mmap(self.handle.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):  # an empty or special file: walk the list
                return False
        for candidate in self.key_starts(self._map, start):
            self.handle.seek(candidate)
            rest: dict[str, Any] = {}
            try:
                self.read_kvs(remaining, rest, tensor_count, strict=True)
                if tensor_count:
                    self.check_first_tensor()
            except (GGUFError, struct.error, KeyError, UnicodeDecodeError):
                continue
            metadata.update(rest)
            return True
        self.handle.seek(start)
        return False

    def check_first_tensor(self) -> None:
        """The first tensor description after the keys: a name, 1-4 dimensions, offset 0."""
        position = self.handle.tell()
        self.key()  # tensor names are short printable text, like keys
        (n_dims,) = struct.unpack("<I", self.read(4))
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            raise GGUFError(f"{self.path}: implausible tensor dimensions", "")
        dims = struct.unpack(f"<{n_dims}Q", self.read(8 * n_dims))
        _type, offset = struct.unpack("<IQ", self.read(12))
        if offset != 0 or not all(0 < d < 1 << 40 for d in dims):
            raise GGUFError(f"{self.path}: implausible first tensor", "")
        self.handle.seek(position)


def read_header(path: Path, *,
                tensor_names: bool | Callable[[dict[str, Any]], bool] = False) -> GGUFHeader:
    """Read a GGUF file's key/values (and, when `tensor_names` is true or says so for the
    key/values, its tensor names) without its weights."""
    try:
        handle = open(path, "rb", buffering=1 << 16)  # noqa: SIM115 - closed below
    except OSError as exc:
        raise GGUFError(f"cannot open {path}: {exc.strerror}",
                        "check that the file exists and is readable") from exc
    with handle:
        reader = _Reader(handle, path)
        try:
            if handle.read(4) != GGUF_MAGIC:
                raise GGUFError(f"{path} is not a GGUF file (bad magic bytes)",
                                "only GGUF models can be served; convert or re-download it")
            version, tensor_count, kv_count = struct.unpack("<IQQ", reader.read(20))
            if version < 2:
                raise GGUFError(f"{path}: GGUF version {version} is too old",
                                "re-convert the model with a current llama.cpp")
            metadata: dict[str, Any] = {}
            if kv_count:  # the architecture comes first; its keys are a prefix to look for
                metadata_first: dict[str, Any] = {}
                reader.read_kvs(1, metadata_first, tensor_count)
                metadata.update(metadata_first)
                arch = metadata.get("general.architecture")
                if isinstance(arch, str) and arch:
                    reader.key_prefixes += (arch.encode() + b".",)
                reader.read_kvs(kv_count - 1, metadata, tensor_count)
            tensor_info_offset = handle.tell()
            names: list[str] = []
            if tensor_names is True or (callable(tensor_names) and tensor_names(metadata)):
                for _ in range(tensor_count):
                    names.append(reader.string())
                    (n_dims,) = struct.unpack("<I", reader.read(4))
                    handle.seek(8 * n_dims + 4 + 8, 1)  # dims, type, offset
        finally:
            reader.close()
    return GGUFHeader(path=path, version=version, tensor_count=tensor_count,
                      metadata=metadata, tensor_names=names,
                      tensor_info_offset=tensor_info_offset)
