"""One model across machines: `rpc:` in custom_models.yaml gives the model llama-server's --rpc
on both engines; every mistake in it is named with the file, line, model and fix."""

from __future__ import annotations

import json
import shlex

import pytest
import yaml

from tests import ollama_store
from tests.conftest import Env

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
