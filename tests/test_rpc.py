"""One model across machines: `rpc:` in custom_models.yaml gives the model llama-server's --rpc
on both engines; every mistake in it is named with the file, line, model and fix."""

from __future__ import annotations

import contextlib
import json
import shlex
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from openai import OpenAI

from tests import ollama_store
from tests.conftest import Env, free_port, new_env, running

WORKERS = ["127.0.0.1:50052", "worker-2.lan:50053"]


def _one_model(env: Env) -> None:
    (env.models / "alpha.gguf").write_bytes(ollama_store.gguf_bytes(
        size_label="1B", extra={"general.basename": "alpha"}))


def _write(env: Env, text: str) -> None:
    (env.home / "custom_models.yaml").write_text(text)


def test_workers_reach_both_engines_and_model_show(engine_env: Env) -> None:
    env = engine_env
    _one_model(env)
    _write(env, "models:\n  alpha:1b-q4_k_m:\n    rpc: [127.0.0.1:50052, Worker-2.lan:50053]\n")
    assert env.run("sync", "--no-bridge").returncode == 0
    if env["ENGINE"] == "llama-server":
        ini = (env.state / "models.ini").read_text()
        section = ini.split("[ls/alpha-1b-q4_k_m]")[1].split("\n\n")[0]
        assert f"rpc = {','.join(WORKERS)}" in section.splitlines()
    else:
        config = yaml.safe_load((env.state / "config.yaml").read_text())
        argv = shlex.split(config["models"]["ls/alpha:1b-q4_k_m"]["cmd"])
        assert argv[argv.index("--rpc") + 1] == ",".join(WORKERS)
    name = "ls/alpha:1b-q4_k_m"
    assert json.loads(env.run("show", name, "--json").stdout)["workers"] == WORKERS
    assert f"workers: {', '.join(WORKERS)}" in env.run("show", name).stdout


@pytest.mark.parametrize("rpc,expected,hint", [
    ("'127.0.0.1:50052,127.0.0.1:50053'", "a comma or space inside one worker",
     "one list item each"),
    ("['127.0.0.1 :50052']", "a comma or space inside one worker", "host:port"),
    ("[127.0.0.1]", "'127.0.0.1', which is not host:port", "e.g. rpc: [192.168.1.20:50052"),
    ("['[::1]:50052']", "(an IPv6 address cannot be given: use a host name)", "host:port"),
    ("[a.lan:70000]", "the port of 'a.lan:70000' is not between 1 and 65535",
     "model worker status"),
    ("[a.lan:0]", "is not between 1 and 65535", "the port the worker listens on"),
    ("[a.lan:1, A.lan:1]", "lists a.lan:1 twice", "list each worker once"),
    ("[]", "rpc of model 'alpha:1b-q4_k_m' is an empty list", "remove rpc"),
    ("[50052]", "holds 50052, not host:port", "host:port"),
    ("[[a.lan:1]]", "'rpc' must be a single value", "workers ('model worker start')"),
])
def test_bad_workers_are_named_and_the_old_config_stays(env: Env, rpc: str, expected: str,
                                                        hint: str) -> None:
    _one_model(env)
    assert env.run("sync", "--no-bridge").returncode == 0
    good = (env.state / "models.ini").read_text()
    _write(env, f"models:\n  alpha:1b-q4_k_m:\n    ttl: 5\n    rpc: {rpc}\n")
    result = env.run("sync", "--no-bridge")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "custom_models.yaml:4: " in result.stderr
    assert expected in result.stderr and hint in result.stderr
    assert (env.state / "models.ini").read_text() == good


