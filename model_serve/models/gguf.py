"""A small GGUF header reader: key/values and tensor names, never the weights.

The PyPI `gguf` reader decodes every tokenizer string (15 s on a 253 MB file); this one seeks
past large arrays, so a 70 GB file costs the same as a small one.

A list of strings (a 262k-token vocabulary, 280k BPE merges) stores no total size: walking its
lengths one by one took 0.18 s per gemma-3 header. So the reader looks for where the next key
starts instead (a C-speed byte search for the key prefixes a GGUF uses), and takes a place
only when everything after it parses: every remaining key and value, then the first tensor's
description. A place inside the list would fail that; then the next one is tried, and when
none holds, the list is walked as before.

Files are input like any other (a hostile one included): every count and length is checked
against the file before it is used, arrays nest at most MAX_ARRAY_DEPTH deep, what is decoded
and walked is totalled and capped, and the places tried when jumping share one budget per
file, so reading stays linear in the file. Every failure is a GGUFError naming the file.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from model_serve.errors import ModelServeError

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # llama.cpp reads these; a byte-swapped (big-endian) file shows as 2^24+
# Numeric arrays up to this length are decoded (per-layer head counts); longer ones are skipped.
MAX_DECODED_ARRAY = 4096
# String lists longer than this are jumped over (see the module docstring), shorter ones walked.
MIN_JUMPED_STRINGS = 2048
MAX_KEY_LENGTH = 256
GGML_MAX_DIMS = 4
KEY_SEARCH_WINDOW = 1 << 20
# Caps for hostile files, far above any real model's header (gemma-3: 262k tokens, 236 tensors).
MAX_STRING = 1 << 24  # one decoded string (chat templates are tens of KB)
MAX_DECODED_BYTES = 64 << 20  # all decoded strings and numbers together
MAX_HEADER_ITEMS = 1 << 22  # keys, strings walked, nested arrays and tensors together
MAX_ARRAY_DEPTH = 4  # an array of arrays of ...: real files nest one deep at most
# Work all jumps of one file may do (candidates tried, what each parses, 4 KiB searched = 1);
# past it, lists are walked. A real header spends a few thousand.
JUMP_BUDGET = 1 << 16
MAX_JUMP_SPAN = 64 << 20  # how far past a list's smallest possible end its next key is looked for
MAX_JUMP_NESTING = 4  # a jump tried while trying one (tokens, then merges): deeper lists are walked
_MIN_KV_BYTES = 13  # key length (8), type (4), the smallest value (1)
INPUT_EMBEDDING = b"token_embd.weight"
_MIN_TENSOR_BYTES = 24  # name length (8), dimension count (4), type (4), offset (8)

# value type id -> (struct format, size)
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
_STRING, _ARRAY = 8, 9
CORRUPT_HINT = "download or pull it again, or move it out of MODELS_DIR"

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


class GGUFOpenError(GGUFError):
    """The file could not be opened (or is no regular file): nothing about its content."""


class _OutOfJumps(GGUFError):
    """The file's jump budget is spent: its lists are walked from here on."""


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
    # Bytes of `token_embd.weight` (0 when the file has none): the input layer, which
    # llama.cpp keeps on the CPU even when every layer is offloaded (RPC workers, a GPU).
    input_embedding_bytes: int = 0

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
    def __init__(self, handle: BinaryIO, path: Path, size: int) -> None:
        self.handle = handle
        self.path = path
        self.size = size
        self._map: mmap.mmap | None = None
        self.key_prefixes: tuple[bytes, ...] = (b"general.", b"tokenizer.")
        self.items = 0  # against MAX_HEADER_ITEMS
        self.decoded = 0  # bytes, against MAX_DECODED_BYTES
        self.jump_spent = 0  # against JUMP_BUDGET
        self.trying = 0  # jump attempts under way (nested when a list follows a list)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()

    def corrupt(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what}", CORRUPT_HINT)

    def truncated(self) -> GGUFError:
        return GGUFError(f"{self.path}: GGUF header is truncated",
                         "the file is incomplete; download or pull it again")

    # --- accounting ---------------------------------------------------------------------------
    def tick(self, count: int = 1) -> None:
        """`count` more items walked (inside a jump attempt, also spent from its budget)."""
        self.items += count
        if self.items > MAX_HEADER_ITEMS:
            raise self.corrupt(f"the GGUF header holds more than {MAX_HEADER_ITEMS} entries")
        if self.trying:
            self.spend(count)

    def spend(self, count: int) -> None:
        self.jump_spent += count
        if self.jump_spent > JUMP_BUDGET:
            raise _OutOfJumps(f"{self.path}: jump budget spent")

    def decode(self, count: int) -> None:
        self.decoded += count
        if self.decoded > MAX_DECODED_BYTES:
            raise self.corrupt(f"the GGUF header holds more than {MAX_DECODED_BYTES >> 20} MiB "
                               "of text and numbers")

    def need(self, count: int, what: str) -> None:
        """The next `count` bytes must be in the file (a count read from it, times a size)."""
        if count > self.size - self.handle.tell():
            raise self.corrupt(f"{what} would run past the end of the file")

    # --- reading ------------------------------------------------------------------------------
    def read(self, size: int) -> bytes:
        if size > 1 << 16 and size > self.size - self.handle.tell():
            raise self.truncated()  # before allocating it
        data = self.handle.read(size)
        if len(data) != size:
            raise self.truncated()
        return data

    def skip(self, size: int) -> None:
        if size > self.size or self.handle.seek(size, 1) > self.size:
            raise self.truncated()

    def scalar(self, type_id: int) -> Any:
        fmt, size = _SCALARS[type_id]
        return struct.unpack(fmt, self.read(size))[0]

    def string(self) -> str:
        (length,) = struct.unpack("<Q", self.read(8))
        if length > MAX_STRING:
            raise self.corrupt(f"implausible string length {length} in GGUF header")
        self.decode(length)
        return self.read(length).decode("utf-8", errors="replace")

    def key(self) -> str:
        (length,) = struct.unpack("<Q", self.read(8))
        if not 0 < length <= MAX_KEY_LENGTH:
            raise self.corrupt(f"implausible key length {length} in GGUF header")
        raw = self.read(length)
        if not raw.isascii() or not raw.decode().isprintable():
            raise self.corrupt("a GGUF key is not printable text")
        return raw.decode()

    def skip_string(self) -> None:
        (length,) = struct.unpack("<Q", self.read(8))
        self.skip(length)

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

    def array(self, elem_type: int, length: int, depth: int = 1) -> Any:
        if depth > MAX_ARRAY_DEPTH:
            raise self.corrupt(f"GGUF arrays nested more than {MAX_ARRAY_DEPTH} deep")
        if elem_type in _SCALARS:
            fmt, size = _SCALARS[elem_type]
            self.need(size * length, f"an array of {length} numbers")
            if length <= MAX_DECODED_ARRAY:
                self.decode(size * length)
                raw = self.read(size * length)
                return list(struct.unpack(f"<{length}{fmt[1]}", raw))
            self.skip(size * length)
            return SkippedArray(elem_type, length)
        if elem_type == _STRING:
            # Token lists: lengths must be walked, but nothing is decoded.
            self.need(8 * length, f"a list of {length} strings")
            self.tick(length)
            for _ in range(length):
                self.skip_string()
            return SkippedArray(elem_type, length)
        if elem_type == _ARRAY:
            self.need(12 * length, f"an array of {length} arrays")
            self.tick(length)
            for _ in range(length):
                inner_type, inner_len = struct.unpack("<IQ", self.read(12))
                self.array(inner_type, inner_len, depth + 1)
            return SkippedArray(elem_type, length)
        raise GGUFError(f"{self.path}: unknown GGUF array type {elem_type}",
                        "the file is corrupt or from a newer GGUF version")

    # --- jumping over long string lists -------------------------------------------------------
    def key_starts(self, data: mmap.mmap, lowest: int) -> Iterator[int]:
        """Places from `lowest` on where a key could begin: a length, then a known prefix.
        Searched a window at a time, so a prefix that never comes costs one window; the
        search and every place found are spent from the jump budget."""
        window_start = lowest + 8
        end = min(len(data), window_start + MAX_JUMP_SPAN)
        while window_start < end:
            window_end = min(window_start + KEY_SEARCH_WINDOW, end)
            self.spend(1 + ((window_end - window_start) >> 12))
            hits = []
            for prefix in self.key_prefixes:
                at = data.find(prefix, window_start, window_end + len(prefix) - 1)
                while at >= 0:
                    hits.append((at, len(prefix)))
                    at = data.find(prefix, at + 1, window_end + len(prefix) - 1)
            for at, prefix_length in sorted(hits):
                (length,) = struct.unpack_from("<Q", data, at - 8)
                if prefix_length <= length <= MAX_KEY_LENGTH:
                    self.spend(1)
                    yield at - 8
            window_start = window_end

    def read_kvs(self, count: int, metadata: dict[str, Any], tensor_count: int,
                 strict: bool = False) -> None:
        for index in range(count):
            self.tick()
            key = self.key() if strict else self.string()
            (type_id,) = struct.unpack("<I", self.read(4))
            if type_id == _ARRAY:
                elem_type, length = struct.unpack("<IQ", self.read(12))
                if elem_type == _STRING and length > MIN_JUMPED_STRINGS:
                    self.need(8 * length, f"a list of {length} strings")
                    metadata[key] = SkippedArray(elem_type, length)
                    if self.jump_strings(count - index - 1, metadata, tensor_count, length):
                        return
                metadata[key] = self.array(elem_type, length)
            else:
                metadata[key] = self.value(type_id)

    def jump_strings(self, remaining: int, metadata: dict[str, Any], tensor_count: int,
                     length: int) -> bool:
        """Past a list of `length` strings: parse the rest from the first place where all of
        it parses (into `metadata`); False, with the position unchanged, when none does."""
        start = self.handle.tell()
        if self.jump_spent >= JUMP_BUDGET or self.trying >= MAX_JUMP_NESTING:
            return False
        if self._map is None:
            try:
                self._map = mmap.mmap(self.handle.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):  # an empty file: walk the list
                return False
        try:
            for candidate in self.key_starts(self._map, start + 8 * length):
                self.handle.seek(candidate)
                rest: dict[str, Any] = {}
                self.trying += 1
                try:
                    self.read_kvs(remaining, rest, tensor_count, strict=True)
                    if tensor_count:
                        self.check_first_tensor()
                except _OutOfJumps:
                    raise
                except (GGUFError, struct.error, KeyError, UnicodeDecodeError):
                    continue
                finally:
                    self.trying -= 1
                metadata.update(rest)
                return True
        except _OutOfJumps:
            if self.trying:  # inside an outer attempt: that one fails too
                raise
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

    def tensor_infos(self, count: int, keep_names: bool) -> tuple[list[str], int]:
        """Walk the tensors' descriptions (name, dimensions, type, offset): a file cut short
        within them is found here. Their names when `keep_names`, and the size of the input
        embedding: the distance from its data offset to the next one's (or to the end), so
        no table of quantization block sizes is needed."""
        self.need(count * _MIN_TENSOR_BYTES, f"a tensor count of {count}")
        self.tick(count)
        names: list[str] = []
        offsets: list[int] = []
        embedding = -1
        for _ in range(count):
            (length,) = struct.unpack("<Q", self.read(8))
            if length > MAX_STRING:
                raise self.corrupt(f"implausible tensor name length {length} in GGUF header")
            if keep_names or length == len(INPUT_EMBEDDING):
                raw = self.read(length)
                if raw == INPUT_EMBEDDING:
                    embedding = len(offsets)
                if keep_names:
                    self.decode(length)
                    names.append(raw.decode("utf-8", errors="replace"))
            else:
                self.skip(length)
            (n_dims,) = struct.unpack("<I", self.read(4))
            if n_dims > GGML_MAX_DIMS:
                raise self.corrupt(f"a tensor with {n_dims} dimensions (at most "
                                   f"{GGML_MAX_DIMS})")
            self.read(8 * n_dims + 4)  # dims, type
            offsets.append(struct.unpack("<Q", self.read(8))[0])
        return names, self._tensor_bytes(offsets, embedding)

    def _tensor_bytes(self, offsets: list[int], index: int) -> int:
        """Bytes of the tensor at `index` of `offsets` (0 when none, or implausible)."""
        if index < 0:
            return 0
        start = offsets[index]
        later = [o for o in offsets if o > start]
        data_start = self.handle.tell()  # the data follows, aligned: up to 32 bytes later
        end = min(later) if later else self.size - data_start
        return end - start if 0 < end - start <= self.size else 0


