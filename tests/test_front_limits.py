"""The port's limits, as llama-swap has them, on one real router stack: a body over
MAX_BODY_MB is a 413 before it is read whole; a client that sends its body too slowly gets a
408 after REQUEST_READ_TIMEOUT; past MAX_CONCURRENT_REQUESTS a request gets 503 at once. And
/health answers while loads are waited on: engine calls have a thread pool of their own. And
requests that wait on their own model's load are answered when it ends, even past
LOAD_QUEUE_TIMEOUT (a big model may take longer to load). A connection that sends its request
head too slowly, or nothing, is closed after REQUEST_READ_TIMEOUT; past MAX_CONNECTIONS a new
connection gets 503 and is closed, and the port serves again once connections close; model_serve's
own calls meanwhile pass through the front's own socket."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import openai
import requests

from model_serve import internal_key
from model_serve.config.settings import load_settings
from model_serve.engines import select_engine
from model_serve.runtime.activity import front_record
from model_serve.runtime.procs import wait_until
from tests.conftest import Env, running

B = "ls/g2"
TWIN = ("models:\n  g2:\n    base_model: gemma-3:270m-q4_k_m\n    ctx_size: 32768\n"
        "    sampler_args: '--swa-full'\n")


def slow_client(env: Env, path: str = "/v1/completions") -> socket.socket:
    """A request whose headers came and whose body never does."""
    sock = socket.create_connection(("127.0.0.1", env.port), timeout=30)
    sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
    return sock


def status_of(sock: socket.socket) -> int:
    return int(sock.recv(4096).split(b" ", 2)[1])


def test_the_ports_limits(env: Env, gemma_path: Path) -> None:
    (env.models / gemma_path.name).symlink_to(gemma_path)
    (env.home / "custom_models.yaml").write_text(TWIN)
    env.update({"MAX_BODY_MB": "1", "REQUEST_READ_TIMEOUT": "3", "LOAD_QUEUE_TIMEOUT": "1",
                "MAX_CONCURRENT_REQUESTS": "12", "MAX_CONNECTIONS": "30"})
    with running(env):
        url = f"{env.base_url}/v1/completions"
        big = requests.post(url, timeout=60, json={"model": B, "prompt": "x" * (2 * 2**20)})
        assert big.status_code == 413 and "MAX_BODY_MB" in big.json()["error"]["message"]
        # Ollama's paths read their bodies within the same limits, and answer in its shape.
        for path in ("/api/chat", "/api/pull"):
            big = requests.post(env.base_url + path, timeout=60,
                                json={"model": B, "prompt": "x" * (2 * 2**20)})
            assert big.status_code == 413 and "MAX_BODY_MB" in big.json()["error"], path

        # /health while the load of B is waited on by more callers than the default pool has
        # threads (cores + 4): it answers before the load ends.
        engine = select_engine(load_settings(dict(env)))
        b_id = engine.model_id(B)
        answers: list[int] = []

        def upstream() -> None:
            answers.append(requests.get(f"{env.base_url}/upstream/{b_id}/health",
                                        timeout=120).status_code)

        callers = [threading.Thread(target=upstream) for _ in range(10)]
        callers[0].start()
        assert wait_until(lambda: engine.models() and {m.name: m.state for m in
                                                       engine.models()}[b_id] == "loading",
                          30, interval=0.01)
        for caller in callers[1:]:
            caller.start()
        threading.Event().wait(0.3)  # the callers reach their wait for the load
        health = requests.get(f"{env.base_url}/health", timeout=120)
        state = {m.name: m.state for m in engine.models()}[b_id]
        for caller in callers:
            caller.join(120)
        assert health.status_code == 200 and state == "loading", \
            f"/health answered only once the load was over ({state})"
        # Every caller is answered by the model server: 503 'Loading model' while it
        # still loads (llama-server's /health), else 200.
        assert len(answers) == 10 and set(answers) <= {200, 503}, \
            answers

        # Twelve requests whose bodies never come fill the port; the next gets 503 at once.
        with ExitStack() as stack:
            # Ollama's paths among them (its chat, its pull) are held to the same time.
            paths = ["/v1/completions"] * 9 + ["/api/chat", "/api/show", "/api/pull"]
            held = [stack.enter_context(slow_client(env, path)) for path in paths]
            assert wait_until(lambda: requests.get(f"{env.base_url}/v1/models", timeout=5)
                              .status_code == 503, 2, interval=0.05)
            busy = requests.get(f"{env.base_url}/v1/models", timeout=5)
            assert busy.status_code == 503 and "Retry-After" in busy.headers
            assert requests.get(f"{env.base_url}/health", timeout=5).status_code == 200
            # model_serve's own calls pass the cap: the unloader's evict, a sync's hold.
            own = internal_key.own_headers(load_settings(dict(env)))
            evict = requests.post(f"{env.base_url}/api/model_serve/evict", headers=own,
                                  json={"model": b_id, "idle_seconds": 0}, timeout=60)
            assert evict.status_code == 200, evict.text
            # After REQUEST_READ_TIMEOUT each gets 408, and the port serves again.
            assert [status_of(sock) for sock in held] == [408] * 12
        assert requests.get(f"{env.base_url}/v1/models", timeout=5).status_code == 200

        # A head sent a byte every half second, and a connection that sends nothing, are
        # closed after REQUEST_READ_TIMEOUT (3 s here), not left holding a descriptor.
        assert seconds_until_closed(env, drip=b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
                                               b"X-Slow: " + b"a" * 60) < 3 + 3
        assert seconds_until_closed(env, drip=b"") < 3 + 3

        # Thirty idle connections fill the port: the next one gets 503 and is closed at once.
        with ExitStack() as stack:
            idle = [stack.enter_context(socket.create_connection(("127.0.0.1", env.port)))
                    for _ in range(30)]
            with socket.create_connection(("127.0.0.1", env.port), timeout=2) as extra:
                answer = extra.recv(4096)
                assert answer.startswith(b"HTTP/1.1 503") and b"MAX_CONNECTIONS" in answer, answer
                assert extra.recv(4096) == b"", "the refused connection is closed"
            assert len(idle) == 30
            # model_serve's own calls come in through the front's own socket, which clients
            # cannot fill: the unloader's read of the activity, `model status`.
            settings = load_settings(dict(env))
            assert front_record(settings) is not None
            status = json.loads(env.run("status", "--json").stdout)
            assert status["healthy"] is True, status
        # Once they are closed the port serves a real client again.
        client = openai.OpenAI(base_url=f"{env.base_url}/v1", api_key="x", max_retries=0)
        assert wait_until(lambda: _lists(client), 5, interval=0.1)


def test_a_front_whose_socket_cannot_open_serves_on_the_port(env: Env) -> None:
    """Where state/front.sock cannot be a socket (a folder in its way here; an exFAT drive, a
    path over macOS's 104 bytes) the front serves all the same, says so, and model_serve's
    own calls go through the port."""
    (env.state / "front.sock").mkdir(parents=True)
    with running(env):
        assert requests.get(f"{env.base_url}/health", timeout=10).status_code == 200
        assert json.loads(env.run("status", "--json").stdout)["healthy"] is True
        assert front_record(load_settings(dict(env))) is not None
        log = (env.state / "logs" / "model_serve.log").read_text()
        assert "no socket of the front's own" in log
    assert (env.state / "front.sock").is_dir()


def seconds_until_closed(env: Env, drip: bytes) -> float:
    """Send `drip` a byte every half second (then nothing); the seconds until the port closes
    the connection, or 20 if it never does."""
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", env.port), timeout=0.5) as sock:
        for byte in drip:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return time.monotonic() - began
            time.sleep(0.5)
            if time.monotonic() - began > 20:
                return 20.0
        while time.monotonic() - began < 20:
            try:
                if sock.recv(4096) == b"":
                    return time.monotonic() - began
            except TimeoutError:
                continue
            except OSError:
                return time.monotonic() - began
    return 20.0


def _lists(client: openai.OpenAI) -> bool:
    try:
        return bool(client.models.list().data)
    except openai.APIError:
        return False


def test_the_connection_cap_stays_within_the_open_files_limit() -> None:
    """With macOS's default soft limit of 256 open files (the supervisor's raise refused),
    MAX_CONNECTIONS=1024 would protect nothing: the cap comes down to what fits, said once."""
    import subprocess
    import sys

    code = ("import logging, resource; logging.basicConfig(level=logging.WARNING); "
            "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)); "
            "from model_serve.runtime.connections import usable_limit; "
            "print(usable_limit(1024), usable_limit(50))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.split() == ["96", "50"]
    assert "MAX_CONNECTIONS=1024" in done.stderr and "ulimit -n" in done.stderr


def test_a_front_that_stops_leaves_a_newer_fronts_socket(env: Env) -> None:
    """A front ending after another one opened the same state/front.sock (a restart that did
    not wait for it) removes only the socket it opened itself: the newer front's own calls
    (the unloader's, `model status`) must not lose their way in."""
    import asyncio

    from model_serve.runtime.front import Front, make_app, serve

    settings = load_settings(dict(env))
    settings.log_file.parent.mkdir(parents=True, exist_ok=True)
    door = settings.state_dir / "front.sock"
    newer = socket.socket(socket.AF_UNIX)
    loop = asyncio.new_event_loop()
    task = loop.create_task(serve(make_app(Front(settings)), settings))

    def open_a_newer_one_then_stop() -> None:
        if wait_until(door.is_socket, 20, interval=0.05):
            door.unlink()
            newer.bind(str(door))
        loop.call_soon_threadsafe(task.cancel)

    threading.Thread(target=open_a_newer_one_then_stop, daemon=True).start()
    try:  # in this thread: the front handles signals, which only the main thread may
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(task)
        assert door.is_socket(), "the older front removed the newer one's socket"
    finally:
        newer.close()
        loop.close()
