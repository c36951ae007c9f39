"""Ollama's API on our port, on both engines (the llama-server router and the real llama-swap),
with the real gemma model and real clients: the `ollama` Python library and the real `ollama`
CLI 0.32.15 (../shared/tools/ollama) with OLLAMA_HOST pointed at the port. One stack per
engine serves every test of this module. The translations are tested on their own first."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from model_serve.config.settings import load_settings
from model_serve.models.ollama import APP_CLI, app_cli, cli_environment, points_at, server_url
from model_serve.runtime import ollama_shapes as shapes
from model_serve.runtime.gate import Access, access_of, control_method_ok
from model_serve.runtime.ollama_shapes import OllamaError, Reply, StreamTranslator
from tests.conftest import REPO, TWIN, Env, engine_port, free_port, running

OLLAMA_CLI = REPO.parent / "shared" / "tools" / "ollama" / "bin" / "ollama"
A, B = "ls/gemma-3:270m-q4_k_m", "ls/g2"
# B answers in a few tokens whatever the client asks (`ollama run` sets no limit, and the
# test model, without a chat template, would go on for minutes).
# B has a Jinja template (llama-server's ChatML fallback), so it takes tools; A has none.
# C serves embeddings (llama-server --embeddings, mean pooling).
TWIN_SHORT = TWIN + ('    sampler_args: "--n-predict 8"\n    jinja: true\n'
                     '  g3:\n    base_model: gemma-3:270m-q4_k_m\n'
                     '    sampler_args: "--embeddings --pooling mean"\n')
C = "ls/g3"


# --- the translations on their own -----------------------------------------------------------
def test_keep_alive_reads_durations_seconds_zero_and_never() -> None:
    assert shapes.parse_keep_alive(None) is None
    assert shapes.parse_keep_alive("5m") == 300
    assert shapes.parse_keep_alive("1h30m") == 5400
    assert shapes.parse_keep_alive("1.5s") == 1.5
    assert shapes.parse_keep_alive(120) == 120
    assert shapes.parse_keep_alive("120") == 120
    assert shapes.parse_keep_alive(0) == 0 and shapes.parse_keep_alive("0s") == 0
    assert shapes.parse_keep_alive(-1) == -1 and shapes.parse_keep_alive("-5m") == -1
    for bad in ("soon", "5 minutes", True, [1], "nan", float("nan")):
        with pytest.raises(OllamaError, match="keep_alive"):
            shapes.parse_keep_alive(bad)
    # Absurd lengths: past Ollama's forever is forever (a date /api/ps can write, a number
    # the unloader can compare); a long one that fits stays as it is.
    for endless in (1e300, float("inf"), "1e300", "inf", "9999999999h"):
        assert shapes.parse_keep_alive(endless) == -1, endless
    assert shapes.parse_keep_alive("999999h") == 999999 * 3600


def test_chat_request_maps_options_format_tools_images_and_think() -> None:
    png = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGBgAAAABQABpfZFQAAAAABJ"
           "RU5ErkJggg==")
    data = {
        "model": "gemma3", "think": False, "format": {"type": "object"},
        "options": {"temperature": 0.1, "top_k": 5, "min_p": 0.2, "seed": 7, "stop": ["x"],
                    "num_predict": 9, "repeat_penalty": 1.2, "num_ctx": 32768},
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {}}}],
        "messages": [
            {"role": "user", "content": "What is here?", "images": [png]},
            {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
            {"role": "tool", "content": "cold", "tool_name": "weather"},
        ]}
    out = shapes.chat_request(data, "ls/gemma-3:270m-q4_k_m")
    body = out.body
    assert out.path == "/v1/chat/completions" and out.stream and body["stream"]
    assert body["model"] == "ls/gemma-3:270m-q4_k_m"
    assert (body["temperature"], body["top_k"], body["min_p"], body["seed"], body["stop"],
            body["max_tokens"], body["repeat_penalty"]) == (0.1, 5, 0.2, 7, ["x"], 9, 1.2)
    assert out.ignored == ["num_ctx"] and "num_ctx" not in body
    assert body["response_format"]["json_schema"]["schema"] == {"type": "object"}
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert body["tools"] == data["tools"]
    user, assistant, tool = body["messages"]
    assert user["content"][0] == {"type": "text", "text": "What is here?"}
    assert user["content"][1]["image_url"]["url"].startswith("data:image/png;base64,iVBOR")
    call = assistant["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo"}
    assert tool["tool_call_id"] == call["id"]
    plain = shapes.chat_request({"messages": [], "stream": False, "format": "json",
                                 "options": {"num_predict": -1}}, "m").body
    assert plain["response_format"] == {"type": "json_object"} and "max_tokens" not in plain
    assert not plain["stream"] and "stream_options" not in plain


def test_generate_request_template_raw_context_and_suffix() -> None:
    chat = shapes.generate_request({"prompt": "Hi", "system": "Be brief"}, "m")
    assert chat.path == "/v1/chat/completions"
    assert [m["role"] for m in chat.body["messages"]] == ["system", "user"]
    raw = shapes.generate_request({"prompt": "Hi", "raw": True, "context": [1, 2],
                                   "options": {"num_predict": 3}, "stream": False}, "m")
    assert raw.path == "/completion" and raw.body["prompt"] == [1, 2, "Hi"]
    assert raw.body["n_predict"] == 3 and raw.body["return_tokens"] and not raw.stream
    fim = shapes.generate_request({"prompt": "def f(", "suffix": "):"}, "m")
    assert fim.path == "/infill" and fim.body["input_suffix"] == "):"
    with pytest.raises(OllamaError, match="context"):
        shapes.generate_request({"prompt": "x", "context": "abc"}, "m")


def test_replies_carry_counts_durations_and_tool_calls_as_objects() -> None:
    reply = Reply("gemma3", chat=True)
    out = reply.from_openai({
        "choices": [{"finish_reason": "tool_calls", "message": {
            "content": "", "reasoning_content": "hmm", "tool_calls": [
                {"id": "c1", "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}}
            ]}}],
        "timings": {"prompt_n": 12, "prompt_ms": 5.5, "predicted_n": 3, "predicted_ms": 20.0}})
    assert out["done"] and out["done_reason"] == "stop" and out["model"] == "gemma3"
    assert out["message"]["thinking"] == "hmm"
    assert out["message"]["tool_calls"] == [
        {"id": "c1", "function": {"index": 0, "name": "weather", "arguments": {"city": "Oslo"}}}]
    assert (out["prompt_eval_count"], out["prompt_eval_duration"], out["eval_count"],
            out["eval_duration"]) == (12, 5_500_000, 3, 20_000_000)
    assert out["total_duration"] >= out["load_duration"] >= 0


def test_stream_translator_turns_events_into_lines() -> None:
    translator = StreamTranslator(Reply("g", chat=False), native=False)
    events = [
        {"choices": [{"delta": {"content": "Hel"}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "c", "function": {
            "name": "f", "arguments": "{\"a\":"}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}}]},
        {"choices": [{"delta": {"content": "lo"}, "finish_reason": "length"}],
         "timings": {"prompt_n": 4, "predicted_n": 2, "prompt_ms": 1, "predicted_ms": 2}},
    ]
    stream = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    lines = []
    for cut in range(0, len(stream), 7):  # events split anywhere between chunks
        lines += translator.feed(stream[cut:cut + 7])
    lines += translator.feed(b"data: [DONE]\n\n") + translator.finish()
    parsed = [json.loads(line) for line in lines]
    assert "".join(p["response"] for p in parsed) == "Hello"
    assert parsed[-2]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert parsed[-1]["done"] and parsed[-1]["done_reason"] == "length"
    assert parsed[-1]["eval_count"] == 2 and not any(p["done"] for p in parsed[:-1])
    errors = StreamTranslator(Reply("g", chat=True), native=False)
    assert json.loads(errors.feed(b'error: {"message": "out of context"}\n')[0]) == \
        {"error": "out of context"}
    assert errors.finish() == []
    cut = StreamTranslator(Reply("g", chat=True), native=False)  # no finish reason: cut short
    cut.feed(b'data: {"choices": [{"delta": {"content": "Hel"}}]}\n\n')
    assert "error" in json.loads(cut.finish()[-1])


def test_digest_is_the_blob_digest_or_a_cheap_stable_hash() -> None:
    blob = "/store/blobs/sha256-" + "ab" * 32
    assert shapes.digest(blob, 1, 2.0) == "ab" * 32
    first = shapes.digest("/m/a.gguf", 10, 3.0)
    assert first == shapes.digest("/m/a.gguf", 10, 3.0) != shapes.digest("/m/a.gguf", 11, 3.0)
    assert len(first) == 64


def test_ollama_host_pointing_at_model_serve_is_seen(env: Env) -> None:
    assert server_url("127.0.0.1:5847") == "http://127.0.0.1:5847"
    assert server_url("http://studio.lan") == "http://studio.lan:11434"
    assert points_at(server_url("localhost:5847"), "127.0.0.1", 5847)
    assert points_at("http://0.0.0.0:5847", "127.0.0.1", 5847)
    assert not points_at("http://127.0.0.1:11434", "127.0.0.1", 5847)
    # In model_serve's .env: the environment's OLLAMA_HOST is Ollama's clients' (test_settings)
    with (env.home / ".env").open("a") as dotenv:
        dotenv.write(f"\nOLLAMA_HOST=localhost:{env.port}\n")
    env["OLLAMA_BIN"] = str(OLLAMA_CLI)
    # The CLI gets the port model_serve reads: alone, it reads `http://host` as port 80.
    env["OLLAMA_HOST"] = "http://127.0.0.1"
    assert cli_environment(load_settings(dict(env)))["OLLAMA_HOST"] == "http://127.0.0.1:11434"
    del env["OLLAMA_HOST"]
    doctor = env.run("doctor")
    assert "points at model_serve itself" in doctor.stdout + doctor.stderr
    pull = env.run("pull", "gemma3")
    assert pull.returncode != 0 and "points at model_serve itself" in pull.stderr


def test_the_cli_inside_ollama_app_is_found_on_macos(tmp_path: Path) -> None:
    """Ollama.app's CLI, where the app keeps it when the user declined its /usr/local/bin link
    (here ~/Applications; /Applications the same way): the real CLI, run from there."""
    assert app_cli(tmp_path, "darwin", roots=()) is None
    bundled = tmp_path / "Applications" / APP_CLI
    bundled.parent.mkdir(parents=True)
    bundled.symlink_to(OLLAMA_CLI)
    assert app_cli(tmp_path, "darwin", roots=()) == bundled
    assert app_cli(tmp_path, "linux", roots=()) is None
    version = subprocess.run([str(bundled), "--version"], capture_output=True, text=True,
                             timeout=30, env={"HOME": str(tmp_path), "OLLAMA_HOST": "127.0.0.1:1"})
    assert shapes.OLLAMA_VERSION in version.stdout + version.stderr


def test_pull_and_delete_are_control_paths() -> None:
    assert access_of("POST", "/api/pull", {}) is Access.CONTROL
    assert access_of("DELETE", "/api/delete", {}) is Access.CONTROL
    assert control_method_ok("DELETE", "/api/delete")
    assert not control_method_ok("GET", "/api/pull")
    assert access_of("POST", "/api/chat", {}) is Access.CLIENT


# --- one stack per engine, real clients -------------------------------------------------------
@pytest.fixture(scope="module", params=["llama-server", "llama-swap"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           gemma_path: Path) -> Iterator[Env]:
    from tests.test_llama_swap import llama_swap_binary, port_block

    root = tmp_path_factory.mktemp(f"ollama-{request.param}")
    env = Env({k: v for k, v in os.environ.items()
               if k not in __import__("model_serve.config.settings",
                                      fromlist=["STACK_VARIABLES"]).STACK_VARIABLES})
    env.home, env.models = root / "home", root / "models"
    env.home.mkdir()
    env.models.mkdir()
    env.port = free_port() if request.param == "llama-server" else port_block()
    (root / "ollama" / "manifests").mkdir(parents=True)
    (root / "ollama" / "blobs").mkdir()
    env.update({"MODEL_SERVE_HOME": str(env.home), "MODELS_DIR": str(env.models),
                "LLAMA_SWAP_PORT": str(env.port), "ENGINE_PORT": str(engine_port()),
                "OLLAMA_MODELS": str(root / "ollama"), "ENGINE": request.param,
                "BRIDGE_SYNC_INTERVAL": "0", "MODEL_THREADS": "1",
                # Nothing answers here: pull and delete say so.
                "OLLAMA_HOST": f"127.0.0.1:{free_port()}"})
    if request.param == "llama-swap":
        env["LLAMA_SWAP_BIN"] = str(llama_swap_binary(root))
    (env.models / gemma_path.name).symlink_to(gemma_path)
    (env.home / "custom_models.yaml").write_text(TWIN_SHORT)
    with running(env, stop_timeout=90):
        yield env


def cli(env: Env, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    home = env.home.parent / "cli-home"
    home.mkdir(exist_ok=True)
    return subprocess.run([str(OLLAMA_CLI), *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL,
                          env={"PATH": os.environ.get("PATH", ""), "HOME": str(home),
                               "OLLAMA_HOST": f"127.0.0.1:{env.port}", "OLLAMA_NO_CLOUD": "1"})


def client(env: Env):  # noqa: ANN201 - the ollama library's own type
    import ollama

    return ollama.Client(host=env.base_url, timeout=180)


def loaded(env: Env) -> set[str]:
    return {m["name"] for m in requests.get(f"{env.base_url}/api/ps", timeout=10)
            .json()["models"]}


def test_version_root_and_ours_before_the_engines(served: Env) -> None:
    version = requests.get(f"{served.base_url}/api/version", timeout=10).json()
    assert version == {"version": shapes.OLLAMA_VERSION}  # not llama-swap's own
    assert [int(p) for p in version["version"].split(".")] >= [0, 5, 0]
    root = requests.get(served.base_url + "/", timeout=10)
    assert root.status_code == 200 and root.text == "Ollama is running"
    assert requests.head(served.base_url + "/", timeout=10).status_code == 200
    assert requests.head(served.base_url + "/api/tags", timeout=10).status_code == 200
    page = requests.get(served.base_url + "/", timeout=10, allow_redirects=False,
                        headers={"Accept": "text/html"})
    assert page.text != "Ollama is running"  # a browser gets the engine's own page
    out = cli(served, "--version")
    assert f"ollama version is {shapes.OLLAMA_VERSION}" in out.stdout
    assert "Warning" not in out.stdout


def test_list_and_show_with_the_library_and_the_cli(served: Env) -> None:
    tags = client(served).list()
    names = {m.model for m in tags.models}
    assert {A, B} <= names
    [gemma] = [m for m in tags.models if m.model == A]
    assert gemma.details.family == "gemma3" and gemma.details.quantization_level
    assert len(gemma.digest) == 64 and gemma.size > 200_000_000
    again = {m.model: m.digest for m in client(served).list().models}
    assert again[A] == gemma.digest  # stable
    listed = cli(served, "list")
    assert listed.returncode == 0 and A in listed.stdout and gemma.digest[:12] in listed.stdout
    shown = client(served).show(A)
    assert shown.modelinfo["general.architecture"] == "gemma3"
    assert shown.modelinfo["gemma3.context_length"] == 32768
    assert "completion" in shown.capabilities
    assert "num_ctx         8192" in shown.parameters  # what it is served with
    text = cli(served, "show", A)
    assert text.returncode == 0 and "gemma3" in text.stdout and "32768" in text.stdout
    by_latest = requests.post(f"{served.base_url}/api/show", json={"name": B + ":latest"},
                              timeout=10)
    assert by_latest.status_code == 200
    missing = requests.post(f"{served.base_url}/api/show", json={"model": "nope"}, timeout=10)
    assert missing.status_code == 404 and "not found" in missing.json()["error"]


def test_chat_streams_and_answers_whole_through_admission(served: Env) -> None:
    lib = client(served)
    parts = list(lib.chat(model=B, messages=[{"role": "user", "content": "Say hi"}],
                          stream=True, options={"num_predict": 5, "temperature": 0,
                                                "num_ctx": 2048}))
    assert parts[-1].done and parts[-1].eval_count and parts[-1].eval_count <= 5
    assert parts[-1].prompt_eval_count and parts[-1].total_duration > parts[-1].eval_duration
    assert all(p.model == B for p in parts) and not any(p.done for p in parts[:-1])
    whole = lib.chat(model=B, messages=[{"role": "user", "content": "Say hi"}], stream=False,
                     options={"num_predict": 5, "temperature": 0})
    assert whole.done and whole.message.role == "assistant" and whole.eval_count <= 5
    # (not compared with the streamed text: a cached prompt may round differently)
    assert isinstance(whole.message.content, str) and whole.eval_count >= 1
    activity = requests.get(f"{served.base_url}/api/model_serve/activity", timeout=10).json()
    assert activity[B]["requests"] >= 2  # counted as any request is
    # Tools, and a history with a call and its result, as Ollama's clients send them: the
    # engine takes the translation (the model may or may not call the tool).
    weather = {"type": "function", "function": {
        "name": "weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}
    history = [{"role": "user", "content": "Weather in Oslo?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
               {"role": "tool", "content": "cold", "tool_name": "weather"}]
    tooled = lib.chat(model=B, messages=history, tools=[weather], stream=False,
                      options={"num_predict": 8})
    assert tooled.done and tooled.message.role == "assistant"
    assert "tools" in lib.show(B).capabilities and "tools" not in lib.show(A).capabilities
    refused = requests.post(f"{served.base_url}/api/chat", timeout=60, json={
        "model": A, "messages": history, "tools": [weather]})
    assert refused.status_code == 400 and "does not support tools" in refused.json()["error"]
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    shaped = lib.chat(model=B, messages=[{"role": "user", "content": "a=3 as JSON"}],
                      format=schema, stream=False, options={"num_predict": 200})
    assert isinstance(json.loads(shaped.message.content)["a"], int)
    pixel = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGBgAAAABQABpfZFQAAAAABJ"
             "RU5ErkJggg==")
    seen = requests.post(f"{served.base_url}/api/chat", timeout=60, json={
        "model": B, "stream": False,
        "messages": [{"role": "user", "content": "What is this?", "images": [pixel]}]})
    # No projector for this model: the engine's refusal, in Ollama's shape.
    assert seen.status_code >= 400 and set(seen.json()) == {"error"}
    assert B in loaded(served)


def test_generate_raw_context_json_format_and_errors(served: Env) -> None:
    lib = client(served)
    out = lib.generate(model=A, prompt="The sky is", raw=True, stream=False,
                       options={"num_predict": 3, "temperature": 0})
    # The context holds the prompt's tokens (BOS, "The", " sky", " is") and the generated.
    assert out.done and out.response and out.context and len(out.context) == 4 + out.eval_count
    more = lib.generate(model=A, prompt=" and", raw=True, context=out.context, stream=False,
                        options={"num_predict": 2, "temperature": 0})
    assert more.context[:len(out.context)] == out.context
    assert len(more.context) == len(out.context) + 1 + more.eval_count
    data = lib.generate(model=A, prompt="Give a JSON object with key a", format="json",
                        stream=False, options={"num_predict": 20, "temperature": 0})
    assert data.response.lstrip().startswith("{")
    bad = requests.post(f"{served.base_url}/api/generate", timeout=10,
                        json={"model": A, "prompt": "x", "keep_alive": "soon"})
    assert bad.status_code == 400 and "keep_alive" in bad.json()["error"]
    unknown = requests.post(f"{served.base_url}/api/chat", timeout=10,
                            json={"model": "nope", "messages": [{"role": "user",
                                                                 "content": "x"}]})
    assert unknown.status_code == 404 and unknown.json() == {"error": "model 'nope' not found"}


def test_keep_alive_ps_expiry_and_the_cli_run_and_stop(served: Env) -> None:
    lib = client(served)
    lib.generate(model=A, prompt="Hi", keep_alive="10m", options={"num_predict": 1})
    [ps] = [m for m in lib.ps().models if m.model == A]
    left = ps.expires_at.timestamp() - time.time()
    assert 500 < left <= 600 and ps.context_length == 8192
    lib.generate(model=A, prompt="", keep_alive=-1)
    [ps] = [m for m in lib.ps().models if m.model == A]
    assert ps.expires_at.year > 2300  # never, as Ollama says it
    # A keep_alive past any date (JSON's 1e300 seconds) is never too: /api/ps still answers.
    endless = requests.post(f"{served.base_url}/api/generate", timeout=60,
                            data=b'{"model": "%s", "prompt": "", "keep_alive": 1e300}'
                            % A.encode())
    assert endless.status_code == 200, endless.text
    [ps] = [m for m in lib.ps().models if m.model == A]
    assert ps.expires_at.year > 2300
    shown = cli(served, "ps")
    assert A in shown.stdout and "Forever" in shown.stdout
    run = cli(served, "run", B, "Say one word")
    assert run.returncode == 0 and run.stdout.strip(), run.stderr
    assert B in loaded(served)
    stopped = cli(served, "stop", B)
    assert stopped.returncode == 0, stopped.stderr
    assert B not in loaded(served) and A in loaded(served)
    missing = cli(served, "stop", "nope")
    assert missing.returncode != 0 and "couldn't find model" in missing.stderr


def test_keep_alive_zero_lets_the_other_requests_finish(served: Env) -> None:
    lib = client(served)
    stream = lib.generate(model=A, prompt="Count from one to fifty", stream=True,
                          options={"num_predict": 48, "temperature": 0})
    first = next(stream)  # the generation is under way
    stopped = lib.generate(model=A, prompt="", keep_alive=0)  # `ollama stop`, meanwhile
    assert stopped.done and stopped.done_reason == "unload"
    rest = list(stream)
    assert not first.done and rest[-1].done and rest[-1].done_reason in ("length", "stop")
    deadline = time.monotonic() + 30
    while A in loaded(served) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert A not in loaded(served)  # unloaded once that request was done


def test_a_short_keep_alive_unloads_the_model_on_time(served: Env) -> None:
    """model_serve keeps the TTL on both engines, so a client's keep_alive is honoured."""
    client(served).generate(model=B, prompt="Hi", keep_alive="1s", options={"num_predict": 1})
    deadline = time.monotonic() + 40  # the unloader looks every 5 s
    while B in loaded(served) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert B not in loaded(served)
    log = (served.state / "logs" / "model_serve.log").read_text()
    assert f"ttl: {B} idle" in log or "ttl: ls/g2 idle" in log


