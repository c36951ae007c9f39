"""The GGUF header reader on the real gemma-3 file and on vocabularies built to mislead it:
jumping over long string lists must give exactly what walking them gives."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_serve.models import gguf
from model_serve.models.gguf import SkippedArray, read_header
from tests import ollama_store


def walked(path: Path, monkeypatch: pytest.MonkeyPatch, **options) -> gguf.GGUFHeader:
    """The header as the plain walk reads it (no list is long enough to be jumped)."""
    with monkeypatch.context() as patch:
        patch.setattr(gguf, "MIN_JUMPED_STRINGS", 10**12)
        return read_header(path, **options)


def same(a: gguf.GGUFHeader, b: gguf.GGUFHeader) -> None:
    assert a.metadata == b.metadata
    assert list(a.metadata) == list(b.metadata)
    assert a.tensor_names == b.tensor_names and a.tensor_info_offset == b.tensor_info_offset


def test_the_real_gemma_header_reads_the_same(gemma_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    header = read_header(gemma_path, tensor_names=True)
    same(header, walked(gemma_path, monkeypatch, tensor_names=True))
    assert header.metadata["tokenizer.ggml.tokens"] == SkippedArray(8, 262144)
    assert header.file_type == "Q4_K_M"  # general.file_type comes after the vocabulary
    assert header.metadata["general.quantization_version"] == 2
    assert len(header.tensor_names) == header.tensor_count == 236


# Tokens that look like the keys after them, with the lengths a key would have before them.
DECOYS = ["general.file_type", "tokenizer.ggml.scores", "llama.block_count", "general.",
          "tokenizer.", "llama.", "general.name\x05\x00\x00\x00", "tokenizer.ggml.merges"]


@pytest.mark.parametrize("tensors", [[], [("token_embd.weight", (256, 50_000)),
                                          ("blk.0.attn_q.weight", (256, 256))]])
@pytest.mark.parametrize("decoys_at", ["start", "middle", "end"])
def test_decoy_tokens_never_mislead_the_jump(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             tensors: list, decoys_at: str) -> None:
    tokens = [f"tok{i}" for i in range(50_000)]
    where = {"start": 0, "middle": 25_000, "end": 50_000}[decoys_at]
    tokens[where:where] = DECOYS * 3
    merges = [f"a{i} b{i}" for i in range(30_000)] + DECOYS
    path = tmp_path / "decoys.gguf"
    path.write_bytes(ollama_store.gguf_bytes(
        tokens=tokens, tensors=tensors,
        extra={"tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 1,
               "tokenizer.chat_template": "{{ messages }}", "general.quantization_version": 2}))
    header = read_header(path, tensor_names=True)
    same(header, walked(path, monkeypatch, tensor_names=True))
    assert header.metadata["tokenizer.ggml.tokens"] == SkippedArray(8, len(tokens))
    assert header.metadata["tokenizer.ggml.merges"] == SkippedArray(8, len(merges))
    assert header.metadata["llama.block_count"] == 4
    assert header.tensor_names == [name for name, _dims in tensors]


def test_a_vocabulary_as_the_last_key_is_walked(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = [f"tok{i}" for i in range(10_000)] + DECOYS
    path = tmp_path / "last.gguf"
    path.write_bytes(ollama_store.gguf_bytes(
        extra={"tokenizer.ggml.tokens": tokens}, tensors=[("output.weight", (256, 10_008))]))
    header = read_header(path, tensor_names=True)
    same(header, walked(path, monkeypatch, tensor_names=True))
    assert header.tensor_names == ["output.weight"]
