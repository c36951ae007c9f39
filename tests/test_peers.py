"""Peers (PEERS): another server's models on our port as `<peer>/<model>`, forwarded by the
front with the peer's own key, on both engines. Three real stacks on one machine, each with
its own home and the real gemma model: B, and two stacks whose peer B is (one on the router,
one on the real llama-swap v250); B has the router stack as its own peer, so each lists the
other and neither may list `a/b/...`. Then B stops: a clear 503 at once, our own models go on;
and B comes back.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import ollama
import pytest
import requests
import yaml
from openai import APIStatusError, OpenAI

from model_serve.commands import doctor
from model_serve.config.settings import load_settings
from model_serve.errors import ConfigError
from tests import test_dashboard
from tests.conftest import TWIN as TWIN_YAML
from tests.conftest import Env, new_env, running
from tests.real_ollama import serving
from tests.test_dashboard import serve_front
from tests.test_llama_swap import REAL_LLAMA_SWAP, llama_swap_binary, port_block

GEMMA = "ls/gemma-3:270m-q4_k_m"
OLLAMA_MODEL = "gemma3-peer:latest"  # what the real Ollama serves the gemma file as
TWIN = "ls/g2"  # B's second model (tests.conftest.TWIN): B's alone
ORIGIN = "https://chat.example"  # a web page allowed on the front stacks' port
B_KEY, A_KEY = "sk-peer-b", "sk-peer-a"
ENGINES = ("llama-server", "llama-swap")
T = TypeVar("T")
browser = test_dashboard.browser  # the real Chromium's fixture, for the page's peers


def eventually(value: Callable[[], T | None], timeout: float) -> T:
    """`value()` once it is not None (or falsy), within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = value()
        if found:
            return found
        assert time.monotonic() < deadline, f"nothing within {timeout}s"
        time.sleep(0.2)


def write_keys(env: Env, text: str, mode: int = 0o600) -> Path:
    path = env.home / "peer-keys"  # PEER_KEYS_FILE's default
    path.write_text(text)
    path.chmod(mode)
    return path


# --- settings -------------------------------------------------------------------------------
def test_peers_and_their_keys_from_the_settings(env: Env) -> None:
    env["PEERS"] = "studio=http://studio.local:5847/ , gpu=https://gpu.lan/api"
    write_keys(env, "# the keys these servers accept\nstudio = sk-1\n\n")
    studio, gpu = load_settings(dict(env)).peers
    assert (studio.name, studio.url, studio.key) == ("studio", "http://studio.local:5847", "sk-1")
    assert (gpu.name, gpu.url, gpu.key, gpu.headers) == ("gpu", "https://gpu.lan/api", "", {})
    assert "sk-1" not in repr(studio)  # a key never reaches a log line by a repr
    assert load_settings(dict(env)).peer_check_interval == 30
    assert (studio.timeout, gpu.timeout) == (300, 300)  # PEER_TIMEOUT's default
    env["PEER_TIMEOUT"] = " 120 , GPU=900"
    studio, gpu = load_settings(dict(env)).peers
    assert (studio.timeout, gpu.timeout) == (120, 900)
    env["PEER_TIMEOUT"] = "gpu=0"  # no limit for it; the default for the others
    studio, gpu = load_settings(dict(env)).peers
    assert (studio.timeout, gpu.timeout) == (300, 0)


@pytest.mark.parametrize(("timeout", "said"), [
    ("soon", "'soon' is not a number of seconds"),
    ("-1", "'-1' is not a number of seconds"),
    ("nan", "'nan' is not a number of seconds"),
    ("30,stuido=60", "is for 'stuido', which PEERS does not name"),
    ("30,60", "gives the default twice"),
    ("studio=30,STUDIO=60", "gives the peer 'studio' twice"),
])
def test_a_bad_peer_timeout_is_refused_by_name(env: Env, timeout: str, said: str) -> None:
    env.update({"PEERS": "studio=http://x", "PEER_TIMEOUT": timeout})
    with pytest.raises(ConfigError) as refused:
        load_settings(dict(env))
    assert refused.value.message.startswith("PEER_TIMEOUT (from the environment)")
    assert said in refused.value.message and "PEER_TIMEOUT" in (refused.value.hint or "")


@pytest.mark.parametrize(("peers", "keys", "said"), [
    ("studio", "", "is not NAME=URL"),
    ("st/udio=http://x", "", "may hold only letters"),
    ("studio=ftp://x", "", "is not an http:// or https:// base URL"),
    ("studio=http://me:pw@x", "", "the URL holds a user or password"),
    ("a=http://x,A=http://y", "", "names the peer 'A' twice"),
    ("ls=http://x", "", "MODEL_PREFIX=ls/"),
    ("studio=http://x", "studio sk-1\n", "line 1, is not NAME=KEY"),
    ("studio=http://x", "stuido=sk-1\n", "is for 'stuido', which PEERS does not name"),
])
def test_bad_peers_or_keys_are_refused_by_name(env: Env, peers: str, keys: str,
                                               said: str) -> None:
    env["PEERS"] = peers
    if keys:
        write_keys(env, keys)
    with pytest.raises(ConfigError) as refused:
        load_settings(dict(env))
    assert said in refused.value.message
    assert "sk-1" not in refused.value.message + (refused.value.hint or "")