@pytest.mark.parametrize("extra,expected,hint", [
    ("    cmd: 'llama-server -m ${MODEL_PATH} --port ${PORT}'\n",
     "model 'alpha:1b-q4_k_m' has both rpc and cmd", "put --rpc HOST:PORT,... in cmd"),
    ("    sampler_args: '--rpc 127.0.0.1:1'\n", "sampler_args of ls/alpha:1b-q4_k_m sets --rpc",
     "rpc: [host:port, ...]"),
])
def test_rpc_has_one_place(env: Env, extra: str, expected: str, hint: str) -> None:
    # The workers must be known to admission and 'model show', so only rpc: names them.
    _one_model(env)
    _write(env, "models:\n  alpha:1b-q4_k_m:\n    rpc: [a.lan:1]\n" + extra)
    result = env.run("sync", "--no-bridge")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "custom_models.yaml:2: " in result.stderr
    assert expected in result.stderr and hint in result.stderr


# --- real: two ggml-rpc-servers on this machine, the model served over them through our port


@contextlib.contextmanager
def rpc_workers(home: Env, count: int) -> Iterator[list[str]]:
    """`count` real RPC workers on loopback, started by `model worker start` in a home of their
    own (as on a worker machine), stopped afterwards."""
    workers = []
    try:
        for _ in range(count):
            port = free_port()
            home.run("worker", "start", "--port", str(port), "--threads", "1")
            workers.append(f"127.0.0.1:{port}")
        yield workers
    finally:
        home.run("worker", "stop", check=False)


@pytest.fixture(scope="module")
def rpc_stack(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path) -> Iterator[Env]:
    """The real gemma four ways: over two workers, alone with --no-repack, over a worker that
    is not there, and over the second worker of the first."""
    env = new_env(tmp_path_factory.mktemp("rpc"))
    env.update({"DEFAULT_CTX_SIZE": "2048", "KV_CACHE": "off", "DEFAULT_PARALLEL": "1"})
    (env.models / gemma_path.name).symlink_to(gemma_path)
    with rpc_workers(new_env(tmp_path_factory.mktemp("rpc-workers")), 2) as workers:
        (env.home / "custom_models.yaml").write_text(
            "models:\n"
            f"  g-rpc:\n    base_model: {GEMMA}\n    rpc: [{', '.join(workers)}]\n"
            f"  g-alone:\n    base_model: {GEMMA}\n    sampler_args: --no-repack\n"
            f"  g-dead:\n    base_model: {GEMMA}\n    rpc: [127.0.0.1:{free_port()}]\n"
            f"  g-shares:\n    base_model: {GEMMA}\n    rpc: [{workers[1]}]\n")
        with running(env):
            yield env


GEMMA = "gemma-3:270m-q4_k_m"
PROMPT = "The history of Greece"
N_TOKENS = 16


def test_over_two_workers_the_first_tokens_are_the_model_alone(rpc_stack: Env) -> None:
    # Exact against --no-repack: the workers run the plain CPU kernels, which the model alone
    # replaces with repacked ones by default; against those the tokens may differ.
    env = rpc_stack
    client = OpenAI(base_url=f"{env.base_url}/v1", api_key="none", max_retries=0)
    texts = {}
    for name in ("ls/g-alone", "ls/g-rpc"):
        reply = client.completions.create(model=name, prompt=PROMPT, max_tokens=N_TOKENS,
                                          temperature=0)
        assert reply.usage.completion_tokens == N_TOKENS
        texts[name] = reply.choices[0].text
    assert texts["ls/g-rpc"] == texts["ls/g-alone"] and texts["ls/g-rpc"].strip()

    stats = json.loads(env.run("stats", "--json").stdout)
    rows = {m["name"]: m for m in stats["models"]}
    over = rows["ls/g-rpc"]
    assert over["workers"] == list(_workers(env)) and rows["ls/g-alone"]["workers"] == []
    # The workers hold the layers and the KV cache: this machine keeps the token embeddings
    # (170 MiB) and its buffers, and the estimate admission counts is that share.
    assert over["rss_bytes"] < rows["ls/g-alone"]["rss_bytes"] - 64 * 2**20
    assert abs(over["estimate_bytes"] - over["rss_bytes"]) < 0.2 * over["rss_bytes"]
    assert over["estimate_bytes"] < rows["ls/g-alone"]["estimate_bytes"]
    text = env.run("stats").stdout
    assert f"ls/g-rpc: served over RPC, its layers on {', '.join(_workers(env))}" in text