def test_embed_errors_and_pull_without_an_ollama(served: Env) -> None:
    embed = requests.post(f"{served.base_url}/api/embed", json={"model": A, "input": "hi"},
                          timeout=120)
    assert embed.status_code >= 400 and set(embed.json()) == {"error"}
    lib = client(served)
    vectors = lib.embed(model=C, input=["a cat", "a dog"])
    assert len(vectors.embeddings) == 2 and len(vectors.embeddings[0]) == 640
    assert vectors.prompt_eval_count > 0 and vectors.model == C
    legacy = lib.embeddings(model=C, prompt="a cat")
    assert len(legacy.embedding) == 640
    lib.generate(model=C, prompt="", keep_alive=0)  # room for the next tests
    pull = requests.post(f"{served.base_url}/api/pull", json={"model": "tinyllama"},
                         timeout=30)
    assert pull.status_code == 502 and "no Ollama answers" in pull.json()["error"]
    deleted = requests.delete(f"{served.base_url}/api/delete", json={"model": "x"}, timeout=30)
    assert deleted.status_code == 502
    ran = cli(served, "run", "tinyllama", "hi")  # unknown: the CLI pulls, as with Ollama
    assert ran.returncode != 0 and "no Ollama answers" in ran.stderr


def test_a_model_server_ending_mid_stream_is_an_error_line(served: Env) -> None:
    """Killed mid-answer, the model server's stream ends in Ollama's error line (its clients
    raise it), not in a cut connection; the next request loads the model again."""
    import psutil

    from model_serve.config.settings import load_settings
    from model_serve.engines import select_engine

    engine = select_engine(load_settings(dict(served)))
    with requests.post(f"{served.base_url}/api/generate", stream=True, timeout=120, json={
            "model": A, "prompt": "Count from one to five hundred",
            "options": {"num_predict": 2000, "temperature": 0}}) as answer:
        lines = answer.iter_lines()
        assert not json.loads(next(lines))["done"]  # under way
        [port] = [m.port for m in engine.models() if m.name == engine.model_id(A) and m.port]
        [server] = [p for p in psutil.process_iter(["cmdline"]) if "--port" in
                    (p.info["cmdline"] or []) and str(port) in p.info["cmdline"]
                    and "llama-server" in " ".join(p.info["cmdline"][:1])]
        server.kill()
        rest = [json.loads(line) for line in lines if line]
    assert rest and "error" in rest[-1] and not any(r.get("done") for r in rest), rest[-3:]
    again = client(served).generate(model=A, prompt="Hi", options={"num_predict": 1})
    assert again.done


