"""A tiny but complete llama-architecture GGUF (about 1 MB), for proving that an engine
computes when no real model is at hand.

Its weights are Q4_0 with every dimension a multiple of 32, so each matrix multiply takes the
same CPU kernels a real quantized model does, the repacked and AMX ones included.
The weights are pseudo-random: the output is noise, but it is computed.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

from model_serve.fileio import write_bytes_atomically

N_EMBD, N_FF, N_HEAD, N_VOCAB, N_CTX = 256, 512, 4, 288, 512
_ALIGN = 32
_F32, _Q4_0 = 0, 2  # ggml tensor types
_U32, _I32, _F32_VALUE, _BOOL, _STRING, _ARRAY = 4, 5, 6, 7, 8, 9  # GGUF value types
_MOSTLY_Q4_0 = 2  # llama_ftype


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str, kind: int, value: object) -> bytes:
    out = _string(key) + struct.pack("<I", kind)
    if kind == _STRING:
        return out + _string(str(value))
    if kind == _ARRAY:
        elem_kind, items = value  # type: ignore[misc]
        out += struct.pack("<IQ", elem_kind, len(items))
        fmt = {_I32: "<i", _F32_VALUE: "<f"}.get(elem_kind)
        return out + b"".join(_string(i) if fmt is None else struct.pack(fmt, i) for i in items)
    return out + struct.pack({_U32: "<I", _F32_VALUE: "<f", _BOOL: "<?"}[kind], value)


def _vocab() -> tuple[list[str], list[int]]:
    """SentencePiece-style: unknown, BOS, EOS, the 256 byte tokens, then plain pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    while len(tokens) < N_VOCAB:
        tokens.append(f"\u2581w{len(tokens)}")
        types.append(1)
    return tokens, types


def _q4_0(rng: random.Random, count: int) -> bytes:
    """`count` weights as Q4_0 blocks: a float16 scale and 32 four-bit values each."""
    scale = struct.pack("<e", 0.01)
    return b"".join(scale + rng.randbytes(16) for _ in range(count // 32))


def tiny_gguf_bytes(seed: int = 0) -> bytes:
    rng = random.Random(seed)
    tokens, types = _vocab()
    metadata = [
        kv("general.architecture", _STRING, "llama"),
        kv("general.name", _STRING, "model_serve engine probe"),
        kv("general.file_type", _U32, _MOSTLY_Q4_0),
        kv("llama.context_length", _U32, N_CTX),
        kv("llama.embedding_length", _U32, N_EMBD),
        kv("llama.block_count", _U32, 1),
        kv("llama.feed_forward_length", _U32, N_FF),
        kv("llama.attention.head_count", _U32, N_HEAD),
        kv("llama.attention.head_count_kv", _U32, N_HEAD),
        kv("llama.rope.dimension_count", _U32, N_EMBD // N_HEAD),
        kv("llama.attention.layer_norm_rms_epsilon", _F32_VALUE, 1e-5),
        kv("tokenizer.ggml.model", _STRING, "llama"),
        kv("tokenizer.ggml.tokens", _ARRAY, (_STRING, tokens)),
        kv("tokenizer.ggml.scores", _ARRAY, (_F32_VALUE, [0.0] * len(tokens))),
        kv("tokenizer.ggml.token_type", _ARRAY, (_I32, types)),
        kv("tokenizer.ggml.unknown_token_id", _U32, 0),
        kv("tokenizer.ggml.bos_token_id", _U32, 1),
        kv("tokenizer.ggml.eos_token_id", _U32, 2),
    ]
    # name, dims (row length first, as ggml's ne), type
    shapes: list[tuple[str, tuple[int, ...], int]] = [
        ("token_embd.weight", (N_EMBD, N_VOCAB), _Q4_0),
        ("blk.0.attn_norm.weight", (N_EMBD,), _F32),
        ("blk.0.attn_q.weight", (N_EMBD, N_EMBD), _Q4_0),
        ("blk.0.attn_k.weight", (N_EMBD, N_EMBD), _Q4_0),
        ("blk.0.attn_v.weight", (N_EMBD, N_EMBD), _Q4_0),
        ("blk.0.attn_output.weight", (N_EMBD, N_EMBD), _Q4_0),
        ("blk.0.ffn_norm.weight", (N_EMBD,), _F32),
        ("blk.0.ffn_gate.weight", (N_EMBD, N_FF), _Q4_0),
        ("blk.0.ffn_up.weight", (N_EMBD, N_FF), _Q4_0),
        ("blk.0.ffn_down.weight", (N_FF, N_EMBD), _Q4_0),
        ("output_norm.weight", (N_EMBD,), _F32),
        ("output.weight", (N_EMBD, N_VOCAB), _Q4_0),
    ]
    tensors = []
    for name, dims, kind in shapes:
        count = 1
        for d in dims:
            count *= d
        data = struct.pack(f"<{count}f", *([1.0] * count)) if kind == _F32 else _q4_0(rng, count)
        tensors.append((name, dims, kind, data))
    return gguf_bytes(metadata, tensors)


def gguf_bytes(metadata: list[bytes], tensors: list[tuple[str, tuple[int, ...], int, bytes]]
               ) -> bytes:
    """A GGUF v3 file: key/values written with `kv`, then tensors as (name, dims with the row
    length first, ggml type, data)."""
    infos, blobs, offset = [], [], 0
    for name, dims, kind, data in tensors:
        data += b"\0" * (-len(data) % _ALIGN)
        infos.append(_string(name) + struct.pack("<I", len(dims))
                     + b"".join(struct.pack("<Q", d) for d in dims)
                     + struct.pack("<IQ", kind, offset))
        blobs.append(data)
        offset += len(data)
    head = (b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
            + b"".join(metadata) + b"".join(infos))
    head += b"\0" * (-len(head) % _ALIGN)
    return head + b"".join(blobs)


def write_tiny_gguf(path: Path) -> Path:
    """Write the tiny model to `path` (once: an existing identical file is kept)."""
    data = tiny_gguf_bytes()
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return path
    except OSError:
        pass
    write_bytes_atomically(path, data)
    return path
