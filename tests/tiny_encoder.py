"""A tiny BERT GGUF (about 450 KB) that the real llama-server loads: an embedding model
(mean pooling) or, with a classification head and rank pooling, a reranker. Its weights are
pseudo-random, so its vectors and scores are noise, but computed by the real engine.

Tensor names and shapes are those llama.cpp's BERT loader asks for (src/models/bert.cpp);
the vocabulary is WordPiece as llama.cpp reads it (a word's first piece starts with U+2581).
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

from model_serve.models import tiny_gguf
from model_serve.models.tiny_gguf import gguf_bytes, kv

N_EMBD, N_FF, N_HEAD, N_CTX = 64, 128, 2, 1024
_F32 = 0
_U32, _I32, _F32V, _BOOL, _STR, _ARR = (tiny_gguf._U32, tiny_gguf._I32, tiny_gguf._F32_VALUE,
                                        tiny_gguf._BOOL, tiny_gguf._STRING, tiny_gguf._ARRAY)
POOLING_MEAN, POOLING_RANK = 1, 4


def _vocab() -> tuple[list[str], list[int]]:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    types = [3] * 5
    pieces = "abcdefghijklmnopqrstuvwxyz0123456789.,?!'"
    tokens += ["\u2581" + c for c in pieces] + list(pieces)
    types += [1] * (2 * len(pieces))
    return tokens, types


def encoder_gguf_bytes(reranker: bool = False, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    tokens, types = _vocab()
    name = "model_serve tiny reranker" if reranker else "model_serve tiny embedder"
    metadata = [
        kv("general.architecture", _STR, "bert"),
        kv("general.name", _STR, name),
        kv("general.file_type", _U32, 0),
        kv("bert.context_length", _U32, N_CTX),
        kv("bert.embedding_length", _U32, N_EMBD),
        kv("bert.feed_forward_length", _U32, N_FF),
        kv("bert.block_count", _U32, 1),
        kv("bert.attention.head_count", _U32, N_HEAD),
        kv("bert.attention.layer_norm_epsilon", _F32V, 1e-12),
        kv("bert.attention.causal", _BOOL, False),
        kv("bert.pooling_type", _U32, POOLING_RANK if reranker else POOLING_MEAN),
        kv("tokenizer.ggml.model", _STR, "bert"),
        kv("tokenizer.ggml.tokens", _ARR, (_STR, tokens)),
        kv("tokenizer.ggml.token_type", _ARR, (_I32, types)),
        kv("tokenizer.ggml.token_type_count", _U32, 2),
        kv("tokenizer.ggml.padding_token_id", _U32, 0),
        kv("tokenizer.ggml.unknown_token_id", _U32, 1),
        kv("tokenizer.ggml.bos_token_id", _U32, 2),
        kv("tokenizer.ggml.seperator_token_id", _U32, 3),
        kv("tokenizer.ggml.mask_token_id", _U32, 4),
    ]

    def weights(*dims: int) -> tuple[str, tuple[int, ...], int, bytes]:
        count = 1
        for d in dims:
            count *= d
        return "", dims, _F32, struct.pack(f"<{count}f",
                                           *(rng.gauss(0.0, 0.05) for _ in range(count)))

    def filled(value: float, *dims: int) -> tuple[str, tuple[int, ...], int, bytes]:
        count = 1
        for d in dims:
            count *= d
        return "", dims, _F32, struct.pack(f"<{count}f", *([value] * count))

    shapes = {
        "token_embd.weight": weights(N_EMBD, len(tokens)),
        "token_types.weight": weights(N_EMBD, 2),
        "position_embd.weight": weights(N_EMBD, N_CTX),
        "token_embd_norm.weight": filled(1.0, N_EMBD),
        "token_embd_norm.bias": filled(0.0, N_EMBD),
    }
    for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
        shapes[f"blk.0.{part}.weight"] = weights(N_EMBD, N_EMBD)
        shapes[f"blk.0.{part}.bias"] = filled(0.0, N_EMBD)
    shapes.update({
        "blk.0.attn_output_norm.weight": filled(1.0, N_EMBD),
        "blk.0.attn_output_norm.bias": filled(0.0, N_EMBD),
        "blk.0.ffn_up.weight": weights(N_EMBD, N_FF),
        "blk.0.ffn_up.bias": filled(0.0, N_FF),
        "blk.0.ffn_down.weight": weights(N_FF, N_EMBD),
        "blk.0.ffn_down.bias": filled(0.0, N_EMBD),
        "blk.0.layer_output_norm.weight": filled(1.0, N_EMBD),
        "blk.0.layer_output_norm.bias": filled(0.0, N_EMBD),
    })
    if reranker:
        shapes.update({
            "cls.weight": weights(N_EMBD, N_EMBD),
            "cls.bias": filled(0.0, N_EMBD),
            "cls.output.weight": weights(N_EMBD, 1),
            "cls.output.bias": filled(0.0, 1),
        })
    return gguf_bytes(metadata, [(name, dims, kind, data)
                                 for name, (_, dims, kind, data) in shapes.items()])


def write_encoder_gguf(path: Path, reranker: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoder_gguf_bytes(reranker))
    return path