# --- pull and delete through the user's own Ollama (the real 0.32.15 server) ------------------
@contextlib.contextmanager
def real_ollama(root: Path, gguf: Path) -> Iterator[tuple[str, Path]]:
    """The real Ollama server with a private store holding `gemma3-test` (made offline by
    `ollama create` from the test GGUF); yields its URL and store."""
    store, home = root / "ollama-store", root / "ollama-home"
    store.mkdir()
    home.mkdir()
    host = f"127.0.0.1:{free_port()}"
    environ = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "OLLAMA_HOST": host,
               "OLLAMA_MODELS": str(store), "OLLAMA_NO_CLOUD": "1"}
    log = (root / "ollama-serve.log").open("wb")
    server = subprocess.Popen([str(OLLAMA_CLI), "serve"], env=environ, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.ConnectionError):
                requests.get(f"http://{host}/api/version", timeout=2)
                break
            time.sleep(0.2)
        (root / "Modelfile").write_text(f"FROM {gguf}\n")
        subprocess.run([str(OLLAMA_CLI), "create", "gemma3-test", "-f", str(root / "Modelfile")],
                       env=environ, check=True, capture_output=True, timeout=120)
        yield f"http://{host}", store
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def test_delete_and_pull_go_to_the_users_ollama_then_sync(env: Env, gemma_path: Path,
                                                          tmp_path: Path) -> None:
    with real_ollama(tmp_path, gemma_path) as (url, store):
        env.update({"OLLAMA_HOST": url, "OLLAMA_MODELS": str(store)})
        manifest = json.loads((store / "manifests" / "registry.ollama.ai" / "library" /
                               "gemma3-test" / "latest").read_text())
        [layer] = [x for x in manifest["layers"] if x["mediaType"].endswith("image.model")]
        with running(env):
            tags = requests.get(f"{env.base_url}/api/tags", timeout=10).json()["models"]
            [served] = [m for m in tags if "gemma3-test" in m["name"]]
            assert served["digest"] == layer["digest"].removeprefix("sha256:")  # the blob's
            shown = requests.post(f"{env.base_url}/api/show", timeout=10,
                                  json={"model": "gemma3-test:latest"})  # the Ollama name
            assert shown.status_code == 200
            pulled = requests.post(f"{env.base_url}/api/pull", timeout=120,
                                   json={"model": "no-such-model-here"})
            lines = [json.loads(line) for line in pulled.text.splitlines() if line]
            assert any("error" in line for line in lines)  # Ollama's own answer, offline
            gone = requests.delete(f"{env.base_url}/api/delete", timeout=60,
                                   json={"model": "gemma3-test"})
            assert gone.status_code == 200, gone.text
            assert requests.get(f"{url}/api/tags", timeout=10).json()["models"] == []
            tags = requests.get(f"{env.base_url}/api/tags", timeout=10).json()["models"]
            assert not [m for m in tags if "gemma3-test" in m["name"]]  # synced
            again = requests.delete(f"{env.base_url}/api/delete", timeout=60,
                                    json={"model": "gemma3-test"})
            assert again.status_code == 404 and set(again.json()) == {"error"}
