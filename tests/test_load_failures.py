"""A model whose header parses but whose load fails (its tensor data cut short) is answered
with the cause, loaded once for a crowd of requests, then refused at once during a backoff,
while a good model beside it keeps answering; on both engines, through the real openai client.
`model stats` and `model list --served` say it fails to load, and why. A model server that ends
while loading without a word (killed, crashed) is remembered the same way."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests

from tests.conftest import Env, llama_servers_under, new_env, repeating, running

GOOD = "ls/gemma-3:gemma-3-270m-q4_k_m"
BAD = "ls/gemma-3:broken-270m"
CAUSE = "data is not within the file bounds"


@pytest.fixture(scope="module", params=["llama-server", "llama-swap"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
          gemma_path: Path) -> Iterator[Env]:
    from tests.test_llama_swap import llama_swap_binary, port_block

    tmp = tmp_path_factory.mktemp(request.param)
    env = new_env(tmp)
    if request.param == "llama-swap":
        env.port = port_block()
        env.update({"ENGINE": "llama-swap", "LLAMA_SWAP_BIN": str(llama_swap_binary(tmp)),
                    "LLAMA_SWAP_PORT": str(env.port)})
    (env.models / gemma_path.name).symlink_to(gemma_path)
    with open(gemma_path, "rb") as whole:  # the header and a part of the first tensor's data
        (env.models / "broken-270m.gguf").write_bytes(whole.read(20 * 2**20))
    with running(env, stop_timeout=90):
        yield env


def loads_of(env: Env, path: Path) -> int:
    """How many times a model server began loading `path` (its own line in the log)."""
    return (env.state / "logs" / "model_serve.log").read_text(errors="replace").count(
        f"loading model '{path}'")


def ask(client: openai.OpenAI, model: str) -> tuple[int, str, float]:
    started = time.monotonic()
    try:
        client.chat.completions.create(model=model, max_tokens=2,
                                       messages=[{"role": "user", "content": "Hi"}])
        status, said = 200, ""
    except openai.APIStatusError as exc:
        status, said = exc.status_code, str(exc)
    return status, said, time.monotonic() - started


def test_a_model_that_fails_to_load_is_remembered(stack: Env) -> None:
    bad_file = stack.models / "broken-270m.gguf"
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", timeout=120)
    assert ask(client, GOOD)[0] == 200

    # A crowd asks for the broken model at once, good requests among them: one load of it,
    # and every one of its requests gets the cause; the good model answers throughout.
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda m: (m, *ask(client, m)), [BAD] * 6 + [GOOD] * 2))
    for model, status, said, _took in answers:
        if model == GOOD:
            assert status == 200, answers
        else:
            assert status == 503, answers
            assert f"model {BAD} failed to load" in said, said
            assert str(bad_file) in said and CAUSE in said and "download it again" in said, said
    assert loads_of(stack, bad_file) == 1, answers

    # Further requests are refused at once, without a load, with Retry-After; the openai
    # client is told not to retry them (it would wait out Retry-After, twice).
    took = []
    for _ in range(5):
        status, said, seconds = ask(client, BAD)
        assert status == 503 and CAUSE in said, said
        took.append(seconds)
    raw = requests.post(f"{stack.base_url}/v1/chat/completions", timeout=30, json={
        "model": BAD, "messages": [{"role": "user", "content": "Hi"}]})
    assert raw.status_code == 503 and raw.json()["error"]["type"] == "model_load_failed"
    assert 1 <= int(raw.headers["Retry-After"]) <= 10 and raw.headers["x-should-retry"] == "false"
    ollama = requests.post(f"{stack.base_url}/api/chat", timeout=30, json={
        "model": BAD, "messages": [{"role": "user", "content": "Hi"}], "stream": False})
    assert ollama.status_code == 503 and CAUSE in ollama.json()["error"], ollama.text
    assert loads_of(stack, bad_file) == 1
    print(f"{stack['ENGINE']}: the broken model's next requests took "
          f"{', '.join(f'{s * 1000:.0f} ms' for s in took)}; the crowd's: "
          f"{', '.join(f'{m[-6:]} {t * 1000:.0f} ms' for m, _s, _w, t in answers)}")

    # Both commands show it failing to load, and why.
    stats = stack.run("stats", check=True).stdout
    assert "failing to load" in stats and CAUSE in stats, stats
    served = json.loads(stack.run("list", "--served", "--json", check=True).stdout)
    [entry] = [m for m in served if m["name"] == BAD]
    assert entry["state"] == "failing to load" and CAUSE in entry["load_failure"], served
    listed = stack.run("list", check=True).stdout
    assert "[failing to load]" in listed and CAUSE in listed, listed

    # `model sync` has it tried again at its next request, even a sync that changes nothing;
    # so does `model unload NAME` (the CLI, which goes to the engine, not through the front).
    stack.run("sync", check=True)
    assert ask(client, BAD)[0] == 503 and loads_of(stack, bad_file) == 2
    assert ask(client, BAD)[0] == 503 and loads_of(stack, bad_file) == 2  # remembered again
    stack.run("unload", BAD, check=True)
    assert ask(client, BAD)[0] == 503 and loads_of(stack, bad_file) == 3
    assert ask(client, BAD)[0] == 503 and loads_of(stack, bad_file) == 3
    stack.run("unload", "--all", check=True)  # every model, the failing ones too
    assert ask(client, BAD)[0] == 503 and loads_of(stack, bad_file) == 4
    assert ask(client, BAD)[0] == 503 and loads_of(stack, bad_file) == 4
    # So does a new file (here cut shorter: it fails again). No sync after it: one would
    # change the config (its conversations' key follows the file) and forget it meanwhile.
    bad_file.write_bytes(bad_file.read_bytes()[: 19 * 2**20])
    status, said, _took = ask(client, BAD)
    assert status == 503 and CAUSE in said and "failed once" in said, said
    assert loads_of(stack, bad_file) == 5
    assert "failing to load" in stack.run("stats", check=True).stdout
    stack.run("restart", check=True, timeout=240)  # a new front tries every model again
    assert "failing to load" not in stack.run("stats", check=True).stdout
    assert ask(client, GOOD)[0] == 200


@contextlib.contextmanager
def killing_model_servers(env: Env) -> Iterator[list[int]]:
    """SIGKILL every model server of `env` as soon as it appears (as the kernel's OOM killer
    ends one mid-load): the pids killed."""
    import psutil

    killed: list[int] = []

    def kill() -> None:
        for pid in llama_servers_under(env.home.parent):
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if "--alias" in psutil.Process(pid).cmdline():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)

    with repeating(kill, 0.01):
        yield killed


def test_a_model_server_that_ends_while_loading_is_remembered(stack: Env) -> None:
    """No "failed to load" line: the model server is killed as it loads. Once may come from
    outside (the OOM killer, a kill): tried again. Twice in a row, the model is refused at
    once, with the engine's own account of the end; not a load (and admission's lock held
    for seconds) per request."""
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", timeout=120)
    assert ask(client, GOOD)[0] == 200
    stack.run("unload", GOOD, check=True)
    with killing_model_servers(stack) as killed:
        first = ask(client.with_options(max_retries=0), GOOD)  # the client's own retry: 2nd
        assert first[0] != 200 and "ended while loading" not in first[1], first
        status, said, _took = ask(client, GOOD)
        assert status == 503 and f"model {GOOD} failed to load" in said, said
        assert "ended while loading" in said and "2 times in a row" in said, said
        for _ in range(3):
            status, said, took = ask(client, GOOD)
            assert status == 503 and "ended while loading" in said and took < 2, (said, took)
        assert 2 <= len(set(killed)) <= 3, killed
    stack.run("unload", GOOD, check=True)  # tried again at its next request
    assert ask(client, GOOD)[0] == 200
