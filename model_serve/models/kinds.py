"""What a model is for (chat, embeddings, reranking), read from its GGUF header the way
llama.cpp reads it, and which endpoints each kind answers.

llama.cpp: `<arch>.pooling_type` is the model's pooling (rank = a reranker); a classification
head (`<arch>.classifier.output_labels`) scores pairs through the rerank endpoint; encoder
architectures (BERT and its kin) compute embeddings only. llama-server answers embeddings only
with `--embeddings` and a pooling other than none, and reranks only with `--reranking`.
"""

from __future__ import annotations

from model_serve.models.model_info import ModelInfo

CHAT, EMBEDDING, RERANK = "chat", "embedding", "rerank"
# llama.cpp's encoder-only architectures (llama-arch.cpp): no text generation.
ENCODER_ARCHS = frozenset({
    "bert", "modern-bert", "nomic-bert", "nomic-bert-moe", "neo-bert", "jina-bert-v2",
    "jina-bert-v3", "eurobert", "gemma-embedding", "llama-embed", "t5encoder",
})
# A chat model serving embeddings too, and an encoder without a pooling in its header.
DEFAULT_POOLING = "mean"

EMBEDDING_PATHS = frozenset({"/v1/embeddings", "/embeddings", "/embedding"})
RERANK_PATHS = frozenset({"/v1/rerank", "/rerank", "/v1/reranking", "/reranking"})
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/chat/completions", "/v1/completions",
                              "/completions", "/completion", "/infill", "/v1/responses",
                              "/v1/messages"})


def kind_of(info: ModelInfo) -> tuple[str, str]:
    """The model's kind and why (for `model show`)."""
    arch = info.architecture
    if info.pooling == "rank":
        return RERANK, f"pooling type rank in its GGUF ({arch}.pooling_type)"
    if info.classifier:
        return RERANK, f"a classification head in its GGUF ({arch}.classifier.output_labels)"
    if info.pooling and info.pooling != "none":
        return EMBEDDING, f"pooling type {info.pooling} in its GGUF ({arch}.pooling_type)"
    if arch in ENCODER_ARCHS:
        return EMBEDDING, f"{arch} is an encoder architecture (embeddings only)"
    return CHAT, "a generative model (no pooling type in its GGUF)"


def described(kind: str) -> str:
    """'an embedding model', 'a reranker', 'a chat model'."""
    return {EMBEDDING: "an embedding model", RERANK: "a reranker"}.get(kind, "a chat model")


def label(kind: str, embeddings: bool, reranking: bool) -> str:
    """The kind as `model list` shows it: what the model answers."""
    if kind == CHAT and embeddings:
        return "chat+embeddings"
    if kind == CHAT and reranking:
        return "chat+rerank"
    return kind


def refusal(path: str, name: str, kind: str, embeddings: bool, reranking: bool,
            embedding_models: list[str], rerank_models: list[str]) -> str | None:
    """Why `name` cannot answer a request on `path` (the message of a 400), or None.
    llama-server's own answer (HTTP 501 "Start it with --embeddings") speaks of a command
    line model_serve writes, so the fix is said in the user's terms instead."""
    if path in EMBEDDING_PATHS and not embeddings:
        if kind == RERANK:
            return (f"'{name}' is a reranker: send its requests to /v1/rerank"
                    + _others("embedding", embedding_models, name))
        return (f"'{name}' does not serve embeddings: set 'embeddings: true' for it in "
                "custom_models.yaml (it then answers both chat and embeddings)"
                + _others("embedding", embedding_models, name))
    if path in RERANK_PATHS and not reranking:
        return (f"'{name}' does not rerank: set 'reranking: true' for it in "
                "custom_models.yaml if it is a reranker" + _others("rerank", rerank_models, name))
    if path in GENERATION_PATHS and kind != CHAT:
        where = "/v1/rerank" if kind == RERANK else "/v1/embeddings"
        return f"'{name}' is {described(kind)} and does not generate text: use {where}"
    return None


def _others(kind: str, names: list[str], name: str) -> str:
    others = [n for n in names if n != name]
    if not others:
        example = " ('model pull nomic-embed-text' gives one)" if kind == "embedding" else ""
        return f"; no {kind} model is installed{example}"
    return f", or use the {kind} model {' or '.join(repr(n) for n in others[:3])}"
