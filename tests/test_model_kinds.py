"""Embedding and rerank models served right, and a chat template for every model.

An encoder GGUF with a pooling type (a tiny BERT written here, tests/tiny_encoder.py) is served
with --embeddings and its pooling, one with rank pooling and a classification head with
--reranking; the gemma model (no chat template in its GGUF) gets llama.cpp's built-in `gemma`
template instead of ChatML; `embeddings: true` makes a chat model answer both; the others
answer /v1/embeddings with a 400 that says how to enable it. One stack per engine serves the
end-to-end tests (real llama-server, the real llama-swap)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from model_serve.errors import ConfigError
from model_serve.models.model_info import ModelInfo, read_model_info
from tests.conftest import Env, new_env, running
from tests.tiny_encoder import write_encoder_gguf

GEMMA, TWIN = "ls/gemma-3:270m-q4_k_m", "ls/gemma-both"
EMBED, RERANK = "ls/tiny-embed:f32", "ls/tiny-rerank:f32"
CUSTOM = ("models:\n  gemma-both:\n    base_model: gemma-3:270m-q4_k_m\n"
          "    embeddings: true\n")


def place_models(env: Env, gemma_path: Path) -> None:
    (env.models / gemma_path.name).symlink_to(gemma_path)
    write_encoder_gguf(env.models / "tiny-embed.gguf")
    write_encoder_gguf(env.models / "tiny-rerank.gguf", reranker=True)
    (env.home / "custom_models.yaml").write_text(CUSTOM)


def listed(env: Env) -> dict[str, dict]:
    result = env.run("list", "--json", check=True)
    return {m["name"]: m for m in json.loads(result.stdout)}


# --- what the header says ------------------------------------------------------------------
def test_the_kind_is_read_from_the_header(tmp_path: Path) -> None:
    from model_serve.models import kinds

    embed = read_model_info(write_encoder_gguf(tmp_path / "e.gguf"))
    rerank = read_model_info(write_encoder_gguf(tmp_path / "r.gguf", reranker=True))
    assert (embed.pooling, rerank.pooling) == ("mean", "rank")
    assert kinds.kind_of(embed)[0] == kinds.EMBEDDING
    assert kinds.kind_of(rerank)[0] == kinds.RERANK
    assert kinds.kind_of(ModelInfo(architecture="nomic-bert"))[0] == kinds.EMBEDDING
    assert kinds.kind_of(ModelInfo(architecture="qwen3", pooling="last"))[0] == kinds.EMBEDDING
    assert kinds.kind_of(ModelInfo(architecture="qwen3", classifier=True))[0] == kinds.RERANK
    assert kinds.kind_of(ModelInfo(architecture="gemma3"))[0] == kinds.CHAT


def test_a_family_without_a_template_gets_its_built_in() -> None:
    from model_serve.models import kinds
    from model_serve.models.chat_templates import builtin_for, choose

    assert builtin_for(ModelInfo(architecture="gemma3")) == "gemma"
    assert builtin_for(ModelInfo(architecture="llama", tokenizer_pre="llama-bpe")) == "llama3"
    assert builtin_for(ModelInfo(architecture="llama", tokenizer_pre="default")) == ""
    own = choose(ModelInfo(architecture="gemma3", has_chat_template=True), kinds.CHAT,
                 name=None, file=None, jinja=None, sampler={}, where="f:1")
    assert own.options == {} and own.template == "the GGUF's own"
    first = choose(ModelInfo(architecture="gemma3"), kinds.CHAT, name="llama3", file=None,
                   jinja=None, sampler={"chat-template": "chatml"}, where="f:1")
    assert first.options == {} and "sampler_args" in first.reason  # they come first


def test_a_built_in_this_llama_server_lacks(tmp_path: Path) -> None:
    """An older llama-server without the family's built-in keeps ChatML (the model still
    loads); one named in custom_models.yaml is refused with the valid names."""
    from model_serve.engines.llama_server import options_for
    from model_serve.models import kinds
    from model_serve.models.catalog import CatalogModel
    from model_serve.models.chat_templates import choose
    from model_serve.models.plan import ServedModel

    info = ModelInfo(architecture="gemma3")
    model = CatalogModel("ls/g:1b", "g:1b", tmp_path / "g.gguf", 1, info, "file")

    def served(name: str | None) -> ServedModel:
        choice = choose(info, kinds.CHAT, name=name, file=None, jinja=None, sampler={},
                        where="custom_models.yaml:2")
        return ServedModel("ls/g:1b", [], model, 512, "", 0, 1,
                           {"swa-full": "true", **choice.options}, chat_template=choice,
                           custom_line="custom_models.yaml:2")

    old_build = ["chatml", "llama2", "llama3"]
    assert options_for(served(None), old_build) == {"swa-full": "true"}
    assert options_for(served(None), ["gemma", *old_build])["chat-template"] == "gemma"
    with pytest.raises(ConfigError) as refused:
        options_for(served("gemma"), old_build)
    assert "custom_models.yaml:2" in refused.value.message
    assert "chatml, llama2, llama3" in refused.value.hint


@pytest.mark.parametrize(("yaml", "says"), [
    ("chat_template: gema", ["chat_template 'gema'", "did you mean 'gemma'", "llama3",
                             "custom_models.yaml:2"]),
    ("chat_template: gemma\n    chat_template_file: /t.jinja",
     ["chat_template and chat_template_file", "custom_models.yaml:2"]),
    ("chat_template: gemma\n    jinja: true", ["jinja: true", "custom_models.yaml:2"]),
])
def test_a_bad_template_setting_is_refused_with_its_line(env: Env, gemma_path: Path,
                                                         yaml: str, says: list[str]) -> None:
    (env.models / gemma_path.name).symlink_to(gemma_path)
    (env.home / "custom_models.yaml").write_text(f"models:\n  gemma-3:270m-q4_k_m:\n    {yaml}\n")
    result = env.run("sync")
    assert result.returncode != 0
    for text in says:
        assert text in result.stderr + result.stdout, result.stderr


def test_list_and_show_say_the_kind_and_the_template(env: Env, gemma_path: Path) -> None:
    place_models(env, gemma_path)
    models = listed(env)
    assert {n: m["kind"] for n, m in models.items()} == {
        GEMMA: "chat", TWIN: "chat+embeddings", EMBED: "embedding", RERANK: "rerank"}
    assert models[EMBED]["options"]["embeddings"] == "true"
    assert models[EMBED]["options"]["pooling"] == "mean"
    assert models[RERANK]["options"]["reranking"] == "true"
    assert models[TWIN]["options"]["pooling"] == "mean"
    assert models[GEMMA]["options"]["chat-template"] == "gemma"
    assert models[GEMMA]["options"]["jinja"] == "false"
    assert not models[EMBED]["keeps_conversations"]
    table = env.run("list", check=True).stdout
    assert "rerank" in table and "embedding" in table
    shown = env.run("show", GEMMA, check=True).stdout
    assert "chat_template: gemma" in shown
    assert "built-in for architecture gemma3" in shown
    shown = env.run("show", EMBED, check=True).stdout
    assert "kind: embedding" in shown and "pooling type mean" in shown


# --- on the real engines -------------------------------------------------------------------
@pytest.fixture(scope="module", params=["llama-server", "llama-swap"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           gemma_path: Path) -> Iterator[Env]:
    """One stack per engine for every end-to-end test here: gemma, its twin with
    embeddings, the tiny embedder and the tiny reranker."""
    from tests.test_llama_swap import llama_swap_binary, port_block

    root = tmp_path_factory.mktemp(f"kinds-{request.param}")
    env = new_env(root)
    if request.param == "llama-swap":
        env.port = port_block(6)
        env.update({"ENGINE": "llama-swap", "LLAMA_SWAP_BIN": str(llama_swap_binary(root)),
                    "LLAMA_SWAP_PORT": str(env.port)})
    place_models(env, gemma_path)
    with running(env, stop_timeout=90):
        yield env


def post(env: Env, path: str, body: dict) -> requests.Response:
    return requests.post(f"{env.base_url}{path}", json=body, timeout=300)


def test_an_embedding_model_answers_embeddings(served: Env) -> None:
    answer = post(served, "/v1/embeddings", {"model": EMBED, "input": ["hello world", "a b"]})
    assert answer.status_code == 200, answer.text
    vectors = [item["embedding"] for item in answer.json()["data"]]
    assert len(vectors) == 2 and len(vectors[0]) == 64 and vectors[0] != vectors[1]
    # 702 tokens: past llama-server's default batch (512), which refused it with a 500.
    long = post(served, "/v1/embeddings", {"model": EMBED, "input": "ab " * 350})
    assert long.status_code == 200, long.text
    refused = post(served, "/v1/chat/completions",
                   {"model": EMBED, "messages": [{"role": "user", "content": "hi"}]})
    assert refused.status_code == 400
    assert "/v1/embeddings" in refused.json()["error"]["message"]
    ollama = post(served, "/api/embed", {"model": EMBED, "input": ["hello", "cat"]})
    assert ollama.status_code == 200, ollama.text
    assert [len(v) for v in ollama.json()["embeddings"]] == [64, 64]
    capabilities = {name: post(served, "/api/show", {"model": name}).json()["capabilities"]
                    for name in (EMBED, RERANK, GEMMA, TWIN)}
    assert capabilities[EMBED] == ["embedding"] and capabilities[RERANK] == []
    assert "embedding" not in capabilities[GEMMA] and "completion" in capabilities[GEMMA]
    assert {"completion", "embedding"} <= set(capabilities[TWIN])


def test_a_reranker_answers_rerank(served: Env) -> None:
    answer = post(served, "/v1/rerank", {"model": RERANK, "query": "hello",
                                         "documents": ["hello world", "a b", "cat"]})
    assert answer.status_code == 200, answer.text
    assert sorted(r["index"] for r in answer.json()["results"]) == [0, 1, 2]
    refused = post(served, "/v1/embeddings", {"model": RERANK, "input": "x"})
    assert refused.status_code == 400
    assert "/v1/rerank" in refused.json()["error"]["message"]


def test_a_chat_model_says_how_to_serve_embeddings(served: Env) -> None:
    answer = post(served, "/v1/embeddings", {"model": GEMMA, "input": "hello"})
    assert answer.status_code == 400, answer.text
    message = answer.json()["error"]["message"]
    assert "embeddings: true" in message and "custom_models.yaml" in message
    assert EMBED in message  # which model to use instead
    ollama = post(served, "/api/embed", {"model": GEMMA, "input": "hello"})
    assert ollama.status_code == 400, ollama.text
    assert "embeddings: true" in ollama.json()["error"]  # in Ollama's shape


def test_embeddings_true_serves_chat_and_embeddings(served: Env) -> None:
    answer = post(served, "/v1/embeddings", {"model": TWIN, "input": "hello"})
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["data"][0]["embedding"]) == 640  # gemma-3-270m's width
    chat = post(served, "/v1/chat/completions", {
        "model": TWIN, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4})
    assert chat.status_code == 200, chat.text


def test_a_model_without_a_template_chats_in_its_family_format(served: Env) -> None:
    """llama-server's ChatML fallback made the gemma model answer '<|im_end|>\\n<|im_start|>'."""
    chat = post(served, "/v1/chat/completions", {
        "model": GEMMA, "messages": [{"role": "user", "content": "Say hi"}],
        "max_tokens": 30, "temperature": 0, "seed": 1})
    assert chat.status_code == 200, chat.text
    reply = chat.json()["choices"][0]["message"]["content"]
    assert "<|im_start|>" not in reply and "<|im_end|>" not in reply, reply
