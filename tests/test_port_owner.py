"""The port answers to its owner, on both engines (the llama-server router and the real
llama-swap) with the real gemma model: other web origins and other host names are refused,
the control endpoints need the admin key and POST, /slots is closed, paths are routed as
normalized, models named in a query or a multipart body go through the front's names and
admission, and one hold's release releases that hold only."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl

import pytest
import requests

from model_serve.config.settings import load_settings
from model_serve.runtime import model_field
from model_serve.runtime.gate import Access, Gate, access_of, normalized_path
from model_serve.runtime.procs import wait_until
from tests.conftest import TWIN, Env, running
from tests.test_engines import models, states

A, B = "ls/gemma-3:270m-q4_k_m", "ls/g2"
A_DASH = "ls/gemma-3-270m-q4_k_m"
KEY, ADMIN = "sk-client", "sk-admin"
APP = "http://app.example:3000"


@pytest.fixture
def owned(engine_env: Env, gemma_path: Path) -> Iterator[Env]:
    """A stack with a client key, an admin key, one allowed web origin and one LAN name."""
    env = engine_env
    env.update({"API_KEYS": KEY, "ADMIN_KEYS": ADMIN, "CORS_ORIGINS": APP,
                "ALLOWED_HOSTS": "studio.lan"})
    (env.models / gemma_path.name).symlink_to(gemma_path)
    (env.home / "custom_models.yaml").write_text(TWIN)
    with running(env, stop_timeout=90):
        yield env


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def complete(env: Env, model: str, key: str = KEY, **headers: str) -> requests.Response:
    return requests.post(f"{env.base_url}/v1/completions", timeout=120,
                         headers={**auth(key), **headers},
                         json={"model": model, "prompt": "Hello", "max_tokens": 1})


def raw(env: Env, method: str, target: str, body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """A request whose path is sent exactly as written (clients collapse dots themselves)."""
    conn = http.client.HTTPConnection("127.0.0.1", env.port, timeout=120)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def activity(env: Env) -> dict[str, dict]:
    return requests.get(f"{env.base_url}/api/model_serve/activity", headers=auth(KEY),
                        timeout=10).json()


# --- the rules on their own ------------------------------------------------------------------
def test_paths_are_normalized() -> None:
    assert normalized_path("/x/../v1/chat/completions") == "/v1/chat/completions"
    assert normalized_path("/upstream/A/../B/slots") == "/upstream/B/slots"
    assert normalized_path("//v1//models/") == "/v1/models/"
    assert normalized_path("/../../health") == "/health"
    assert normalized_path("/v1/chat/completions") == "/v1/chat/completions"


def test_what_each_path_needs() -> None:
    assert access_of("GET", "/health", {}) is Access.PUBLIC
    assert access_of("POST", "/v1/chat/completions", {}) is Access.CLIENT
    assert access_of("GET", "/upstream/ls/a/health", {}) is Access.CLIENT
    for path in ("/slots", "/slots/0", "/upstream/ls/a/slots", "/upstream/ls/a/slots/1"):
        assert access_of("GET", path, {}) is Access.SECRET, path
        assert access_of("POST", path, {"action": "save"}) is Access.SECRET, path
    for method, path, query in [
            ("POST", "/unload", {}), ("GET", "/unload", {}), ("POST", "/api/models/unload", {}),
            ("POST", "/api/models/unload/ls/a", {}), ("POST", "/models/load", {}),
            ("POST", "/models/unload", {}), ("GET", "/models", {"reload": "1"}),
            ("POST", "/api/model_serve/hold", {}), ("POST", "/api/model_serve/release", {}),
            ("POST", "/api/inflight/3/cancel", {}), ("GET", "/api/captures/3", {}),
            ("GET", "/logs", {}), ("GET", "/logs/stream", {}), ("POST", "/props", {}),
            ("POST", "/upstream/ls/a/props", {})]:
        assert access_of(method, path, query) is Access.CONTROL, (method, path)


def test_host_names_and_origins(env: Env) -> None:
    env.update({"ALLOWED_HOSTS": "studio.lan,docker.internal:17311", "CORS_ORIGINS": APP})
    gate = Gate(load_settings(dict(env)), "own")
    for host in ("localhost:5847", "127.0.0.1:5847", "[::1]:5847", "192.168.1.20:5847",
                 "studio.lan:5847", "STUDIO.LAN", "docker.internal:5847", None):
        assert gate.host_allowed(host), host
    for host in ("evil.example:5847", "attacker.localhost.evil.example", "studio.lan.evil"):
        assert not gate.host_allowed(host), host
    assert gate.origin_allowed(APP, "127.0.0.1:5847")
    assert gate.origin_allowed("http://127.0.0.1:5847", "127.0.0.1:5847")  # the port's own
    assert not gate.origin_allowed("http://evil.example", "127.0.0.1:5847")
    assert not gate.origin_allowed("null", "127.0.0.1:5847")
    assert gate.cross_site({"Sec-Fetch-Site": "cross-site"}, "127.0.0.1:5847")
    assert not gate.cross_site({"Sec-Fetch-Site": "none"}, "127.0.0.1:5847")
    assert not gate.cross_site({}, "127.0.0.1:5847")  # curl, the SDKs


def test_the_model_a_form_or_multipart_body_or_query_names() -> None:
    def rename(name: str) -> str | None:
        return {"ls/b": "ls-b"}.get(name)

    body, sent, engine_id = model_field.in_body(
        b"model=ls%2Fb&prompt=hi+there", "application/x-www-form-urlencoded", rename)
    assert (sent, engine_id) == ("ls/b", "ls-b")
    assert dict(parse_qsl(body.decode())) == {
        "model": "ls-b", "prompt": "hi there"}
    audio = bytes(range(256)) * 4
    multipart = (b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
                 b"Content-Type: audio/wav\r\n\r\n" + audio + b"\r\n--XyZ\r\n"
                 b"Content-Disposition: form-data; name=\"model\"\r\n\r\nls/b\r\n--XyZ--\r\n")
    body, sent, engine_id = model_field.in_body(
        multipart, "multipart/form-data; boundary=XyZ", rename)
    assert (sent, engine_id) == ("ls/b", "ls-b")
    assert body == multipart.replace(b"\r\n\r\nls/b\r\n", b"\r\n\r\nls-b\r\n")
    assert audio in body
    query, sent, engine_id = model_field.in_query([("model", "ls/b"), ("autoload", "false")],
                                                  rename)
    assert query == "model=ls-b&autoload=false" and engine_id == "ls-b"
    assert model_field.in_query([("model", "other")], rename) == (None, "other", None)
    # JSON after blanks or a byte-order mark is JSON; a second "model" is refused.
    for start in (b"\n  ", b"\xef\xbb\xbf"):
        assert model_field.in_body(start + b'{"model": "ls/b"}', "text/plain", rename)[2] == \
            "ls-b"
    with pytest.raises(model_field.BadBody, match="more than once"):
        model_field.in_body(b'{"model": "ls/b", "model": "x"}', "application/json", rename)
    extended = multipart.replace(b'name="model"', b"name*=UTF-8''model")
    assert model_field.in_body(extended, "multipart/form-data; boundary=XyZ", rename)[2] == \
        "ls-b"


# --- the port, on both engines ---------------------------------------------------------------
def test_browsers_of_other_sites_and_other_host_names(owned: Env) -> None:
    base = owned.base_url
    evil = "http://evil.example"
    # A page of another site: refused, and no origin echoed (the engines allow any).
    answer = requests.get(f"{base}/v1/models", headers={**auth(KEY), "Origin": evil},
                          timeout=10)
    assert answer.status_code == 403
    assert "Access-Control-Allow-Origin" not in answer.headers
    assert complete(owned, A, Origin=evil).status_code == 403
    image = requests.get(f"{base}/v1/models", timeout=10,
                         headers={**auth(KEY), "Sec-Fetch-Site": "cross-site"})
    assert image.status_code == 403
    # Ollama's paths the same way, in its error shape, and with no origin echoed.
    for method, path in [("POST", "/api/chat"), ("POST", "/api/pull"), ("GET", "/api/tags"),
                         ("GET", "/")]:
        answer = requests.request(method, base + path, timeout=10, json={"model": A},
                                  headers={**auth(ADMIN), "Origin": evil})
        assert answer.status_code == 403 and "error" in answer.json(), path
        assert "Access-Control-Allow-Origin" not in answer.headers
    # The listed origin: its preflight answered without a key, its requests allowed.
    preflight = requests.options(f"{base}/v1/chat/completions", timeout=10, headers={
        "Origin": APP, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == APP
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"].lower()
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    refused = requests.options(f"{base}/v1/chat/completions", timeout=10, headers={
        "Origin": evil, "Access-Control-Request-Method": "POST"})
    assert refused.status_code == 403 and "Access-Control-Allow-Origin" not in refused.headers
    allowed = complete(owned, A, Origin=APP)
    assert allowed.status_code == 200
    assert allowed.headers["Access-Control-Allow-Origin"] == APP
    assert complete(owned, A).headers.get("Access-Control-Allow-Origin") is None  # curl, SDKs
    # DNS rebinding: a name that is not ours is refused; ours pass.
    status, _ = raw(owned, "GET", "/v1/models", headers={**auth(KEY), "Host": "evil.example"})
    assert status == 403
    for host in ("localhost", f"localhost:{owned.port}", "studio.lan", f"127.0.0.1:{owned.port}"):
        status, _ = raw(owned, "GET", "/v1/models", headers={**auth(KEY), "Host": host})
        assert status == 200, host


def test_control_endpoints_need_the_admin_key_and_post(owned: Env) -> None:
    base = owned.base_url
    assert complete(owned, A).status_code == 200
    assert complete(owned, B).status_code == 200
    # A client key reads and chats, but does not unload, load, reload or read slots.
    for method, path in [("POST", f"/api/models/unload/{B}"), ("POST", f"/unload?model={B}"),
                         ("GET", "/unload"), ("POST", "/api/model_serve/release"),
                         ("POST", "/api/model_serve/hold"), ("GET", "/logs")]:
        answer = requests.request(method, base + path, headers=auth(KEY), timeout=30)
        assert answer.status_code == 403, (method, path, answer.text)
    assert states(owned) == {A: "loaded", B: "loaded"}
    # Never on GET, whatever the key (an <img> could send one).
    for path in ("/api/models/unload", f"/api/models/unload/{B}", "/models?reload=1"):
        answer = requests.get(base + path, headers=auth(ADMIN), timeout=30)
        assert answer.status_code == 405, (path, answer.text)
    assert states(owned) == {A: "loaded", B: "loaded"}
    # /slots shows prompts: closed to clients, however the path is written.
    slot_paths = [f"/upstream/{A}/slots", f"/upstream/x/../{A}/slots", "/slots?model=" + A,
                  f"/upstream/{A}/slots/0?action=save"]
    for path in slot_paths:
        status, body = raw(owned, "GET" if "action" not in path else "POST", path,
                           headers=auth(KEY))
        assert status == 403, (path, body)
    status, body = raw(owned, "GET", f"/upstream/{A}/slots", headers=auth(ADMIN))
    assert status == 200 and isinstance(json.loads(body), list)
    # The admin key unloads, through the save of its conversations.
    answer = requests.post(f"{base}/api/models/unload/{B}", headers=auth(ADMIN), timeout=60)
    assert answer.status_code == 200
    assert wait_until(lambda: states(owned)[B] == "unloaded", 30)
    assert requests.get(f"{base}/logs", headers=auth(ADMIN), timeout=10).status_code in (200, 404)
    if owned["ENGINE"] == "llama-swap":
        cancel = requests.post(f"{base}/api/inflight/1/cancel", headers=auth(KEY), timeout=10)
        assert cancel.status_code == 403
    assert requests.get(f"{base}/api/events", headers=auth(KEY), timeout=10).status_code == 403
    # No other method acts on control endpoints; the router's downloads and deletes of model
    # files are not served.
    for method, path in [("OPTIONS", "/api/models/unload"), ("HEAD", "/unload"),
                         ("DELETE", "/api/models/unload"), ("POST", "/models"),
                         ("DELETE", "/models?model=x/y")]:
        answer = requests.request(method, base + path, headers=auth(ADMIN), timeout=30,
                                  json={"model": "ggml-org/x"} if method == "POST" else None)
        assert answer.status_code == 405, (method, path, answer.text)
    assert states(owned)[A] == "loaded"
    # Ollama's API: the ollama library with the client key (its headers) lists and chats;
    # without a key, or with the client key for pull and delete, Ollama's error shape.
    import ollama

    lib = ollama.Client(host=base, headers=auth(KEY), timeout=120)
    assert A in {m.model for m in lib.list().models}
    assert lib.chat(model=A, messages=[{"role": "user", "content": "Hi"}], stream=False,
                    options={"num_predict": 1}).done
    bare = requests.get(f"{base}/api/tags", timeout=10)
    assert bare.status_code == 401 and "API key" in bare.json()["error"]
    for method, path in [("POST", "/api/pull"), ("DELETE", "/api/delete")]:
        answer = requests.request(method, base + path, headers=auth(KEY), timeout=30,
                                  json={"model": "x"})
        assert answer.status_code == 403 and "ADMIN_KEYS" in answer.json()["error"]
    # keep_alive holds or unloads a model for every client: with ADMIN_KEYS, the client key's
    # is not honoured (`ollama stop` is refused), the admin key's is.
    stop = requests.post(f"{base}/api/generate", headers=auth(KEY), timeout=60,
                         json={"model": A, "prompt": "", "keep_alive": 0})
    assert stop.status_code == 403 and "ADMIN_KEYS" in stop.json()["error"]
    pinned = lib.generate(model=A, prompt="Hi", keep_alive=-1, options={"num_predict": 1})
    assert pinned.done and activity(owned)[A]["keep_alive"] is None
    assert states(owned)[A] == "loaded"
    admin = ollama.Client(host=base, headers=auth(ADMIN), timeout=120)
    assert admin.generate(model=A, prompt="", keep_alive=0).done_reason == "unload"
    assert wait_until(lambda: states(owned)[A] == "unloaded", 30)
    # The key model_serve sends behind the front does not open the front; the owner's does.
    engine_key = (owned.state / "internal-key").read_text().strip()
    owner_key = (owned.state / "owner-key").read_text().strip()
    assert raw(owned, "GET", f"/upstream/{A}/slots", headers=auth(engine_key))[0] == 403
    assert raw(owned, "GET", f"/upstream/{A}/slots", headers=auth(owner_key))[0] == 200


def test_paths_queries_and_holds(both: Env) -> None:
    env, base = both, both.base_url
    # A path with dots goes through the names, admission and accounting as its plain form.
    status, body = raw(env, "POST", "/x/../v1/completions",
                       json.dumps({"model": A_DASH, "prompt": "Hi", "max_tokens": 1}).encode(),
                       {"Content-Type": "application/json"})
    assert status == 200 and json.loads(body)["model"] == A_DASH, body
    assert activity(env)[A]["requests"] == 1
    # A lone surrogate in a body the front renames: a bad request, not a server error.
    renamed = A if env["ENGINE"] == "llama-server" else A_DASH
    status, body = raw(env, "POST", "/v1/completions",
                       b'{"model": "%s", "prompt": "\\ud83d", "max_tokens": 1}'
                       % renamed.encode(), {"Content-Type": "application/json"})
    assert status == 400 and b"surrogate" in body, body
    # Blanks before the JSON, two names for one request, a name the router does not serve.
    status, body = raw(env, "POST", "/v1/completions",
                       b'\n {"model": "%s", "prompt": "Hi", "max_tokens": 1}' % A.encode(),
                       {"Content-Type": "text/plain"})
    assert status == 200 and activity(env)[A]["requests"] == 2, body
    for target, payload in [
            ("/v1/completions", b'{"model": "%s", "model": "%s"}' % (A.encode(), B.encode())),
            (f"/v1/completions?model={B}", b'{"model": "%s"}' % A.encode()),
            (f"/props?model={A}&model={B}", None)]:
        status, body = raw(env, "POST" if payload else "GET", target, payload,
                           {"Content-Type": "application/json"})
        assert status == 400, (target, body)
    if env["ENGINE"] == "llama-server":
        status, body = raw(env, "POST", "/v1/completions", b'{"model": "org/cached:Q4"}',
                           {"Content-Type": "application/json"})
        assert status == 404 and b"model list" in body, body
        # A GET reaches the router without its (form) body, which it would read.
        raw(env, "GET", "/props", b"model=" + B.encode(),
            {"Content-Type": "application/x-www-form-urlencoded"})
        assert states(env)[B] == "unloaded"
    else:  # llama-swap's versionless paths are named requests too
        status, body = raw(env, "POST", "/v/completions",
                           json.dumps({"model": A_DASH, "prompt": "Hi",
                                       "max_tokens": 1}).encode(),
                           {"Content-Type": "application/json"})
        assert activity(env)[A]["requests"] == 3, body
    # A model named in the query (the router's per-model GETs) or in a multipart body.
    status, body = raw(env, "GET", f"/props?model={B}")
    assert activity(env)[B]["requests"] == 1
    if env["ENGINE"] == "llama-server":
        assert status == 200 and states(env)[B] == "loaded", body
    requests.post(f"{base}/unload", params={"model": B}, timeout=60)
    assert wait_until(lambda: states(env)[B] == "unloaded", 30)
    files = {"file": ("a.wav", b"RIFF" + bytes(64), "audio/wav")}
    requests.post(f"{base}/v1/audio/transcriptions", data={"model": B}, files=files,
                  timeout=120)
    assert activity(env)[B]["requests"] == 2
    assert wait_until(lambda: states(env)[B] == "loaded", 30), states(env)
    # The router's own load goes through admission (the front answers once it is loaded).
    assert requests.post(f"{base}/unload", params={"model": A}, timeout=60).status_code == 200
    assert wait_until(lambda: states(env)[A] == "unloaded", 30)
    if env["ENGINE"] == "llama-server":
        loaded = requests.post(f"{base}/models/load", json={"model": A}, timeout=120)
        assert loaded.status_code == 200 and states(env)[A] == "loaded", loaded.text
    # Two holds: releasing one leaves the other in place.
    engine_ids = {name: m.name for name, m in models(env).items()}
    first = requests.post(f"{base}/api/model_serve/hold", timeout=30,
                          json={"models": [engine_ids[A]], "drain_seconds": 1}).json()["hold"]
    second = requests.post(f"{base}/api/model_serve/hold", timeout=30,
                           json={"models": [engine_ids[B]], "drain_seconds": 1}).json()["hold"]
    done: dict[str, float] = {}

    def ask(model: str) -> None:
        complete(env, model)
        done[model] = time.monotonic()

    threads = [threading.Thread(target=ask, args=(m,)) for m in (A, B)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    released = requests.post(f"{base}/api/model_serve/release", json={"hold": first},
                             timeout=10)
    assert released.status_code == 200 and released.json()["released"] == [engine_ids[A]]
    assert wait_until(lambda: A in done, 60)
    time.sleep(1.0)
    assert B not in done  # still held by the other hold
    requests.post(f"{base}/api/model_serve/release", json={"hold": second}, timeout=10)
    for thread in threads:
        thread.join(timeout=60)
    assert B in done
    assert requests.post(f"{base}/api/model_serve/release", json={"hold": second},
                         timeout=10).status_code == 404


def test_prompts_never_reach_the_log(both: Env) -> None:
    secret = "My bank PIN is 4321, the marker word is quetzalcoatl"
    answer = requests.post(f"{both.base_url}/v1/chat/completions", timeout=120, json={
        "model": A, "max_tokens": 4, "messages": [{"role": "user", "content": secret}]})
    assert answer.status_code == 200
    # The dashboard records the request (status, tokens) on either engine, never its words.
    seen = requests.get(f"{both.base_url}/api/model_serve/requests", timeout=10)
    assert "quetzalcoatl" not in seen.text
    [record] = seen.json()["done"]
    assert record["model"] == A and record["status"] == 200 and record["predicted_tokens"] == 4
    requests.post(f"{both.base_url}/unload", params={"model": A}, timeout=60)
    logs = list((both.state / "logs").glob("*"))
    assert logs
    for log_file in logs:
        assert "quetzalcoatl" not in log_file.read_text(errors="replace"), log_file
    tail = requests.get(f"{both.base_url}/api/model_serve/log?lines=200", timeout=10)
    assert tail.status_code == 200 and tail.json()["lines"] and "quetzalcoatl" not in tail.text
    # Its load and unload buttons' endpoints work on either engine.
    assert requests.post(f"{both.base_url}/api/model_serve/load", json={"model": B},
                         timeout=120).status_code == 200
    assert states(both)[B] == "loaded"
    assert requests.post(f"{both.base_url}/api/models/unload/{B}", timeout=60).ok
    assert wait_until(lambda: states(both)[B] == "unloaded", 30)
    status = requests.get(f"{both.base_url}/api/model_serve/status", timeout=30).json()
    assert {m["name"]: m["state"] for m in status["models"]} == {A: "unloaded", B: "unloaded"}


def test_a_lone_surrogate_is_a_bad_request() -> None:
    body = b'{"model": "ls/b", "prompt": "\\ud83d"}'
    with pytest.raises(model_field.BadBody, match="lone surrogate"):
        model_field.in_body(body, "application/json", lambda name: "ls-b")