def _workers(env: Env) -> list[str]:
    return json.loads(env.run("show", "ls/g-rpc", "--json").stdout)["workers"]


def test_a_worker_that_is_not_there_is_named_at_once(rpc_stack: Env) -> None:
    env = rpc_stack
    dead = json.loads(env.run("show", "ls/g-dead", "--json").stdout)["workers"][0]
    started = time.monotonic()
    reply = requests.post(f"{env.base_url}/v1/chat/completions", timeout=30, json={
        "model": "ls/g-dead", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4})
    assert time.monotonic() - started < 10
    assert reply.status_code == 503, reply.text
    assert reply.headers["x-should-retry"] == "false"
    error = reply.json()["error"]
    assert error["type"] == "rpc_worker_unreachable"
    assert f"{dead} (connection refused)" in error["message"]
    assert "Run 'model worker status' on 127.0.0.1" in error["message"]
    rows = json.loads(env.run("stats", "--json").stdout)["models"]
    states = {m["name"]: m["state"] for m in rows}
    assert states["ls/g-dead"] == "unloaded"  # no model server was started for it
    doctor = env.run("doctor", check=False)
    assert f"{dead}: connection refused" in doctor.stdout, doctor.stdout
    assert "run 'model worker status' on 127.0.0.1" in doctor.stdout


def test_a_worker_another_model_holds_is_named_at_once(rpc_stack: Env) -> None:
    # ggml-rpc-server serves one client at a time: a second model server on it would wait,
    # silent, until the first ended (llama-server sat in its option parsing here).
    env = rpc_stack
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    url = f"{env.base_url}/v1/chat/completions"
    assert requests.post(url, json={"model": "ls/g-rpc", **chat}, timeout=60).status_code == 200
    started = time.monotonic()
    reply = requests.post(url, json={"model": "ls/g-shares", **chat}, timeout=60)
    assert time.monotonic() - started < 15
    assert reply.status_code == 503, reply.text
    message = reply.json()["error"]["message"]
    shared = json.loads(env.run("show", "ls/g-shares", "--json").stdout)["workers"][0]
    assert f"{shared} (another model server is using it (a worker serves one at a time" in message
    # The first model goes on being served over it.
    assert requests.post(url, json={"model": "ls/g-rpc", **chat}, timeout=60).status_code == 200


def test_the_input_embedding_is_measured_from_the_header(gemma_path: Path) -> None:
    # What llama-server keeps on the CPU with every layer on workers: its log said
    # "CPU_Mapped model buffer size = 170.00 MiB" for this file.
    from model_serve.models.model_info import read_model_info

    assert read_model_info(gemma_path).input_embedding_bytes == 170 * 2**20


def test_the_local_share_with_and_without_a_gpu(gemma_path: Path) -> None:
    import dataclasses

    from model_serve.models import footprint
    from model_serve.models.model_info import read_model_info

    info = read_model_info(gemma_path)
    full = footprint.estimate(info, gemma_path.stat().st_size, 8192, 1)
    embeddings = info.input_embedding_bytes
    cpu = footprint.local_share(info, full, 2)
    assert (cpu.weights, cpu.kv_cache, cpu.overhead) == (embeddings, 0, full.overhead)
    # Metal is one more device: three devices share the layers and the KV cache.
    metal = footprint.local_share(info, full, 2, local_gpu=True)
    assert metal.weights == embeddings + (full.weights - embeddings) // 3
    assert metal.kv_cache == full.kv_cache // 3
    assert cpu.total < metal.total < full.total
    unknown = dataclasses.replace(info, input_embedding_bytes=0)
    assert footprint.local_share(unknown, full, 2) == full  # not measured: all of it counts
