"""The front on the port, on both engines (the llama-server router and the real llama-swap),
each serving two names of the real gemma model: one set of names, llama-swap's API, API keys,
streams cut by the client, large bodies, kept-alive connections, and a real client of
llama-swap's API (ollama-mtop)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from openai import OpenAI

from model_serve.config.settings import load_settings
from model_serve.runtime.procs import wait_until
from tests.conftest import TWIN, Env, running
from tests.test_engines import models, states

A, B = "ls/gemma-3:270m-q4_k_m", "ls/g2"
A_DASH = "ls/gemma-3-270m-q4_k_m"
KEY = "sk-front-test"


@pytest.fixture
def front(both: Env) -> Env:
    """A running stack on one engine or the other, serving A and B, with the front on (the
    default)."""
    assert load_settings(dict(both)).front_enabled
    return both


def client(env: Env, key: str = "x") -> OpenAI:
    return OpenAI(base_url=f"{env.base_url}/v1", api_key=key, max_retries=0, timeout=120)


def test_one_set_of_names(front: Env) -> None:
    listed = requests.get(f"{front.base_url}/v1/models", timeout=10).json()["data"]
    by_id = {m["id"]: m for m in listed}
    assert set(by_id) == {A, B}  # the names `model list` prints, on both engines
    assert A_DASH in by_id[A]["aliases"]
    assert by_id[A]["status"]["value"] == "unloaded"
    for sent in (A, A_DASH, B):
        reply = client(front).completions.create(model=sent, prompt="Hello", max_tokens=2)
        assert reply.model == sent and reply.usage.completion_tokens == 2
    chunks = list(client(front).chat.completions.create(
        model=A_DASH, stream=True, max_tokens=3, messages=[{"role": "user", "content": "Hi"}]))
    assert chunks and {c.model for c in chunks} == {A_DASH}
    listed = requests.get(f"{front.base_url}/v1/models", timeout=10).json()["data"]
    assert {m["id"]: m["status"]["value"] for m in listed} == {A: "loaded", B: "loaded"}


def test_llama_swaps_api_and_the_original_unload(front: Env) -> None:
    base = front.base_url
    assert requests.get(f"{base}/health", timeout=10).text == "OK"
    client(front).completions.create(model=A, prompt="Hello", max_tokens=1)
    client(front).completions.create(model=B, prompt="Hello", max_tokens=1)
    shown = requests.get(f"{base}/running", timeout=10).json()["running"]
    assert {m["model"] for m in shown} == {A, B}
    assert all(m["state"] == "ready" and m["proxy"].startswith("http://127.0.0.1:")
               for m in shown)
    # The original tool's form, on both engines.
    assert requests.post(f"{base}/unload", params={"model": A}, timeout=60).status_code == 200
    assert wait_until(lambda: states(front)[A] == "unloaded", 30)
    assert states(front)[B] == "loaded"
    # llama-swap's own: one model by id, then all.
    answer = requests.post(f"{base}/api/models/unload/{B}", timeout=60)
    assert answer.status_code == 200
    assert wait_until(lambda: states(front)[B] == "unloaded", 30)
    assert requests.post(f"{base}/api/models/unload/ls/nothing", timeout=10).status_code == 404
    # /upstream/<id>/... loads the model and reaches its own server.
    health = requests.get(f"{base}/upstream/{A}/health", timeout=120)
    assert health.status_code == 200 and states(front)[A] == "loaded"
    assert requests.get(f"{base}/unload", timeout=60).status_code == 200
    assert wait_until(lambda: set(states(front).values()) == {"unloaded"}, 30)


def test_ollama_mtop_sees_the_loaded_models(front: Env) -> None:
    client(front).completions.create(model=A, prompt="Hello", max_tokens=1)
    mtop = Path(sys.executable).parent / "mtop"
    shown = subprocess.run([str(mtop), "--backend", "llama-swap", "-u", front.base_url,
                            "--json", "--no-docker", "-m", "api"],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["models_ok"] is True
    running_models = {m["name"]: m for m in report["models"] if m["running"]}
    assert set(running_models) == {A} and running_models[A]["state"] == "ready"


def test_a_client_that_leaves_stops_the_generation(front: Env) -> None:
    client(front).completions.create(model=A, prompt="Hello", max_tokens=1)
    port = models(front)[A].port or int(
        requests.get(f"{front.base_url}/running", timeout=10).json()["running"][0]["proxy"]
        .rsplit(":", 1)[1])
    with requests.post(f"{front.base_url}/v1/completions", stream=True, timeout=60,
                       json={"model": A, "prompt": "Count to ten thousand:", "stream": True,
                             "max_tokens": 4000, "ignore_eos": True}) as reply:
        lines = reply.iter_lines()
        for _ in range(5):
            next(lines)
        # The model server answers to model_serve's own key only (test_engine_key.py).
        key = (front.state / "internal-key").read_text().strip()

        def busy() -> bool:
            slots = requests.get(f"http://127.0.0.1:{port}/slots", timeout=5,
                                 headers={"Authorization": f"Bearer {key}"}).json()
            return any(slot.get("is_processing") for slot in slots)

        assert busy()
    left = time.monotonic()
    assert wait_until(lambda: not busy(), 5, interval=0.05)
    assert time.monotonic() - left < 1.0, "the model went on generating for a second or more"


def test_large_bodies_and_kept_alive_connections(front: Env) -> None:
    padding = "x" * (8 * 2**20)  # 8 MiB, as a long context or an image would be
    answer = requests.post(f"{front.base_url}/v1/completions", timeout=120,
                           json={"model": A, "prompt": "Hi", "max_tokens": 1,
                                 "padding": padding})
    assert answer.status_code == 200, answer.text[:300]
    failures = 0
    with requests.Session() as session:  # one kept-alive connection, as the OpenAI SDK keeps
        for _ in range(60):
            reply = session.post(f"{front.base_url}/v1/completions", timeout=60,
                                 json={"model": A, "prompt": "Hi", "max_tokens": 1})
            failures += reply.status_code != 200
    assert failures == 0


@pytest.fixture
def keyed(env: Env, gemma_path: Path) -> Iterator[Env]:
    env.update({"FRONT": "on", "API_KEYS": KEY})
    (env.models / gemma_path.name).symlink_to(gemma_path)
    with running(env):
        yield env


def test_keys_on_every_path_but_health(keyed: Env) -> None:
    base = keyed.base_url
    assert requests.get(f"{base}/health", timeout=10).status_code == 200
    for path in ("/v1/models", "/running", "/models", "/props"):
        assert requests.get(f"{base}{path}", timeout=10).status_code == 401, path
    auth = {"Authorization": f"Bearer {KEY}"}
    assert requests.get(f"{base}/v1/models", headers=auth, timeout=10).status_code == 200
    assert client(keyed, KEY).completions.create(model=A, prompt="Hi", max_tokens=1)
    # The engine behind it listens on loopback only, and still wants the key.
    settings = load_settings(dict(keyed))
    assert settings.engine_host == "127.0.0.1"
    assert requests.get(f"{settings.engine_url}/v1/models", timeout=10).status_code == 401
    assert keyed.run("status").returncode == 0


def test_the_front_and_the_engine_come_back(front: Env) -> None:
    import os
    import signal

    from model_serve.runtime.state import read_state

    settings = load_settings(dict(front))
    client(front).completions.create(model=A, prompt="Hello", max_tokens=1)
    front_pid = read_state(settings.pid_file).child("front").pid.pid
    os.kill(front_pid, signal.SIGKILL)
    killed = time.monotonic()
    # The supervisor looks at its children five times a second and starts the front at once
    # (about 1 s here when quiet); the bound leaves room for a busy machine (speed: bench/).
    assert wait_until(lambda: requests.get(f"{front.base_url}/health", timeout=1).ok, 10,
                      ignore=(requests.RequestException,)), "the front did not come back"
    print(f"the front answered again {time.monotonic() - killed:.2f}s after its SIGKILL")
    assert states(front)[A] == "loaded", "loaded models stay loaded"

    engine_pid = read_state(settings.pid_file).child("engine").pid.pid
    os.kill(engine_pid, signal.SIGKILL)
    answer = requests.post(f"{front.base_url}/v1/completions", timeout=30,
                           json={"model": A, "prompt": "Hi", "max_tokens": 1})
    if answer.status_code != 200:  # it may already be back; if not, it says why
        assert answer.status_code in (502, 503)
        assert answer.json()["error"]["type"] in ("engine_unavailable", "engine_disconnected")
    assert wait_until(lambda: requests.post(
        f"{front.base_url}/v1/completions", timeout=60,
        json={"model": A, "prompt": "Hi", "max_tokens": 1}).status_code == 200, 60,
        ignore=(requests.RequestException,))


def test_a_config_change_to_models_in_use_loses_no_request(front: Env) -> None:
    from concurrent.futures import ThreadPoolExecutor

    for model in (A, B):
        client(front).completions.create(model=model, prompt="Hello", max_tokens=1)
    failures: list[str] = []

    def ask(i: int) -> None:
        model = (A, B)[i % 2]
        try:
            reply = client(front).completions.create(model=model, prompt="Count:",
                                                     max_tokens=8, extra_body={"ignore_eos": True})
            if reply.usage.completion_tokens != 8:
                failures.append(f"{model}: {reply.usage.completion_tokens} tokens")
        except Exception as exc:  # noqa: BLE001 - every failure is counted, whatever it is
            failures.append(f"{model}: {exc}")

    changes = [  # two syncs, each changing the settings of one loaded model
        TWIN + '    sampler_args: "--temp 0.7"\n',
        TWIN + '    sampler_args: "--temp 0.7"\n'
               '  gemma-3:270m-q4_k_m:\n    sampler_args: "--temp 0.6"\n',
    ]
    with ThreadPoolExecutor(max_workers=16) as pool:
        asked = [pool.submit(ask, i) for i in range(48)]
        time.sleep(1.0)  # requests in flight and queued on both models
        for text in changes:
            (front.home / "custom_models.yaml").write_text(text)
            synced = front.run("sync", "--no-bridge")
            assert synced.returncode == 0, synced.stdout + synced.stderr
        for future in asked:
            future.result(timeout=300)
    assert failures == []


@pytest.fixture
def router(env: Env, gemma_path: Path) -> Iterator[Env]:
    """The router with the front, serving A and B."""
    (env.models / gemma_path.name).symlink_to(gemma_path)
    (env.home / "custom_models.yaml").write_text(TWIN)
    with running(env):
        yield env


def test_loaded_models_are_reached_directly_on_the_router(router: Env) -> None:
    """On the router, a request for a loaded model goes to the model's own server, not through
    the router; a model unloaded behind the front's back (by `model unload`, which talks to the
    engine) is loaded again through the router, and its port never serves another model."""
    stack = router
    settings = load_settings(dict(stack))

    def direct_port(name: str) -> int | None:
        report = requests.get(f"{stack.base_url}/api/model_serve/activity", timeout=5).json()
        return (report.get(name) or {}).get("direct_port")

    def routed(name: str) -> int:  # requests the router proxied to that model, by its log
        engine_id = name.replace(":", "-")
        return settings.log_file.read_text(errors="replace").count(
            f"proxying request to model {engine_id} ")

    reply = client(stack).completions.create(model=A, prompt="Hello", max_tokens=1)
    assert reply.model == A
    assert wait_until(lambda: direct_port(A) is not None, 10)
    before = routed(A)  # 0: the front loaded the model, then sent the request to it
    for _ in range(5):
        assert client(stack).completions.create(model=A, prompt="Hi", max_tokens=1).model == A
    assert routed(A) == before, "requests for a loaded model skip the router"

    port = direct_port(A)
    assert stack.run("unload", A).returncode == 0  # not through the front
    reply = client(stack).completions.create(model=B, prompt="Hello", max_tokens=1)
    assert reply.model == B
    for name in (A, B, A):  # whatever ports the two servers got, each name reaches its model
        assert client(stack).completions.create(model=name, prompt="Hi", max_tokens=1).model \
            == name
    assert states(stack)[A] == "loaded"
    assert port is not None