def test_a_keys_file_others_may_read_is_refused(env: Env) -> None:
    env["PEERS"] = "studio=http://x"
    path = write_keys(env, "studio=sk-1\n", 0o644)
    with pytest.raises(ConfigError) as refused:
        load_settings(dict(env))
    assert "PEER_KEYS_FILE" in refused.value.message and "other users" in refused.value.message
    assert refused.value.hint == f"chmod 600 {path}"
    path.unlink()  # no file: no peer needs a key
    assert load_settings(dict(env)).peers[0].key == ""


def test_peers_need_the_front(env: Env) -> None:
    env.update({"PEERS": "studio=http://x", "FRONT": "off"})
    with pytest.raises(ConfigError) as refused:
        load_settings(dict(env))
    assert "PEERS" in refused.value.message and refused.value.hint == \
        "set FRONT=on, or unset PEERS"


def test_models_a_llama_swap_forwards_to_its_own_peers_are_not_its_own(tmp_path: Path) -> None:
    """The real llama-swap v250 marks its peers' models; those are left out (no a/b/a/...)."""
    import subprocess

    from model_serve.runtime.peers import own_models

    assert REAL_LLAMA_SWAP.exists()
    port = port_block(1)
    config = {"models": {"m1": {"cmd": "/bin/sleep 100", "proxy": "http://127.0.0.1:9"}},
              "peers": {"other": {"proxy": "http://127.0.0.1:9", "models": ["ls/gemma"]}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([str(REAL_LLAMA_SWAP), "--config", str(tmp_path / "config.yaml"),
                             "--listen", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        def listing() -> dict | None:
            try:
                return requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).json()
            except requests.RequestException:
                return None

        payload = eventually(listing, 20)
        assert {m["id"] for m in payload["data"]} == {"m1", "other/ls/gemma"}
        assert [(m.name, m.state) for m in own_models(payload)] == [("m1", "unloaded")]
    finally:
        proc.terminate()
        proc.wait(10)


# --- three real stacks ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def stacks(tmp_path_factory: pytest.TempPathFactory,
           gemma_path: Path) -> Iterator[dict[str, Env]]:
    """B (the peer, router engine), and one stack per engine whose peer B is; the llama-swap
    one has the real Ollama as a peer too."""
    b = new_env(tmp_path_factory.mktemp("peer-b"))
    a = {engine: new_env(tmp_path_factory.mktemp(f"a-{engine}")) for engine in ENGINES}
    swap = a["llama-swap"]
    swap.port = port_block()
    swap.update({"ENGINE": "llama-swap", "LLAMA_SWAP_PORT": str(swap.port),
                 "LLAMA_SWAP_BIN": str(llama_swap_binary(tmp_path_factory.mktemp("bin")))})
    for env in (b, *a.values()):
        (env.models / gemma_path.name).symlink_to(gemma_path)
        # Saved conversations are no peer's business: off, for quick stops.
        env.update({"PEER_CHECK_INTERVAL": "1", "DEFAULT_CTX_SIZE": "2048", "KV_CACHE": "off"})
    router = a["llama-server"]
    b.update({"API_KEYS": B_KEY, "PEERS": f"a={router.base_url}"})
    (b.home / "custom_models.yaml").write_text(TWIN_YAML)
    write_keys(b, f"a={A_KEY}\n")
    for env in a.values():
        env.update({"API_KEYS": A_KEY, "PEERS": f"b={b.base_url}", "CORS_ORIGINS": ORIGIN})
        write_keys(env, f"b={B_KEY}\n")
    with serving(tmp_path_factory.mktemp("ollama")) as server:
        server.create(OLLAMA_MODEL.removesuffix(":latest"), gemma_path)
        swap["PEERS"] += f",ol={server.host},wrong={b.base_url}"  # no key: Ollama takes none
        write_keys(swap, f"b={B_KEY}\nwrong=sk-not-bs-key\n")
        with running(b), running(router), running(swap):
            yield {"b": b, **a}


def listed(env: Env, key: str) -> dict[str, dict]:
    reply = requests.get(f"{env.base_url}/v1/models", timeout=10,
                         headers={"Authorization": f"Bearer {key}"})
    assert reply.status_code == 200, reply.text
    return {m["id"]: m for m in reply.json()["data"]}


def requests_served(env: Env, key: str) -> int:
    """Requests B's own front served for its gemma (its activity record)."""
    report = requests.get(f"{env.base_url}/api/model_serve/activity", timeout=10,
                          headers={"Authorization": f"Bearer {key}"}).json()
    return report.get(GEMMA, {}).get("requests", 0)


def client(env: Env) -> OpenAI:
    return OpenAI(base_url=f"{env.base_url}/v1", api_key=A_KEY, max_retries=0, timeout=120)


def ollama_client(env: Env) -> ollama.Client:
    return ollama.Client(host=env.base_url, headers={"Authorization": f"Bearer {A_KEY}"})


def test_each_lists_the_others_own_models_only(stacks: dict[str, Env]) -> None:
    b, router = stacks["b"], stacks["llama-server"]
    for env, key, ours, peer, theirs in (
            (router, A_KEY, {GEMMA}, "b", {f"b/{GEMMA}", f"b/{TWIN}"}),
            (stacks["llama-swap"], A_KEY, {GEMMA}, "b",
             {f"b/{GEMMA}", f"b/{TWIN}", f"ol/{OLLAMA_MODEL}"}),
            (b, B_KEY, {GEMMA, TWIN}, "a", {f"a/{GEMMA}"})):
        models = eventually(lambda e=env, k=key, t=theirs: (m := listed(e, k)) and
                            t <= set(m) and m, 60)
        assert set(models) == ours | theirs, models  # no b/a/..., no a/b/...
        entry = models[f"{peer}/{GEMMA}"]
        assert entry["meta"]["llamaswap"] == {"type": "peer", "peerID": peer}
        assert entry["status"]["value"] in ("loaded", "unloaded")
    tags = requests.get(f"{router.base_url}/api/tags", timeout=10,
                        headers={"Authorization": f"Bearer {A_KEY}"}).json()["models"]
    assert {t["name"] for t in tags} == {GEMMA, f"b/{GEMMA}", f"b/{TWIN}"}
    shown = router.run("list", check=True).stdout
    assert f"b/{GEMMA}" in shown and f"peer b ({b.base_url})" in shown
    as_json = yaml.safe_load(router.run("list", "--json", check=True).stdout)
    assert {(m["peer"], m["peer_name"]) for m in as_json if "peer" in m} == {("b", GEMMA),
                                                                             ("b", TWIN)}
    check = doctor._peers(load_settings(dict(router)))  # model doctor's, asking B now
    assert (check.status, check.detail) == ("ok", f"b ({b.base_url}): 2 model(s)")


@pytest.mark.parametrize("engine", ENGINES)
def test_a_chat_and_a_stream_reach_the_peers_model(stacks: dict[str, Env],
                                                   engine: str) -> None:
    b, a = stacks["b"], stacks[engine]
    eventually(lambda: f"b/{GEMMA}" in listed(a, A_KEY), 60)
    before = requests_served(b, B_KEY)
    # Our key (A_KEY) goes to our port; B accepts only B_KEY, which the front sends it.
    reply = client(a).chat.completions.create(
        model=f"b/{GEMMA}", max_tokens=3, temperature=0,
        messages=[{"role": "user", "content": "Say hello"}])
    assert reply.model == f"b/{GEMMA}" and reply.usage.completion_tokens == 3
    chunks = list(client(a).chat.completions.create(
        model=f"b/{GEMMA}", max_tokens=3, stream=True,
        messages=[{"role": "user", "content": "Say hello"}]))
    assert {c.model for c in chunks} == {f"b/{GEMMA}"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # Ollama's API: listed in /api/tags, so Ollama's clients may chat with it too.
    answer = ollama_client(a).chat(model=f"b/{GEMMA}", options={"num_predict": 3},
                                   messages=[{"role": "user", "content": "Say hello"}])
    assert answer.model == f"b/{GEMMA}" and answer.message.content and answer.eval_count == 3
    assert requests_served(b, B_KEY) == before + 3  # B's own model answered each
    # A page allowed here (CORS_ORIGINS) reaches it too: B never judges our client's origin.
    page = requests.post(f"{a.base_url}/v1/chat/completions", timeout=120, json={
        "model": f"b/{GEMMA}", "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]},
        headers={"Authorization": f"Bearer {A_KEY}", "Origin": ORIGIN,
                 "Sec-Fetch-Site": "cross-site", "Cookie": "session=ours"})
    assert page.status_code == 200, page.text
    assert page.headers["Access-Control-Allow-Origin"] == ORIGIN
    # A name only one peer lists needs no `b/` (llama-swap's rule); ours win over theirs.
    reply = client(a).chat.completions.create(
        model=TWIN, max_tokens=1, messages=[{"role": "user", "content": "Hi"}])
    assert reply.model == TWIN and reply.usage.completion_tokens == 1
    # Our own admission and activity never see a peer's model.
    report = requests.get(f"{a.base_url}/api/model_serve/activity", timeout=10,
                          headers={"Authorization": f"Bearer {A_KEY}"}).json()
    assert not any(name.startswith("b/") for name in report)
    with pytest.raises(APIStatusError) as missing:
        client(a).chat.completions.create(model="b/no-such-model", max_tokens=1,
                                          messages=[{"role": "user", "content": "Hi"}])
    assert missing.value.status_code == 404 and "peer b" in missing.value.message


def test_an_ollama_is_a_peer_too(stacks: dict[str, Env]) -> None:
    """The real Ollama 0.32.15: its OpenAI API lists and answers; it gives no model state."""
    swap = stacks["llama-swap"]
    entry = eventually(lambda: listed(swap, A_KEY).get(f"ol/{OLLAMA_MODEL}"), 60)
    assert entry["status"]["value"] == "unknown"
    reply = client(swap).chat.completions.create(
        model=f"ol/{OLLAMA_MODEL}", max_tokens=2, temperature=0,
        messages=[{"role": "user", "content": "Say hello"}])
    assert reply.model == f"ol/{OLLAMA_MODEL}" and reply.usage.completion_tokens == 2


def test_a_peer_that_refuses_our_key_is_named_with_the_fix(stacks: dict[str, Env]) -> None:
    swap = stacks["llama-swap"]
    with pytest.raises(APIStatusError) as refused:
        client(swap).chat.completions.create(model=f"wrong/{GEMMA}", max_tokens=1,
                                             messages=[{"role": "user", "content": "Hi"}])
    assert refused.value.status_code == 503
    assert "it refused our key (HTTP 401): put the key it accepts in PEER_KEYS_FILE as " \
        "wrong=KEY" in refused.value.message
    assert not any(name.startswith("wrong/") for name in listed(swap, A_KEY))


def test_a_peer_that_stops_gets_a_clear_503_at_once(stacks: dict[str, Env]) -> None:
    b, swap = stacks["b"], stacks["llama-swap"]
    shown = swap.run("status", check=True).stdout  # each peer as the front sees it
    assert "peers:    3 (2 up)" in shown
    assert f"    b  {b.base_url}  up, 2 model(s)" in shown
    assert "    ol  http://" in shown and "  up, 1 model(s)" in shown
    assert f"    wrong  {b.base_url}  DOWN (0 model(s) listed, unavailable): it refused our " \
        "key (HTTP 401)" in shown
    b.run("stop", check=True)
    for engine in ENGINES:
        a = stacks[engine]
        started = time.monotonic()
        with pytest.raises(APIStatusError) as down:
            client(a).chat.completions.create(model=f"b/{GEMMA}", max_tokens=1,
                                              messages=[{"role": "user", "content": "Hi"}])
        assert down.value.status_code == 503
        assert f"peer b ({b.base_url}) is unavailable" in down.value.message
        assert down.value.response.json()["error"]["type"] == "peer_unavailable"
        assert time.monotonic() - started < 10  # not after a connect or request timeout
        with pytest.raises(ollama.ResponseError) as shaped:  # known down now: no connection
            ollama_client(a).chat(model=f"b/{GEMMA}", messages=[{"role": "user",
                                                                  "content": "Hi"}])
        assert shaped.value.status_code == 503 and "peer b" in shaped.value.error
        # Listed still, as unavailable; our own model serves as before.
        models = eventually(lambda a=a: (m := listed(a, A_KEY)) and
                            m[f"b/{GEMMA}"]["status"]["value"] == "unavailable" and m, 30)
        assert {GEMMA, f"b/{GEMMA}", f"b/{TWIN}"} <= set(models)
        reply = client(a).chat.completions.create(
            model=GEMMA, max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
        assert reply.usage.completion_tokens == 2
        assert f"peer b ({b.base_url}) is not answering" in a.run("list").stdout
        peers = {p["name"]: p for p in json.loads(a.run("status", "--json").stdout)["peers"]}
        assert peers["b"]["up"] is False and peers["b"]["models"] == 2
        assert "connect" in peers["b"]["problem"].lower()  # refused, or cannot connect
    # Another peer is not affected either.
    ollama_entry = listed(stacks["llama-swap"], A_KEY)[f"ol/{OLLAMA_MODEL}"]
    assert ollama_entry["status"]["value"] == "unknown"
    # Back: its models serve again, found by the next check.
    b.run("start", check=True)
    for engine in ENGINES:
        a = stacks[engine]
        eventually(lambda a=a: listed(a, A_KEY)[f"b/{GEMMA}"]["status"]["value"] !=
                   "unavailable", 30)
        reply = client(a).chat.completions.create(
            model=f"b/{GEMMA}", max_tokens=1, messages=[{"role": "user", "content": "Hi"}])
        assert reply.model == f"b/{GEMMA}" and reply.usage.completion_tokens == 1


# --- hostile peers: a stand-in server, following the OpenAI /v1/models contract -----------
class StandInPeer(ThreadingHTTPServer):
    """A stand-in for other servers (one per base path: /good, /drip, /huge, ...), each
    answering /v1/models, or a request for a model, as a broken or hostile OpenAI-compatible
    server would; the paths and keys of the requests answered well are kept in `seen`."""

    daemon_threads = True
    GOOD = {"object": "list", "data": [
        {"id": "m1", "object": "model"},
        {"id": "forged\nINFO a line of ours", "object": "model"},  # a newline: a forged log
        {"id": "\x1b]52;c;aGk=\x07clip", "object": "model"},  # sets a terminal's clipboard
        {"id": "x" * 5000, "object": "model"},
        {"id": "m2", "object": "model", "status": {"value": "\x1b[2Jloaded"}},
    ]}

    CHUNK = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m1",
             "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), StandInHandler)
        self.seen: list[tuple[str, str, str]] = []  # (method, path, Authorization)
        self.seen_via: list[str] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class StandInHandler(BaseHTTPRequestHandler):
    server: StandInPeer
    protocol_version = "HTTP/1.1"

    def log_message(self, *_args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        kind = self.path.split("/")[1]
        if self.path.startswith("/good/props?"):  # llama-server's (router's) /props?model=
            self.server.seen.append(("GET", self.path, self.headers.get("Authorization", "")))
            return self.answer(200, b'{"model_alias": "m1", "n_ctx": 4096}')
        if self.path != f"/{kind}/v1/models":
            return self.answer(404, b'{"error": "no such path"}')
        if kind in ("good", "flood", "silent", "stall", "moved", "cut", "vast", "refuse"):
            return self.answer(200, json.dumps(self.server.GOOD).encode())
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        piece = b' ' if kind == "drip" else b'{"id": "m", "object": "model"},' * 2000
        try:
            self.wfile.write(b'11\r\n{"data": [       \r\n')
            while True:  # forever: a byte every 0.3 s (drip), or megabytes a second (huge)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.flush()
                if kind == "drip":
                    time.sleep(0.3)
        except OSError:
            pass  # the reader gave up

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length", 0))
        self.rfile.read(length)
        if self.path.startswith("/flood/"):  # a stream that never ends an event, for ever
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            piece = b"x" * 65536
            try:
                self.wfile.write(b"6\r\ndata: \r\n")
                while True:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            except OSError:
                return
        if self.path.startswith("/silent/"):  # takes the request, never answers it
            time.sleep(60)
            return
        if self.path.startswith("/stall/"):  # a stream that stops after its first event
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            event = b"data: %s\n\n" % json.dumps(self.server.CHUNK).encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
            time.sleep(60)
            return
        if self.path.startswith("/cut/"):  # an answer that is not a stream stops half-way
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b'12\r\n{"object": "chat.c\r\n')
            self.wfile.flush()
            time.sleep(60)
            return
        if self.path.startswith(("/vast/", "/refuse/")):  # says 100 MiB, sends 1, then waits
            self.send_response(200 if self.path.startswith("/vast/") else 403)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(100 * 2**20))
            self.end_headers()
            with contextlib.suppress(OSError):
                self.wfile.write(b'{"error": "' + b"x" * 2**20)
                self.wfile.flush()
                time.sleep(60)
            return
        if self.path.startswith("/moved/"):  # its API moved, to an address of its own LAN
            self.send_response(307)
            self.send_header("Location", "http://10.1.2.3:5847/v1/chat/completions")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.server.seen.append(("POST", self.path, self.headers.get("Authorization", "")))
        self.server.seen_via.append(self.headers.get("Via", ""))
        self.answer(200, b'{"object": "chat.completion", "model": "m1", "choices": []}')

    def answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Env, Any, StandInPeer]]:
    """The real front (no engine behind it) whose peers are the stand-in's three servers."""
    peer = StandInPeer()
    threading.Thread(target=peer.serve_forever, daemon=True).start()
    env = new_env(tmp_path_factory.mktemp("hostile"))
    env.update({"PEERS": f"good={peer.url}/good,drip={peer.url}/drip,huge={peer.url}/huge,"
                f"flood={peer.url}/flood,silent={peer.url}/silent,stall={peer.url}/stall,"
                f"moved={peer.url}/moved,cut={peer.url}/cut,vast={peer.url}/vast,"
                f"refuse={peer.url}/refuse",
                "PEER_TIMEOUT": "30,silent=2,stall=2,cut=2,vast=20,refuse=20",
                "PEER_CHECK_INTERVAL": "2"})
    write_keys(env, "good=sk-for-good\n")
    try:
        with serve_front(env, cleanup_timeout=10) as (front, _runner):
            yield env, front, peer
    finally:
        peer.shutdown()


def post_chat(env: Env, model: str, path: str = "/v1/chat/completions") -> requests.Response:
    return requests.post(f"{env.base_url}{path}", timeout=30, json={
        "model": model, "messages": [{"role": "user", "content": "Hi"}]})


def test_a_peer_whose_list_drips_or_never_ends_is_down_within_the_check(
        hostile: tuple[Env, Any, StandInPeer]) -> None:
    """A list that drips a byte at a time, or streams megabytes for ever, marks its peer
    unavailable within CHECK_TIMEOUT (5 s) or LIST_MAX: it holds no request, no thread, no
    memory, and the other peers and `model list` go on."""
    env, front, _peer = hostile
    for name, said in (("drip", "did not arrive whole within 5s"), ("huge", "over 8 MiB")):
        reply = post_chat(env, f"{name}/m")
        assert reply.status_code == 503, reply.text
        assert f"peer {name} " in reply.json()["error"]["message"]
        assert said in reply.json()["error"]["message"]
    assert {"good/m1", "good/m2"} <= {m.name for m in front.peers.listing()}
    shown = env.run("list", timeout=60)
    assert "good/m1" in shown.stdout and "did not arrive whole within 5s" in shown.stdout


def test_a_peers_names_that_are_not_printable_text_are_left_out(
        hostile: tuple[Env, Any, StandInPeer]) -> None:
    env, front, _peer = hostile
    listed = eventually(lambda: front.peers.listing(), 20)
    assert [(m.name, m.state) for m in listed if m.peer == "good"] == [
        ("good/m1", "unknown"), ("good/m2", "unknown")]
    shown = env.run("list", "--json", timeout=60).stdout
    assert "\x1b" not in shown and "forged" not in shown and "x" * 300 not in shown


def test_a_peer_is_sent_only_what_any_client_may_ask_of_a_model(
        hostile: tuple[Env, Any, StandInPeer]) -> None:
    """The peer's key opens the peer's model paths to our clients, nothing more: a control
    path (the router's POST /v1/models downloads a model), a path the name rides on in the
    query, or any other path never reach it."""
    env, front, peer = hostile
    eventually(lambda: front.peers.listing(), 20)
    peer.seen.clear()
    for path in ("/v1/models", "/props", "/anything/else?model=good/m1"):
        reply = post_chat(env, "good/m1", path)
        assert reply.status_code != 200, (path, reply.text)  # ours answered (the engine's)
    reply = requests.post(f"{env.base_url}/v1/chat/completions?model=good/m1", timeout=30,
                          json={"messages": [{"role": "user", "content": "Hi"}]})
    assert reply.status_code != 200, reply.text
    assert peer.seen == []
    assert post_chat(env, "good/m1").status_code == 200
    assert peer.seen == [("POST", "/good/v1/chat/completions", "Bearer sk-for-good")]


def test_a_request_that_came_through_peers_is_not_forwarded_again(
        hostile: tuple[Env, Any, StandInPeer]) -> None:
    """What we send a peer says so (Via); a request that came so is never sent to a peer
    again: a peer URL that is our own port (or two servers' stale lists) would loop, each
    hop a connection more, until the port is full."""
    env, front, peer = hostile
    eventually(lambda: front.peers.listing(), 20)
    peer.seen.clear()
    peer.seen_via.clear()
    assert post_chat(env, "good/m1").status_code == 200
    assert peer.seen_via == ["1.1 model_serve"]
    looped = requests.post(f"{env.base_url}/v1/chat/completions", timeout=30,
                           headers={"Via": "1.1 proxy.lan, 1.1 model_serve"},
                           json={"model": "good/m1", "messages": []})
    assert looped.status_code == 508 and looped.json()["error"]["type"] == "peer_loop"
    assert len(peer.seen) == 1


def test_a_peers_stream_without_an_events_end_is_not_held(
        hostile: tuple[Env, Any, StandInPeer]) -> None:
    """A peer that streams for ever without an event's end (\\n\\n): the front holds at most
    EVENT_MAX of it (to rename whole events) and sends the rest on, so the client gets it as
    it comes and the front's memory does not grow with it."""
    env, front, _peer = hostile
    eventually(lambda: any(m.peer == "flood" for m in front.peers.listing()), 20)
    with requests.post(f"{env.base_url}/v1/chat/completions", timeout=30, stream=True, json={
            "model": "flood/m1", "stream": True, "messages": []}) as reply:
        assert reply.status_code == 200
        got = 0
        for chunk in reply.iter_content(65536):
            got += len(chunk)
            if got > 8 * 2**20:
                break
    assert got > 8 * 2**20


def test_a_peer_that_never_answers_gets_a_504_naming_it(
        hostile: tuple[Env, Any, StandInPeer]) -> None:
    """It takes the request and sends nothing: after its PEER_TIMEOUT (2 s for it here) the
    client gets a 504 naming it, not a wait for ever; it is not marked down (it may be busy)."""
    env, front, _peer = hostile
    eventually(lambda: any(m.peer == "silent" for m in front.peers.listing()), 20)
    reply = post_chat(env, "silent/m1")
    assert reply.status_code == 504, reply.text
    error = reply.json()["error"]
    assert error["type"] == "peer_timeout"
    assert "the peer silent" in error["message"] and "for 2s (PEER_TIMEOUT)" in error["message"]
    assert front.peers.states["silent"].up


def test_ollamas_api_gets_the_504_and_a_stalled_stream_ends_with_an_error(
        hostile: tuple[Env, Any, StandInPeer]) -> None:
    """The same through Ollama's API (translated for the peer), with the real ollama client."""
    env, front, _peer = hostile
    eventually(lambda: {"silent", "stall"} <= {m.peer for m in front.peers.listing()}, 20)
    said = ollama.Client(host=env.base_url, timeout=30)
    with pytest.raises(ollama.ResponseError) as silent:
        said.chat(model="silent/m1", messages=[{"role": "user", "content": "Hi"}])
    assert silent.value.status_code == 504 and "the peer silent" in silent.value.error
    got = []
    with pytest.raises(ollama.ResponseError):
        for part in said.chat(model="stall/m1", stream=True,
                              messages=[{"role": "user", "content": "Hi"}]):
            got.append(part.message.content)
    assert got == ["Hi"]


def test_a_peers_stream_that_stalls_ends_with_an_error_the_client_sees(
        hostile: tuple[Env, Any, StandInPeer]) -> None:
    """One event, then silence: the stream ends with an error event after PEER_TIMEOUT, which
    the real openai client raises (not its own read timeout, nor a wait for ever)."""
    from openai import APIError, APITimeoutError

    env, front, _peer = hostile
    eventually(lambda: any(m.peer == "stall" for m in front.peers.listing()), 20)
    openai = OpenAI(base_url=f"{env.base_url}/v1", api_key="none", max_retries=0, timeout=30)
    got = []
    with pytest.raises(APIError) as failed:
        for chunk in openai.chat.completions.create(
                model="stall/m1", stream=True, messages=[{"role": "user", "content": "Hi"}]):
            got.append(chunk.choices[0].delta.content)
    assert not isinstance(failed.value, APITimeoutError)
    assert got == ["Hi"]
    assert "the peer stall" in failed.value.message
    assert "stopped sending its answer for 2s" in failed.value.message


def test_a_peers_answer_that_stalls_half_way_is_cut_short(
        hostile: tuple[Env, Any, StandInPeer]) -> None:
    """Not a stream (chunked JSON), begun and then silent: after PEER_TIMEOUT the client's
    connection ends without the body's end, so it sees the answer broken, not a wait for ever
    nor an answer that looks whole."""
    env, front, _peer = hostile
    eventually(lambda: any(m.peer == "cut" for m in front.peers.listing()), 20)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        post_chat(env, "cut/m1")


def test_a_peers_redirect_is_neither_followed_nor_passed_on(
        hostile: tuple[Env, Any, StandInPeer]) -> None:
    """It could send our client anywhere, and its Location names the peer's LAN: a 502
    naming the peer and its status instead, with no Location."""
    env, front, _peer = hostile
    eventually(lambda: any(m.peer == "moved" for m in front.peers.listing()), 20)
    reply = requests.post(f"{env.base_url}/v1/chat/completions", timeout=30,
                          allow_redirects=False,
                          json={"model": "moved/m1", "messages": []})
    assert reply.status_code == 502, reply.text
    assert "Location" not in reply.headers and "10.1.2.3" not in reply.text
    error = reply.json()["error"]
    assert error["type"] == "peer_refused"
    assert "the peer moved" in error["message"] and "HTTP 307" in error["message"]


def test_our_models_are_marked_unavailable_beside_the_peers_while_our_engine_is_down(
        hostile: tuple[Env, Any, StandInPeer], gemma_path: Path,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """A front whose engine config serves the gemma model, and no engine running (as between
    a crash and its restart): /v1/models lists ours as unavailable, and the peer's."""
    from model_serve.engines import select_engine
    from model_serve.runtime.sync import build_current_plan

    _env, _front, peer = hostile
    env = new_env(tmp_path_factory.mktemp("engine-down"))
    env["PEERS"] = f"good={peer.url}/good"
    (env.models / gemma_path.name).symlink_to(gemma_path)
    settings = load_settings(dict(env))
    engine = select_engine(settings)
    engine.write_config(build_current_plan(settings, engine)[1])
    with serve_front(env, cleanup_timeout=10) as (front, _runner):
        eventually(lambda: front.peers.listing(), 20)
        reply = requests.get(f"{env.base_url}/v1/models", timeout=30)
    assert reply.status_code == 200, reply.text
    states = {m["id"]: m["status"]["value"] for m in reply.json()["data"]}
    assert states[GEMMA] == "unavailable"
    assert {"good/m1", "good/m2"} <= set(states)


def test_the_peers_models_are_listed_while_our_engine_is_down(
        hostile: tuple[Env, Any, StandInPeer]) -> None:
    """This front has no engine behind it (as while ours starts or restarts): /v1/models
    still lists the peers' models, and they are served, rather than a 503 for the list."""
    env, front, peer = hostile
    eventually(lambda: front.peers.listing(), 20)
    reply = requests.get(f"{env.base_url}/v1/models", timeout=30)
    assert reply.status_code == 200, reply.text
    listed = {m["id"]: m for m in reply.json()["data"]}
    assert {"good/m1", "good/m2", "silent/m1"} <= set(listed)
    assert listed["good/m1"]["meta"]["llamaswap"] == {"type": "peer", "peerID": "good"}
    assert post_chat(env, "good/m1").status_code == 200


def test_a_peers_props_are_read_and_its_upstream_refused(
        hostile: tuple[Env, Any, StandInPeer]) -> None:
    """GET /props?model=<peer>/<model> reads the peer's /props for its own name (and nothing
    else of the query); /upstream/<peer>/... is refused by name, never sent on: a peer's model
    servers are its own, and its key may open paths there that our client's does not here."""
    env, front, peer = hostile
    eventually(lambda: front.peers.listing(), 20)
    peer.seen.clear()
    reply = requests.get(f"{env.base_url}/props", timeout=30,
                         params={"model": "good/m1", "autoload": "false"})
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"model_alias": "m1", "n_ctx": 4096}
    assert peer.seen == [("GET", "/good/props?model=m1", "Bearer sk-for-good")]
    for path in ("/upstream/good/m1/props", "/upstream/good/m1/health"):
        refused = requests.get(f"{env.base_url}{path}", timeout=30)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["type"] == "peer_model"
        assert "good/... is a peer's model (PEERS)" in refused.json()["error"]["message"]
    assert requests.get(f"{env.base_url}/props", timeout=30,
                        params={"model": "good/nothing"}).status_code == 404
    assert len(peer.seen) == 1


def test_the_front_reports_each_peer_up_or_down_with_the_reason(
        hostile: tuple[Env, Any, StandInPeer]) -> None:
    """What `model status` and the dashboard show: each peer's URL, up or down with the
    reason, and how many models it serves here; read without an engine."""
    env, front, peer = hostile
    eventually(lambda: front.peers.states["drip"].checked and
               front.peers.states["good"].checked, 20)
    reply = requests.get(f"{env.base_url}/api/model_serve/peers", timeout=30)
    assert reply.status_code == 200, reply.text
    peers = {p["name"]: p for p in reply.json()["peers"]}
    assert peers["good"] == {"name": "good", "url": f"{peer.url}/good", "up": True,
                             "problem": "", "models": 2, "timeout": 30,
                             "checked": peers["good"]["checked"]}
    assert peers["good"]["checked"] > 0 and peers["silent"]["timeout"] == 2
    assert peers["drip"]["up"] is False and peers["drip"]["models"] == 0
    assert "did not arrive whole within 5s" in peers["drip"]["problem"]


def test_the_dashboard_shows_each_peer(hostile: tuple[Env, Any, StandInPeer],
                                       browser: Any) -> None:
    """The page, in a real Chromium, lists each peer with its URL, up or down with the
    reason, and its models; from a front whose own engine is down (the peers serve anyway)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    env, front, peer = hostile
    eventually(lambda: all(s.checked for s in front.peers.states.values()), 20)
    browser.get(f"{env.base_url}/dashboard")

    def rows() -> list[list[str]] | None:
        return browser.execute_script(
            "return [...document.querySelectorAll('#peers tbody tr')]"
            ".map(r => [r.dataset.up, ...[...r.cells].map(c => c.textContent)]);") or None

    shown = WebDriverWait(browser, 30, 0.2).until(lambda _d: rows(), "the peers' rows")
    by_name = {r[1]: r for r in shown}
    assert set(by_name) == set(front.peers.states)
    assert by_name["good"][:5] == ["true", "good", f"{peer.url}/good", "up", "2"]
    assert by_name["drip"][0] == "false" and by_name["drip"][4] == "0"
    assert by_name["drip"][3].startswith("down") and "within 5s" in by_name["drip"][3]
    assert browser.find_element(By.ID, "peers-section").is_displayed()


def test_a_peers_vast_answer_is_never_held_whole(
        hostile: tuple[Env, Any, StandInPeer]) -> None:
    """A peer that says its answer is 100 MiB (and sends it slowly): a refusal is read for its
    first 64 KiB only, and an answer past 64 MiB goes on as it comes instead of being held
    whole to rename its model; neither waits for the rest."""
    env, front, _peer = hostile
    eventually(lambda: {"refuse", "vast"} <= {m.peer for m in front.peers.listing()}, 20)
    began = time.monotonic()
    refused = post_chat(env, "refuse/m1")
    assert refused.status_code == 502 and "peer_refused" in refused.text, refused.text
    assert time.monotonic() - began < 10
    began = time.monotonic()
    with requests.post(f"{env.base_url}/v1/chat/completions", timeout=10, stream=True, json={
            "model": "vast/m1", "messages": [{"role": "user", "content": "Hi"}]}) as answer:
        assert answer.status_code == 200
        assert len(answer.raw.read(2**20)) == 2**20
    assert time.monotonic() - began < 10
