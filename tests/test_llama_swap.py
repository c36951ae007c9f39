"""The llama-swap engine: config rendering, and for real against the real llama-swap (v250,
../shared/tools/llama-swap) with real llama-server processes and the real gemma model. Where
that binary is missing, the stand-in tests/llama_swap_standin.py takes its place."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from model_serve.config.custom_models import load_custom_models
from model_serve.config.settings import load_settings
from model_serve.engines.base import REQUEST_ENDED, REQUEST_STARTED
from model_serve.engines.llama_server import resolve_llama_server
from model_serve.engines.llama_swap import (
    KNOWN_GROUP_KEYS,
    KNOWN_MODEL_KEYS,
    KNOWN_TOP_KEYS,
    LlamaSwapEngine,
)
from model_serve.errors import ConfigError, EngineError
from model_serve.models.catalog import build_catalog
from model_serve.models.plan import ServedModel, build_plan
from model_serve.runtime.procs import wait_until
from tests.conftest import REPO, Env, llama_servers_under, worker_share
from tests.ollama_store import gguf_bytes

STANDIN = Path(__file__).resolve().parent / "llama_swap_standin.py"
GEMMA = "ls/gemma-3:270m-q4_k_m"
TWIN = "ls/gemma-twin"
BIG_BUDGET = 1 << 40  # the plan must not shrink contexts by this machine's memory


def port_block(count: int = 4) -> int:
    """A port whose next `count - 1` neighbours (the models' ${PORT}s) are free too, below the
    ephemeral range: there a client socket (or its TIME_WAIT) can hold the port a model needs,
    and llama-server then fails to bind. LLAMA_SWAP_PORT 5847 is below it too."""
    rng = random.Random()
    low, high = worker_share(20000, 32000 - count)
    for _ in range(200):
        first = rng.randrange(low, high)
        with contextlib.ExitStack() as held:
            try:
                for port in range(first, first + count):
                    sock = held.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return first
    raise RuntimeError(f"no free block of ports between {low} and {high}")


REAL_LLAMA_SWAP = REPO.parent / "shared" / "tools" / "llama-swap" / "llama-swap"
_said_fallback: list[bool] = []


def llama_swap_binary(tmp_path: Path) -> Path:
    """The real llama-swap (v250, in shared/tools; CI has it). Where it is missing (a user's
    machine), the stand-in, said once."""
    if REAL_LLAMA_SWAP.exists():
        return REAL_LLAMA_SWAP
    assert not os.environ.get("CI"), f"the real llama-swap is missing in CI: {REAL_LLAMA_SWAP}"
    if not _said_fallback:
        _said_fallback.append(True)
        warnings.warn(f"{REAL_LLAMA_SWAP} is missing: the llama-swap tests use the stand-in "
                      "tests/llama_swap_standin.py", stacklevel=2)
    wrapper = tmp_path / "bin" / "llama-swap"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} "
                       f"{shlex.quote(str(STANDIN))} \"$@\"\n")
    wrapper.chmod(0o755)
    return wrapper


SCHEMA = REAL_LLAMA_SWAP.with_name("config-schema.json")


def validate_config(text: str) -> None:
    """A generated config.yaml must pass upstream's JSON Schema for it."""
    import jsonschema

    if not SCHEMA.exists():
        assert not os.environ.get("CI"), f"{SCHEMA} is missing in CI"
        return
    jsonschema.Draft7Validator(json.loads(SCHEMA.read_text())).validate(yaml.safe_load(text))


@pytest.fixture
def swap_env(env: Env, tmp_path: Path) -> Iterator[Env]:
    """An env whose engine is llama-swap: the real one wherever it is. Whatever config.yaml
    the test made is checked against llama-swap's schema afterwards."""
    env.port = port_block()
    # These speak to llama-swap itself on the port; the front is tested on it in
    # test_engines.py and test_front.py.
    env.update({"ENGINE": "llama-swap", "LLAMA_SWAP_BIN": str(llama_swap_binary(tmp_path)),
                "LLAMA_SWAP_PORT": str(env.port), "FRONT": "off",
                "DEFAULT_CTX_SIZE": "2048"})
    yield env
    config = env.state / "config.yaml"
    if config.exists() and "gemma-fourth" not in config.read_text():  # the refused one
        validate_config(config.read_text())


def plan_for(env: Env) -> tuple[LlamaSwapEngine, list[ServedModel]]:
    settings = load_settings(dict(env))
    catalog = build_catalog(settings.models_dir, settings.model_prefix, settings.state_dir)
    custom = load_custom_models(settings.custom_models_file)
    return LlamaSwapEngine(settings), build_plan(catalog, custom, settings, budget=BIG_BUDGET)


def rendered(env: Env) -> tuple[str, dict]:
    engine, plan = plan_for(env)
    text = engine.render_config(plan)
    validate_config(text)
    return text, yaml.safe_load(text)


def add_tiny_models(env: Env) -> Path:
    """Two tiny GGUFs; the second sits where shell quoting matters. Returns its path."""
    (env.models / "alice" / "repo").mkdir(parents=True)
    (env.models / "alice" / "repo" / "tiny-1b-q4_k_m.gguf").write_bytes(
        gguf_bytes(name="Tiny", size_label="1B"))
    odd = env.models / "it's a \"quoted\" $HOME ~dir" / "my model.gguf"
    odd.parent.mkdir()
    odd.write_bytes(gguf_bytes(name="Other Thing", size_label="3B", file_type="Q8_0",
                               extra={"tokenizer.chat_template": "{{ messages }}"}))
    return odd


def write_custom(env: Env, text: str) -> None:
    (env.home / "custom_models.yaml").write_text(text)


# --- rendering ----------------------------------------------------------------------------
def test_every_model_in_one_group_that_neither_swaps_nor_excludes(swap_env: Env) -> None:
    add_tiny_models(swap_env)
    text, config = rendered(swap_env)
    ids = set(config["models"])
    assert ids == {"ls/tiny:1b-q4_k_m", "ls/my-model:3b-q8_0"}
    # llama-swap's default group swaps: without this group only one model would stay loaded.
    (group,) = config["groups"].values()
    assert group["swap"] is False and group["exclusive"] is False
    assert set(group["members"]) == ids
    assert text.startswith("# Generated by model_serve")
    for model_id in ids:  # quoted wherever an id is written (keys and group members)
        assert text.count(f'"{model_id}"') == 2


def test_cmd_carries_odd_paths_intact_and_uses_port_macro(swap_env: Env) -> None:
    odd = add_tiny_models(swap_env)
    _text, config = rendered(swap_env)
    entry = config["models"]["ls/my-model:3b-q8_0"]
    argv = shlex.split(entry["cmd"])  # llama-swap splits POSIX-style, with no shell
    assert argv[argv.index("--model") + 1] == str(odd)
    assert Path(argv[0]).is_absolute() and Path(argv[0]) == resolve_llama_server(None).absolute()
    assert argv[argv.index("--port") + 1] == "${PORT}"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--ctx-size") + 1] == "2048"
    assert argv[argv.index("--parallel") + 1] == "1"
    assert argv[argv.index("--alias") + 1] == "ls/my-model:3b-q8_0"
    assert "--metrics" in argv and "--jinja" in argv  # the GGUF has a chat template
    assert entry["proxy"] == "http://127.0.0.1:${PORT}"
    assert entry["checkEndpoint"] == "/health"


def test_options_are_spelled_as_llama_server_wants(swap_env: Env) -> None:
    add_tiny_models(swap_env)
    write_custom(swap_env, "models:\n  tiny:1b-q4_k_m:\n    jinja: false\n"
                 "    sampler_args: \"--temp 0.7 -ngl 0 --no-perf\"\n")
    _text, config = rendered(swap_env)
    argv = shlex.split(config["models"]["ls/tiny:1b-q4_k_m"]["cmd"])
    assert argv[argv.index("--temp") + 1] == "0.7"
    assert argv[argv.index("-ngl") + 1] == "0"  # llama-server refuses '--ngl'
    assert "--no-perf" in argv and "--no-jinja" in argv and "--jinja" not in argv


def test_unknown_or_reserved_options_are_refused_with_the_file_named(swap_env: Env) -> None:
    add_tiny_models(swap_env)
    write_custom(swap_env, "models:\n  tiny:1b-q4_k_m:\n    sampler_args: \"--tmep 0.7\"\n")
    with pytest.raises(ConfigError) as bad:
        rendered(swap_env)
    assert "custom_models.yaml:2" in bad.value.message and "--temp" in bad.value.hint
    write_custom(swap_env, "models:\n  tiny:1b-q4_k_m:\n    sampler_args: \"--port 9\"\n")
    with pytest.raises(ConfigError, match="set by model_serve"):
        rendered(swap_env)


def test_custom_cmd_gets_the_quoted_model_path_and_keeps_port(swap_env: Env) -> None:
    odd = add_tiny_models(swap_env)
    write_custom(swap_env, "models:\n  my-model:3b-q8_0:\n"
                 "    cmd: /opt/llama/llama-server -m ${MODEL_PATH} --port ${PORT} -c 512\n")
    _text, config = rendered(swap_env)
    argv = shlex.split(config["models"]["ls/my-model:3b-q8_0"]["cmd"])
    assert argv == ["/opt/llama/llama-server", "-m", str(odd), "--port", "${PORT}", "-c", "512"]

    write_custom(swap_env, "models:\n  my-model:3b-q8_0:\n"
                 "    cmd: /opt/llama/llama-server -m ${MODEL_PATH}\n")
    with pytest.raises(ConfigError, match=r"no \$\{PORT\}"):
        rendered(swap_env)


def test_ttl_aliases_limits_keys_and_api_keys(swap_env: Env) -> None:
    add_tiny_models(swap_env)
    swap_env["API_KEYS"] = "alpha,beta"
    write_custom(swap_env, "models:\n  tiny:1b-q4_k_m:\n    ttl: 0\n    aliases: [tiny]\n")
    text, config = rendered(swap_env)
    tiny = config["models"]["ls/tiny:1b-q4_k_m"]
    assert tiny["ttl"] == 0  # 0 = never unload, written explicitly
    assert tiny["aliases"] == ["ls/tiny-1b-q4_k_m", "tiny"]  # the dash form first
    assert config["models"]["ls/my-model:3b-q8_0"]["ttl"] == 1800  # MODEL_TTL default
    assert all(m["concurrencyLimit"] >= 64 for m in config["models"].values())
    assert config["apiKeys"] == ["alpha", "beta"]
    assert config["startPort"] == swap_env.port + 1
    # llama-swap ignores unknown keys silently, so only known ones may be written.
    assert set(config) <= KNOWN_TOP_KEYS
    assert all(set(m) <= KNOWN_MODEL_KEYS for m in config["models"].values())
    assert all(set(g) <= KNOWN_GROUP_KEYS for g in config["groups"].values())
    assert "routing" not in text  # pre-v225 builds would ignore it and swap everything


def test_binary_missing_or_not_executable(swap_env: Env, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    swap_env["LLAMA_SWAP_BIN"] = str(tmp_path / "nowhere" / "llama-swap")
    with pytest.raises(EngineError, match="not an executable file"):
        LlamaSwapEngine(load_settings(dict(swap_env))).binary()
    del swap_env["LLAMA_SWAP_BIN"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    with pytest.raises(EngineError) as missing:
        LlamaSwapEngine(load_settings(dict(swap_env))).binary()
    assert "llama-swap was not found" in missing.value.message
    assert ("brew install llama-swap" if sys.platform == "darwin"
            else "github.com/mostlygeek/llama-swap/releases") in missing.value.hint


def test_command_and_version(swap_env: Env, tmp_path: Path) -> None:
    engine = LlamaSwapEngine(load_settings(dict(swap_env)))
    # v205+ reloads on SIGHUP, sent by reload(); a file watch too would reload twice.
    assert engine.command() == [swap_env["LLAMA_SWAP_BIN"], "--config",
                                str(swap_env.state / "config.yaml"), "--listen",
                                f"127.0.0.1:{engine.settings.engine_port}"]
    assert engine.version_number() == 250
    # Builds before v233 print the number without 'v' and no trailing newline.
    old = tmp_path / "old-llama-swap"
    old.write_text("#!/bin/sh\nprintf 'version: 150 (4f1a2b3c), built at 2025-05-01'\n")
    old.chmod(0o755)
    swap_env["LLAMA_SWAP_BIN"] = str(old)
    older = LlamaSwapEngine(load_settings(dict(swap_env)))
    assert older.version_number() == 150 and older.command()[-1] == "--watch-config"


# --- against llama-swap itself, with real llama-server ------------------------------------
def serve_gemma_twice(env: Env, gemma_path: Path, extra: str = "") -> None:
    """The real gemma file served under two names: its own, and a base_model twin."""
    (env.models / "google").mkdir()
    (env.models / "google" / gemma_path.name).symlink_to(gemma_path)
    write_custom(env, f"models:\n  gemma-twin:\n    base_model: gemma-3:270m-q4_k_m\n{extra}")


@contextlib.contextmanager
def running_llama_swap(engine: LlamaSwapEngine,
                       config_text: str | None = None) -> Iterator[None]:
    """Run llama-swap as the supervisor would: engine.command(), its own process group."""
    if config_text is not None:
        engine.config_path.parent.mkdir(parents=True, exist_ok=True)
        engine.config_path.write_text(config_text)
    log = engine.config_path.parent / "llama-swap.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(engine.command(), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_until(engine.healthy, timeout=15), log.read_text()
        yield
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            code = proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        assert code == 0, log.read_text()  # SIGTERM is an orderly stop


def chat(env: Env, model: str, **kwargs: object) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=f"{env.base_url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4, **kwargs)
    return reply.choices[0].message.content or ""


def states(engine: LlamaSwapEngine) -> dict[str, str]:
    return {m.name: m.state for m in engine.models()}


def test_stack_keeps_both_models_loaded_and_stops_clean(swap_env: Env, gemma_path: Path) -> None:
    from openai import OpenAI

    serve_gemma_twice(swap_env, gemma_path)
    started = swap_env.run("start")
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        engine = LlamaSwapEngine(load_settings(dict(swap_env)))
        assert states(engine) == {GEMMA: "unloaded", TWIN: "unloaded"}
        client = OpenAI(base_url=f"{swap_env.base_url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model=GEMMA, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8)
        assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens
        assert reply.model == GEMMA  # --alias: the served name, not the file path
        chunks = client.chat.completions.create(
            model=TWIN, messages=[{"role": "user", "content": "Count to five."}],
            max_tokens=16, stream=True)
        pieces = [c.choices[0].delta.content for c in chunks
                  if c.choices and c.choices[0].delta.content]
        assert len(pieces) > 1, "the stream arrives in several pieces through the proxy"

        # The point of the generated group: both stay loaded together, each on its own port.
        models = {m.name: m for m in engine.models()}
        assert models[GEMMA].state == models[TWIN].state == "loaded"
        assert models[GEMMA].port != models[TWIN].port
        assert {models[GEMMA].port, models[TWIN].port} == {swap_env.port + 1, swap_env.port + 2}
        assert "ls/gemma-3-270m-q4_k_m" in models[GEMMA].aliases
        assert len(llama_servers_under(swap_env.home.parent)) == 2
        # The dash alias reaches the loaded model instead of starting a third process.
        assert chat(swap_env, "ls/gemma-3-270m-q4_k_m") is not None
        assert len(llama_servers_under(swap_env.home.parent)) == 2

        engine.unload(TWIN)
        assert states(engine) == {GEMMA: "loaded", TWIN: "unloaded"}
        assert len(llama_servers_under(swap_env.home.parent)) == 1
        with pytest.raises(EngineError, match="knows no model 'ls/nope'"):
            engine.unload("ls/nope")
    finally:
        stopped = swap_env.run("stop", timeout=60)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert llama_servers_under(swap_env.home.parent) == []


def test_without_groups_llama_swap_serves_one_model_at_a_time(swap_env: Env,
                                                              gemma_path: Path) -> None:
    # llama-swap's default (one model at a time), which the generated group exists to avoid.
    serve_gemma_twice(swap_env, gemma_path)
    engine, plan = plan_for(swap_env)
    config = yaml.safe_load(engine.render_config(plan))
    del config["groups"]
    with running_llama_swap(engine, yaml.safe_dump(config)):
        chat(swap_env, GEMMA)
        assert states(engine) == {GEMMA: "loaded", TWIN: "unloaded"}
        chat(swap_env, TWIN)
        assert states(engine) == {GEMMA: "unloaded", TWIN: "loaded"}
        assert len(llama_servers_under(swap_env.home.parent)) == 1
    assert llama_servers_under(swap_env.home.parent) == []


def test_bursts_beyond_llama_swaps_default_limit_queue(swap_env: Env, gemma_path: Path) -> None:
    serve_gemma_twice(swap_env, gemma_path)
    engine, plan = plan_for(swap_env)
    config = yaml.safe_load(engine.render_config(plan))

    def burst(n: int) -> list[int]:
        codes: list[int] = []
        body = {"model": GEMMA, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}

        def one() -> None:
            codes.append(requests.post(f"{swap_env.base_url}/v1/chat/completions", json=body,
                                       timeout=120).status_code)

        threads = [threading.Thread(target=one) for _ in range(n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return codes

    with running_llama_swap(engine, yaml.safe_dump(config)):
        assert burst(24) == [200] * 24  # concurrencyLimit 64: the burst queues
    del config["models"][GEMMA]["concurrencyLimit"]
    with running_llama_swap(engine, yaml.safe_dump(config)):
        codes = burst(24)  # llama-swap's default of 10 (queued included) refuses the rest
        assert 429 in codes and 200 in codes
    assert llama_servers_under(swap_env.home.parent) == []


def test_reload_ttl_and_api_keys(swap_env: Env, gemma_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    swap_env["API_KEYS"] = "sekret"
    serve_gemma_twice(swap_env, gemma_path, extra="    ttl: 2\n")
    engine, plan = plan_for(swap_env)
    engine.write_config(plan)
    with running_llama_swap(engine):
        # API keys: everything but /health needs one; the engine sends it.
        assert requests.get(f"{swap_env.base_url}/v1/models", timeout=5).status_code == 401
        assert requests.get(f"{swap_env.base_url}/health", timeout=5).status_code == 200
        assert set(states(engine)) == {GEMMA, TWIN}

        # The event feed (what the pressure unloader follows) reports each change once.
        seen: list[tuple[str, str]] = []
        asked: list[tuple[str, str]] = []
        follow_stop = threading.Event()

        def follow() -> None:
            for name, status in engine.events(follow_stop):  # states here; requests apart
                (asked if status in (REQUEST_STARTED, REQUEST_ENDED) else seen).append(
                    (name, status))

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        assert wait_until(lambda: len(seen) >= 2, timeout=10)
        assert sorted(seen) == [(GEMMA, "unloaded"), (TWIN, "unloaded")]

        # ttl 2 on the twin: it leaves by itself once idle; gemma (ttl 1800) stays.
        from openai import OpenAI

        client = OpenAI(base_url=f"{swap_env.base_url}/v1", api_key="sekret", max_retries=0)
        for model in (GEMMA, TWIN):
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert wait_until(lambda: states(engine)[TWIN] == "unloaded", timeout=15)
        assert states(engine)[GEMMA] == "loaded"
        assert wait_until(lambda: seen[-1] == (TWIN, "unloaded"), timeout=5)
        twin_events = [state for name, state in seen if name == TWIN]
        assert twin_events == ["unloaded", "loading", "loaded", "stopping", "unloaded"]
        assert [s for n, s in seen if n == GEMMA] == ["unloaded", "loading", "loaded"]
        assert asked == [(GEMMA, REQUEST_STARTED), (GEMMA, REQUEST_ENDED),
                         (TWIN, REQUEST_STARTED), (TWIN, REQUEST_ENDED)]

        # A changed file: reload() returns once llama-swap serves the new set; llama-swap
        # stops every running model on a reload.
        write_custom(swap_env, "models:\n  gemma-twin:\n    base_model: gemma-3:270m-q4_k_m\n"
                     "  gemma-third:\n    base_model: gemma-3:270m-q4_k_m\n")
        engine, plan = plan_for(swap_env)
        assert engine.write_config(plan)
        started = time.monotonic()
        engine.reload()
        assert time.monotonic() - started < 10
        assert states(engine) == {GEMMA: "unloaded", TWIN: "unloaded",
                                  "ls/gemma-third": "unloaded"}
        follower.join(timeout=10)  # llama-swap closes event streams on a reload...
        assert not follower.is_alive()
        # ...without an event for the models the reload stopped (v250): a follower must read
        # the states anew when it reconnects.
        assert seen[-1] == (TWIN, "unloaded") and (GEMMA, "stopping") not in seen

        # A file llama-swap refuses (an alias two models share; v250 takes a negative ttl):
        # the old config keeps serving, and reload() says so instead of pretending.
        broken = yaml.safe_load(engine.config_path.read_text())
        broken["models"]["ls/gemma-fourth"] = {**broken["models"][TWIN],
                                               "aliases": ["ls/gemma-3-270m-q4_k_m"]}
        engine.config_path.write_text(yaml.safe_dump(broken))
        monkeypatch.setattr("model_serve.engines.llama_swap.RELOAD_WAIT", 4.0)
        with pytest.raises(EngineError, match="did not take the new config.yaml"):
            engine.reload()
        assert set(states(engine)) == {GEMMA, TWIN, "ls/gemma-third"}
    assert llama_servers_under(swap_env.home.parent) == []


def test_unloader_sees_requests_through_llama_swaps_events(swap_env: Env,
                                                            gemma_path: Path) -> None:
    """llama-swap reports every request as it starts and ends (`inflight` events). The
    pressure unloader counts them, so a model is known busy even when its own counters cannot
    be read (here the twin runs without --metrics) and is not unloaded while it streams."""
    from model_serve.runtime.unloader import PressureUnloader

    serve_gemma_twice(swap_env, gemma_path, extra="    sampler_args: '--metrics false'\n")
    assert swap_env.run("start").returncode == 0
    try:
        unloader = PressureUnloader(load_settings(dict(swap_env, MEMORY_PRESSURE_THRESHOLD="1",
                                                       MIN_MODEL_AGE_SECONDS="0")))
        follower = threading.Thread(target=unloader.follow_events, daemon=True)
        follower.start()
        chat(swap_env, TWIN)
        chat(swap_env, GEMMA)  # the twin is the least recently used
        assert "--metrics" not in next(r["cmd"] for r in requests.get(
            f"{swap_env.base_url}/running", timeout=5).json()["running"] if r["model"] == TWIN)
        done: list[int] = []

        def stream() -> None:
            from openai import OpenAI

            client = OpenAI(base_url=f"{swap_env.base_url}/v1", api_key="x", max_retries=0)
            done.append(len(list(client.completions.create(
                model=TWIN, prompt="Count:", max_tokens=250, stream=True,
                extra_body={"ignore_eos": True}))))

        streamer = threading.Thread(target=stream)
        streamer.start()
        assert wait_until(lambda: unloader.tracker.requests_in_flight.get(TWIN, 0) > 0,
                          timeout=30)
        assert unloader.refresh()
        assert unloader.relieve("test: threshold 1%") == [GEMMA]
        streamer.join(120)
        assert done and done[0] > 100, "the twin's stream completed"
        assert wait_until(lambda: unloader.tracker.requests_in_flight.get(TWIN) == 0, timeout=10)
        unloader.stop.set()
    finally:
        swap_env.run("stop", timeout=60)