def file_kind(mode: int) -> str:
    """What a file that is no regular file is, for a message."""
    return ("a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a special file")


def open_regular(path: Path) -> BinaryIO:
    """`path` opened for reading, when it is a regular file (a link to one included).

    A FIFO would block the open and every read; a device or socket is no model either. So
    its kind is checked first, and the open itself cannot block (O_NONBLOCK), in case the
    path was swapped in between; the kind is checked again on what was opened."""
    def refuse(mode: int) -> GGUFOpenError:
        return GGUFOpenError(f"{path} is not a regular file ({file_kind(mode)})",
                         "only GGUF files can be served; remove it from MODELS_DIR")

    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise refuse(mode)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise GGUFOpenError(f"cannot open {path}: {exc.strerror}",
                        "check that the file exists and is readable") from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise refuse(mode)
    return os.fdopen(fd, "rb", buffering=1 << 16)


def read_header(path: Path, *,
                tensor_names: bool | Callable[[dict[str, Any]], bool] = False) -> GGUFHeader:
    """Read a GGUF file's key/values (and, when `tensor_names` is true or says so for the
    key/values, its tensor names) without its weights."""
    with open_regular(path) as handle:
        reader = _Reader(handle, path, os.fstat(handle.fileno()).st_size)
        try:
            if handle.read(4) != GGUF_MAGIC:
                raise GGUFError(f"{path} is not a GGUF file (bad magic bytes)",
                                "only GGUF models can be served; convert or re-download it")
            version, tensor_count, kv_count = struct.unpack("<IQQ", reader.read(20))
            if version < 2:
                raise GGUFError(f"{path}: GGUF version {version} is too old",
                                "re-convert the model with a current llama.cpp")
            if version not in GGUF_VERSIONS:
                raise GGUFError(f"{path}: GGUF version {version} is not one llama.cpp reads "
                                "(a newer format, or big-endian)",
                                "convert the model with a current llama.cpp (little-endian)")
            reader.need(kv_count * _MIN_KV_BYTES + tensor_count * _MIN_TENSOR_BYTES,
                        f"a count of {kv_count} keys and {tensor_count} tensors")
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
            keep = tensor_names is True or (callable(tensor_names) and tensor_names(metadata))
            names, embedding_bytes = reader.tensor_infos(tensor_count, keep)
        except (struct.error, OverflowError, ValueError) as exc:  # a bug's net: still this file
            raise reader.corrupt(f"unreadable GGUF header ({exc})") from exc
        finally:
            reader.close()
    return GGUFHeader(path=path, version=version, tensor_count=tensor_count,
                      metadata=metadata, tensor_names=names,
                      tensor_info_offset=tensor_info_offset,
                      input_embedding_bytes=embedding_bytes)
