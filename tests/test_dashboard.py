"""The dashboard (`/dashboard`) and its endpoints, on one real stack with API_KEYS set, and
the page itself in a real Chromium (Debian's, driven by selenium; ./install.sh --dev
installs both)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from openai import APIStatusError, OpenAI

from tests.conftest import Env, new_env, running

KEY = "dash-key"
HOSTILE = "<img src=x onerror=document.title='pwned'>"  # a model name from a user's file
A = "ls/gemma-3:270m-q4_k_m"
B = "ls/g2"
C = f"ls/{HOSTILE}"
PROMPT = [{"role": "user", "content": "Say hi"}]
# Long enough for a saved conversation to be restored for it (slot_cache.MIN_SHARED_CHARS).
STORY = [{"role": "user", "content": "".join(f"Line {i}: a lighthouse.\n" for i in range(8))}]
SCREENSHOTS = Path(os.environ.get("DASHBOARD_SCREENSHOTS", "")) if os.environ.get(
    "DASHBOARD_SCREENSHOTS") else None


@pytest.fixture(scope="module", params=["llama-server", "llama-swap"])
def dash(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
         gemma_path: Path) -> Iterator[Env]:
    """One stack per engine for the whole module (the page must work on both)."""
    env = new_env(tmp_path_factory.mktemp("dashboard"))
    if request.param == "llama-swap":
        from tests.test_llama_swap import llama_swap_binary, port_block

        env.port = port_block()
        env.update({"ENGINE": "llama-swap", "LLAMA_SWAP_PORT": str(env.port),
                    "LLAMA_SWAP_BIN": str(llama_swap_binary(tmp_path_factory.mktemp("swap")))})
    (env.models / "google").mkdir()
    (env.models / "google" / gemma_path.name).symlink_to(gemma_path)
    twin = {"base_model": "gemma-3:270m-q4_k_m"}
    (env.home / "custom_models.yaml").write_text(
        yaml.safe_dump({"models": {"g2": twin, HOSTILE: twin}}))
    env.update({"API_KEYS": KEY})
    with running(env, stop_timeout=90):
        yield env


def keyed(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def status_of(env: Env) -> dict[str, Any]:
    answer = requests.get(f"{env.base_url}/api/model_serve/status", headers=keyed(), timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def model_in(status: dict[str, Any], name: str) -> dict[str, Any]:
    return next(m for m in status["models"] if m["name"] == name)


def wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# --- over HTTP --------------------------------------------------------------------------------
def test_the_page_is_served_with_a_strict_policy(dash: Env) -> None:
    page = requests.get(f"{dash.base_url}/dashboard", timeout=10)  # no key: the page asks
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "default-src 'none'" in policy and "unsafe-inline" not in policy
    assert page.headers["X-Frame-Options"] == "DENY"
    scripts = re.findall(r"<script[^>]*>", page.text)
    assert scripts and all("src=" in s for s in scripts)  # no inline script
    assert "style=" not in page.text and "<style" not in page.text
    for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        part = requests.get(f"{dash.base_url}/dashboard/{name}", timeout=10)
        assert part.status_code == 200 and part.headers["Content-Type"].startswith(kind)
        assert part.headers["X-Content-Type-Options"] == "nosniff"
    script = requests.get(f"{dash.base_url}/dashboard/dashboard.js", timeout=10).text
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script
    assert "EventSource" not in script  # it cannot send a key in a header
    # Only the page's files are open: anything else under /dashboard/ is not served, and
    # reaches nothing behind the front.
    assert requests.get(f"{dash.base_url}/dashboard/../v1/models", timeout=10).status_code == 401
    for path in ("/dashboard/slots", "/dashboard/x/../../v1/models", "/dashboard/health"):
        assert requests.get(f"{dash.base_url}{path}", timeout=10).status_code in (401, 404)
    other = requests.get(f"{dash.base_url}/dashboard/metrics", timeout=10)
    assert other.status_code == 404 and "open /dashboard" in other.text
    # A link to the page on another site (a top-level navigation) opens it; nothing else
    # answers another site's browser: not its endpoints, not a fetch of the page, not a frame.
    link = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate",
            "Sec-Fetch-Dest": "document"}
    opened = requests.get(f"{dash.base_url}/dashboard", headers=link, timeout=10)
    assert opened.status_code == 200 and "frame-ancestors 'none'" in \
        opened.headers["Content-Security-Policy"]
    for path in ("/api/model_serve/status", "/api/model_serve/log", "/unload", "/v1/models"):
        answer = requests.get(f"{dash.base_url}{path}", headers={**link, **keyed()}, timeout=10)
        assert answer.status_code == 403, path
    for other_way in ({**link, "Sec-Fetch-Mode": "cors", "Sec-Fetch-Dest": "empty"},
                      {**link, "Sec-Fetch-Dest": "iframe"},
                      {**link, "Origin": "http://evil.example"}):
        answer = requests.get(f"{dash.base_url}/dashboard", headers=other_way, timeout=10)
        assert answer.status_code == 403, other_way


def test_read_endpoints_answer_to_the_key(dash: Env) -> None:
    for path in ("status", "requests", "memory", "log"):
        url = f"{dash.base_url}/api/model_serve/{path}"
        assert requests.get(url, timeout=10).status_code == 401, path
        assert requests.get(url, headers=keyed(), timeout=30).status_code == 200, path
    status = status_of(dash)
    assert {m["name"] for m in status["models"]} == {A, B, C}
    model = model_in(status, B)
    assert model["kind"] == "chat" and model["estimate_bytes"] > 100 * 2**20
    assert model["ttl"] and model["ctx_size"]
    memory = status["memory"]
    assert memory["threshold_percent"] == 75.0 and 0 < memory["percent"] < 100
    history = requests.get(f"{dash.base_url}/api/model_serve/memory", headers=keyed(),
                           timeout=10).json()
    assert history["samples"] and history["samples"][-1]["total_bytes"] == memory["total_bytes"]
    log = requests.get(f"{dash.base_url}/api/model_serve/log?lines=5", headers=keyed(),
                       timeout=10).json()
    assert 0 < len(log["lines"]) <= 5 and log["file"].endswith("model_serve.log")


def test_actions_take_a_post_from_the_page_s_own_origin_and_a_key(dash: Env) -> None:
    url = f"{dash.base_url}/api/model_serve/load"
    body = {"model": A}
    assert requests.get(url, headers=keyed(), timeout=10).status_code == 405
    assert requests.post(url, json=body, timeout=10).status_code == 401
    other = requests.post(url, json=body, timeout=10,
                          headers={**keyed(), "Origin": "http://evil.example"})
    assert other.status_code == 403
    assert "Access-Control-Allow-Origin" not in other.headers
    forget = requests.post(f"{dash.base_url}/api/model_serve/forget", json={"model": "nope"},
                           headers=keyed(), timeout=10)
    assert forget.status_code == 404 and "nope" in forget.json()["error"]["message"]
    assert all(m["state"] == "unloaded" for m in status_of(dash)["models"])


def test_each_request_is_recorded_with_its_status_duration_and_tokens(dash: Env) -> None:
    client = OpenAI(base_url=f"{dash.base_url}/v1", api_key=KEY, max_retries=0, timeout=120)
    client.chat.completions.create(model=A, messages=PROMPT, max_tokens=5)
    stream = client.chat.completions.create(model=A, messages=PROMPT, max_tokens=5,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) is not None
    with pytest.raises(Exception):  # noqa: B017 - a 400 from the model server, recorded too
        client.chat.completions.create(model=A, messages=[{"role": "nobody", "content": 1}],
                                       max_tokens=5)
    done = requests.get(f"{dash.base_url}/api/model_serve/requests", headers=keyed(),
                        timeout=10).json()["done"]
    ours = [r for r in done if r["model"] == A]
    assert [r["status"] for r in ours][-3:][:2] == [200, 200] and ours[-1]["status"] >= 400
    for record in ours[-3:-1]:
        assert record["path"] == "/v1/chat/completions" and record["duration"] > 0
        assert record["predicted_tokens"] == 5 and record["prompt_tokens"] > 0
        assert record["tokens_per_second"] > 0 and record["restored"] is False
    model = model_in(status_of(dash), A)
    assert model["state"] == "loaded" and model["requests"] >= 3 and model["rss_bytes"]


def test_the_log_on_the_port_never_quotes_a_request(dash: Env) -> None:
    """A grammar llama-server cannot parse is printed whole to its output (so to the owner's
    log file); the log endpoint and the event stream show that a line was withheld."""
    marker = "quetzalcoatl-4321"
    answer = requests.post(f"{dash.base_url}/v1/completions", headers=keyed(), timeout=120,
                           json={"model": A, "prompt": "hi", "max_tokens": 1,
                                 "grammar": f"root ::= {marker}("})
    assert answer.status_code >= 400
    log_file = dash.state / "logs" / "model_serve.log"
    wait_for(lambda: marker in log_file.read_text(errors="replace"), 30,
             "the engine's grammar error in the log file")
    tail = requests.get(f"{dash.base_url}/api/model_serve/log?lines=200", headers=keyed(),
                        timeout=10)
    assert tail.status_code == 200 and marker not in tail.text
    assert any("withheld" in line for line in tail.json()["lines"])
    with requests.get(f"{dash.base_url}/api/model_serve/events", headers=keyed(), stream=True,
                      timeout=30) as events:
        seen = ""
        for chunk in events.iter_content(None):
            seen += chunk.decode()
            if "event: log" in seen and "\n\n" in seen.split("event: log", 1)[1]:
                break
    logged = seen.split("event: log", 1)[1]
    assert "withheld" in logged and marker not in logged


def test_held_requests_show_with_why_and_ollama_requests_are_recorded(dash: Env) -> None:
    base = dash.base_url
    hold = requests.post(f"{base}/api/model_serve/hold", headers=keyed(), timeout=30,
                         json={"models": None, "drain_seconds": 1}).json()["hold"]
    client = OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)
    asked = threading.Thread(target=lambda: client.chat.completions.create(
        model=A, messages=PROMPT, max_tokens=2))
    asked.start()
    try:
        def held() -> list[dict[str, Any]]:
            answer = requests.get(f"{base}/api/model_serve/requests", headers=keyed(),
                                  timeout=10).json()
            return [w for w in answer["waiting"] if w["model"] == A and w["waited"] >= 0.5]

        [waiting] = wait_for(held, 30, "the held request")
        assert waiting["why"] == "held: the config sync restarts this model", waiting
        assert waiting["path"] == "/v1/chat/completions"
    finally:
        requests.post(f"{base}/api/model_serve/release", json={"hold": hold}, headers=keyed(),
                      timeout=10)
        asked.join(timeout=120)
    # Ollama's API, translated: recorded under its own path, with its tokens.
    reply = requests.post(f"{base}/api/chat", headers=keyed(), timeout=120, json={
        "model": A, "messages": PROMPT, "stream": False, "options": {"num_predict": 3}})
    assert reply.status_code == 200, reply.text
    done = requests.get(f"{base}/api/model_serve/requests", headers=keyed(),
                        timeout=10).json()
    assert done["waiting"] == []
    last = done["done"][-1]
    assert (last["model"], last["path"], last["status"]) == (A, "/api/chat", 200)
    assert last["predicted_tokens"] == 3 and last["prompt_tokens"] > 0


# --- in a real browser ------------------------------------------------------------------------
MAC_BROWSERS = ("Google Chrome.app/Contents/MacOS/Google Chrome",
                "Chromium.app/Contents/MacOS/Chromium")
BROWSER_FIX = {
    "Linux": "./install.sh --dev installs Debian's chromium and chromium-driver",
    "Darwin": "install Google Chrome, and chromedriver (brew install --cask chromedriver) or "
              "let selenium fetch the driver that matches Chrome (it needs the network once)",
}


def find_test_browser(system: str | None = None, path: str | None = None,
                      apps: list[Path] | None = None) -> tuple[str | None, str | None, str]:
    """(browser, driver, what to do when one is missing): Debian's Chromium on Linux, Chrome
    (or Chromium) in /Applications on a Mac. On a Mac without chromedriver on PATH, selenium
    finds the one that matches Chrome itself (driver None)."""
    system = system or platform.system()
    browser = next(filter(None, (shutil.which(name, path=path) for name in (
        "chromium", "chromium-browser", "google-chrome"))), None)
    if browser is None and system == "Darwin":
        folders = apps if apps is not None else [Path("/Applications"),
                                                 Path.home() / "Applications"]
        browser = next((str(f / app) for f in folders for app in MAC_BROWSERS
                        if os.access(f / app, os.X_OK)), None)
    driver = shutil.which("chromedriver", path=path)
    fix = BROWSER_FIX.get(system, "install Chromium and chromedriver")
    return browser, driver, fix


def test_the_test_browser_is_found_on_a_mac_and_on_linux(tmp_path: Path) -> None:
    """On a Mac the browser test runs with Chrome from /Applications (no chromium on PATH);
    on Linux without a browser it says how to get one."""
    chrome = tmp_path / "Applications" / MAC_BROWSERS[0]
    chrome.parent.mkdir(parents=True)
    chrome.write_text("#!/bin/sh\n")
    chrome.chmod(0o755)
    empty = tmp_path / "bin"
    empty.mkdir()
    found = find_test_browser("Darwin", str(empty), [tmp_path / "Applications"])
    assert found[:2] == (str(chrome), None) and "chromedriver" in found[2]
    browser, driver, fix = find_test_browser("Linux", str(empty), [tmp_path / "Applications"])
    assert (browser, driver) == (None, None) and "./install.sh --dev" in fix


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium, driver_path, fix = find_test_browser()
    if not chromium or (not driver_path and platform.system() != "Darwin"):
        message = f"Chromium (or Chrome) and chromedriver are needed: {fix}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--window-size=1400,1100"):
        options.add_argument(flag)
    service = Service(driver_path) if driver_path else Service()  # selenium finds one
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()


def shot(driver: Any, name: str, env: Env, tmp_path: Path) -> None:
    folder = SCREENSHOTS or tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(folder / f"dashboard-{env['ENGINE']}-{name}.png"))


def test_the_page_in_a_browser(dash: Env, browser: Any, tmp_path: Path) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def wait(check: Any, what: str, timeout: float = 30) -> Any:
        return WebDriverWait(browser, timeout, 0.2).until(lambda d: check(), what)

    # The page redraws its tables every 2 s: read them in one step of the page's own script,
    # and click again when a button was redrawn between finding and clicking it.
    def cells(name: str) -> list[str] | None:
        return browser.execute_script(
            "const r = [...document.querySelectorAll('#models tbody tr')]"
            ".find(r => r.dataset.model === arguments[0]);"
            "return r ? [r.dataset.state, ...[...r.cells].map(c => c.textContent)] : null;",
            name)

    def state(name: str) -> str | None:
        found = cells(name)
        return found[0] if found else None

    def text(element_id: str) -> str:
        return browser.execute_script(
            "return document.getElementById(arguments[0]).textContent", element_id)

    def click(name: str, action: str) -> None:
        for _ in range(10):
            try:
                browser.find_element(
                    By.CSS_SELECTOR, f"#models tbody tr[data-model='{name}'] "
                    f"button[data-action={action}]").click()
                return
            except StaleElementReferenceException:
                continue
        raise AssertionError(f"could not click {action} of {name}")

    def connection() -> str:
        return browser.find_element(By.ID, "connection").get_attribute("data-state")

    started = time.monotonic()
    browser.get(f"{dash.base_url}/dashboard")
    # API_KEYS is set: the page asks for a key before it shows anything.
    wait(lambda: browser.find_element(By.ID, "key-form").is_displayed(), "the key prompt")
    assert cells(A) is None
    browser.find_element(By.ID, "key-input").send_keys(KEY)
    browser.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()
    wait(lambda: connection() == "live" and cells(C) is not None, "the models, live")
    print(f"dashboard: page up with its models {time.monotonic() - started:.2f}s after the "
          "request for it (key entered by the test)")
    # The hostile name is text: no element made of it, nothing it would run.
    assert cells(C)[1] == C
    assert browser.find_elements(By.CSS_SELECTOR, "#models img") == []
    assert browser.title == "model_serve"
    assert state(B) == "unloaded"
    browser.execute_script("window.notReloaded = true")

    # A request made elsewhere shows up in Activity, and the model's state, without a reload.
    client = OpenAI(base_url=f"{dash.base_url}/v1", api_key=KEY, max_retries=0, timeout=120)
    client.chat.completions.create(model=B, messages=STORY, max_tokens=4)

    def request_rows() -> list[list[str]]:
        return browser.execute_script(
            "return [...document.querySelectorAll('#requests tbody tr')]"
            ".map(r => [...r.cells].map(c => c.textContent))")

    def request_row() -> bool:
        return any(r[1] == B and r[3] == "200" for r in request_rows())

    wait(request_row, "the request in Activity")
    wait(lambda: state(B) == "loaded", "B loaded")
    assert browser.execute_script("return window.notReloaded") is True
    shot(browser, "loaded", dash, tmp_path)

    # Unload with the button: its conversation is saved first, and it goes.
    click(B, "unload")
    wait(lambda: state(B) == "unloaded", "B unloaded", 60)
    model = model_in(status_of(dash), B)
    assert model["state"] == "unloaded" and model["saved_conversations"] >= 1
    wait(lambda: f"unload {B} (asked: POST /api/models/unload/{B})" in text("memory-marks"),
         "the unload's mark and why")
    # The log panel follows the log live (the save is logged), never with what was said.
    wait(lambda: "saved 1 slot(s) of" in text("log"), "the save in the log panel")
    assert "lighthouse" not in text("log")
    # The same conversation again: restored from what the unload saved, and Activity says so.
    client.chat.completions.create(model=B, messages=STORY, max_tokens=4)
    wait(lambda: any(r[1] == B and r[7] == "yes" for r in request_rows()),
         "the restored request in Activity")
    wait(lambda: state(B) == "loaded", "B loaded again")
    click(B, "unload")
    wait(lambda: state(B) == "unloaded", "B unloaded again", 60)
    # Forget its conversations (the page confirms first).
    click(B, "forget")
    browser.switch_to.alert.accept()
    wait(lambda: "Forgot" in text("notice"), "the forget's answer")
    assert model_in(status_of(dash), B)["saved_conversations"] == 0
    # Load ahead, through admission.
    click(B, "load")
    wait(lambda: state(B) == "loaded", "B loaded ahead", 60)

    # The key travels in a header, never in a URL, and lives in this tab's session only.
    urls = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and not any(KEY in url for url in urls)
    assert browser.execute_script("return sessionStorage.getItem('model_serve.key')") == KEY
    assert browser.execute_script("return localStorage.length") == 0
    shot(browser, "actions", dash, tmp_path)

    # The stack stops and starts again: the page says so, and comes back by itself.
    dash.run("stop", timeout=90, check=True)
    # An open page does not hold up the front's stop (its server would wait 5 s for the
    # stream, then cut it).
    log = (dash.state / "logs" / "model_serve.log").read_text().splitlines()
    when = {line.split(" INFO ")[1]: line[:23] for line in log if " INFO " in line}
    began = datetime.strptime(when["supervisor stopping"], "%Y-%m-%d %H:%M:%S,%f")
    front = next(v for k, v in when.items() if k.startswith("stopped front:"))
    assert (datetime.strptime(front, "%Y-%m-%d %H:%M:%S,%f") - began).total_seconds() < 4
    wait(lambda: connection() == "lost", "the page to see the connection lost")
    assert "Lost the connection" in text("notice")
    shot(browser, "lost", dash, tmp_path)
    dash.run("start", check=True)
    wait(lambda: connection() == "live" and state(B) == "unloaded", "the page back", 60)
    assert browser.execute_script("return window.notReloaded") is True
    assert not browser.find_element(By.ID, "notice").is_displayed()

    # A model whose load fails shows so, with why, while its requests are refused. (Last: a
    # second gemma file renames the others.)
    gemma = next((dash.models / "google").glob("*.gguf"))
    with open(gemma, "rb") as whole:  # its header and a part of its data
        (dash.models / "google" / "broken-270m.gguf").write_bytes(whole.read(20 * 2**20))
    dash.run("sync", check=True)
    [broken] = [m.id for m in client.models.list().data if "broken" in m.id]
    with pytest.raises(APIStatusError) as refused:
        client.chat.completions.create(model=broken, messages=STORY, max_tokens=4)
    assert refused.value.status_code == 503
    wait(lambda: (cells(broken) or [""])[0] == "failing to load", "the failing model's state")
    assert "not within the file bounds" in cells(broken)[2], cells(broken)


# --- the records, on their own ------------------------------------------------------------------
def test_records_stay_small() -> None:
    """An answer of many MB (embeddings, say) may come as one chunk: a record keeps its end
    only, and the log its last REQUESTS_KEPT requests."""
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from model_serve.runtime.dashboard import REQUESTS_KEPT, TAIL_KEPT, RequestLog
    from model_serve.runtime.front import Route

    log = RequestLog()
    route = Route("gemma", "ls/gemma")
    timings = b'"timings":{"cache_n":3,"prompt_n":2,"predicted_n":7,"predicted_per_second":9.5}}'
    for _ in range(REQUESTS_KEPT + 50):
        record = log.begin(make_mocked_request("POST", "/v1/embeddings"), route)
        record.last = (b"x" * 8_000_000, b'{"data": [0.1]' + b" " * 5000 + timings)
        record.keep(200)
        log.end(record, web.Response(status=200))
    assert len(log.done) == REQUESTS_KEPT and not log.open
    assert all(len(r.tail) == TAIL_KEPT for r in log.done)
    shown = log.done[-1].to_json()
    assert (shown["prompt_tokens"], shown["predicted_tokens"], shown["tokens_per_second"]) == \
        (5, 7, 9.5)
    assert log.since(log.done[-2].seq) == [log.done[-1]]
    # A client that closes on a stream's last event cancels the handler before the engine's
    # answer ends (llama-swap's, say): the answer was whole (200); one that leaves before
    # the end is a 499.
    whole = log.begin(make_mocked_request("POST", "/v1/chat/completions"), route)
    whole.engine_status = 200
    whole.last = (b"data: {" + timings + b"\n\n", b"data: [DONE]\n\n")
    log.end(whole, None)
    left = log.begin(make_mocked_request("POST", "/v1/chat/completions"), route)
    left.engine_status = 200
    left.last = (b"data: {}\n\n", b"data: {" + timings + b"\n\n")
    log.end(left, None)
    assert (whole.status, left.status) == (200, 499)
    assert whole.to_json()["predicted_tokens"] == left.to_json()["predicted_tokens"] == 7
    assert whole.last == left.last == (b"", b"")


def test_marks_say_why_past_the_first_hundreds() -> None:
    """Each unload gets its reason, also once the marks kept are full."""
    from model_serve.runtime.dashboard import MARKS_KEPT, MemoryHistory

    history = MemoryHistory()
    history.look({"m": "unloaded"}, str.upper)
    for i in range(MARKS_KEPT):
        history.look({"m": "loaded" if i % 2 == 0 else "unloaded"}, str.upper)
    assert len(history.marks) == MARKS_KEPT
    history.look({"m": "loaded"}, str.upper)
    history.note("m", "asked")
    history.look({}, str.upper)  # the engine's feed is down: nothing went
    [mark] = history.look({"m": "unloaded"}, str.upper)
    assert (mark["event"], mark["model"], mark["why"]) == ("unload", "M", "asked")
    assert history.marks[-1] is mark and len(history.marks) == MARKS_KEPT


def test_the_log_panel_reads_new_lines_only(tmp_path: Path) -> None:
    from model_serve.runtime.dashboard import LOG_LINES, LogTail

    log = tmp_path / "model_serve.log"
    log.write_text("".join(f"old {i}\n" for i in range(LOG_LINES + 10)))
    follow = LogTail(log)
    lines, again = follow.read()
    assert again and len(lines) == LOG_LINES and lines[-1] == f"old {LOG_LINES + 9}"
    assert follow.read() == ([], False)
    with log.open("a") as handle:
        handle.write("new 1\nnew 2 is being writ")
    assert follow.read() == (["new 1"], False)
    with log.open("a") as handle:
        handle.write("ten\n")
    assert follow.read() == (["new 2 is being written"], False)
    log.write_text("rotated\n")  # a new, shorter file: shown from its start
    assert follow.read() == (["rotated"], True)

    # Renamed away and made anew, and the new file already longer than what was read of the
    # old one (a burst of lines): read from its start, not from the old file's offset.
    log.rename(tmp_path / "model_serve.log.1")
    log.write_text("".join(f"after {i}\n" for i in range(50)))
    lines, again = follow.read()
    assert again and lines[0] == "after 0" and len(lines) == 50


def test_the_log_panel_never_shows_what_a_request_said() -> None:
    """llama-server's output quotes requests at times (its JSON parser's "last read", a
    grammar it could not parse): the port shows that such a line was withheld."""
    from model_serve.runtime.dashboard import WITHHELD, LogFilter, shown

    said = "2026-12-04 15:48:12,345 model_serve.engine INFO "
    for engine_line in (
            "0.08.391.068 W srv    operator(): got exception: {\"error\":{\"message\":\"parse "
            "error; last read: '\\\"my bank PIN is 4321 '\"}}",
            "root ::= \"my bank PIN is 4321\"",
            "parse: error parsing grammar: expecting ')' at my bank PIN is 4321",
            "0.1.2.3 D srv  log_server_r: request:  {\"messages\": \"my bank PIN is 4321\"}"):
        assert shown(said + engine_line) == said + WITHHELD, engine_line
    ours = "2026-12-04 15:48:12,345 model_serve.front INFO admission: loading ls/g2"
    timing = said + "0.08.381.484 I slot print_timing: id  3 | task 5 | eval time = 35.42 ms"
    assert shown(ours) == ours and shown(timing) == timing
    # A grammar it could not parse, printed over several lines (through the router, each
    # with its model server's port): withheld up to the engine's next line of its own.
    dump = [said + line for line in (
        "[41234] parse: error parsing grammar: expecting ')' at ", "[41234] ",
        "[41234] root ::= item+", '[41234]    | "my bank PIN is 4321"', "[41234] x",
        "[41234] 0.08.410.985 E failed to parse grammar")]
    shown_now = LogFilter().lines("\n".join([*dump[:3], ours, *dump[3:]]))
    assert all(line.endswith(WITHHELD) for line in shown_now[:3] + shown_now[4:6])
    assert shown_now[3] == ours and shown_now[6] == dump[-1]
    # Shown by what it is, not by what it says: an engine line without the engine's own
    # prefix (a text printed over several lines that no pattern above knows) is withheld, and
    # so is a line with no record of its own after such a line; a traceback under
    # model_serve's own record is shown.
    unknown = said + "[41234] <start_of_turn>user my bank PIN is 4321"
    assert shown(unknown) == said + WITHHELD
    assert LogFilter().lines(f"{unknown}\nmy bank PIN is 4321") == [said + WITHHELD, WITHHELD]
    traceback = f"{ours}\nTraceback (most recent call last):"
    assert LogFilter().lines(traceback) == traceback.splitlines()


@contextlib.contextmanager
def serve_front(env: Env, cleanup_timeout: float = 30) -> Iterator[tuple[Any, Any]]:
    """The real front (no engine behind it) on env.port, in a thread of its own, for the
    block: (front, its runner); cleaned up and its loop stopped afterwards."""
    from aiohttp import web

    from model_serve.config.settings import load_settings
    from model_serve.runtime.front import Front, make_app

    front = Front(load_settings(dict(env)))
    front.settings.log_file.parent.mkdir(parents=True, exist_ok=True)
    front.settings.log_file.write_text("started\n")
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(make_app(front), handler_cancellation=True, shutdown_timeout=1)

    async def start() -> None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", env.port).start()

    loop.run_until_complete(start())
    threading.Thread(target=loop.run_forever, daemon=True).start()
    try:
        yield front, runner
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(cleanup_timeout)
        loop.call_soon_threadsafe(loop.stop)


def open_stream(port: int, key: str | None = None) -> tuple[socket.socket, bytes]:
    """An event stream opened as a page would, left unread: (its socket, the status line)."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    auth = f"\r\nAuthorization: Bearer {key}" if key else ""
    conn.sendall(f"GET /api/model_serve/events HTTP/1.1\r\nHost: 127.0.0.1:{port}{auth}"
                 "\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += conn.recv(4096)
    return conn, head.split(b"\r\n", 1)[0]


def test_a_stalled_event_stream_is_closed(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A page that stops reading its event stream (a frozen tab, a client that never reads)
    does not keep its connection and task forever: the stream ends once a write has waited
    EVENTS_WRITE_TIMEOUT (2 s here) for the reader."""
    from model_serve.runtime import dashboard

    monkeypatch.setattr(dashboard, "EVENTS_WRITE_TIMEOUT", 2.0)
    monkeypatch.setattr(dashboard, "LOG_READ_MAX", 8 * 2**20)  # the buffers fill sooner
    env = new_env(tmp_path)
    with serve_front(env) as (front, runner), socket.socket() as reader:
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.connect(("127.0.0.1", env.port))
        reader.sendall(f"GET /api/model_serve/events HTTP/1.1\r\nHost: 127.0.0.1:{env.port}"
                       "\r\n\r\n".encode())
        time.sleep(1)
        line = "x" * 8000 + "\n"
        with front.settings.log_file.open("a") as log:  # more than every buffer on the way
            for _ in range(3):
                log.write(line * 1000)
                log.flush()
                time.sleep(1)
        wait_for(lambda: not runner.server.connections, 20, "the stalled stream to be closed")
        reader.settimeout(5)
        with pytest.raises((ConnectionResetError, TimeoutError)) as ended:
            while reader.recv(1 << 20):
                pass
            raise ConnectionResetError("closed")
        assert ended.type is ConnectionResetError, "the stream went on"


def test_event_streams_are_bounded(tmp_path: Path) -> None:
    """Each open page's stream costs the front a look at the log twice a second: past
    EVENT_STREAMS_MAX at once, a page gets a 503 (it retries); one closed makes room."""
    from model_serve.runtime.dashboard import EVENT_STREAMS_MAX

    env = new_env(tmp_path)
    with serve_front(env) as (front, _runner):
        pages: list[socket.socket] = []
        try:
            for _ in range(EVENT_STREAMS_MAX):
                conn, status = open_stream(env.port)
                pages.append(conn)
                assert b" 200 " in status
            conn, status = open_stream(env.port)
            pages.append(conn)
            assert b" 503 " in status, "one stream too many"
            pages.pop(0).close()
            wait_for(lambda: front.dashboard.streams < EVENT_STREAMS_MAX, 10, "a stream to end")
            conn, status = open_stream(env.port)
            pages.append(conn)
            assert b" 200 " in status
        finally:
            for conn in pages:
                conn.close()


def test_a_site_that_opens_the_page_keeps_no_handle_on_it(tmp_path: Path) -> None:
    """The gate lets another site's link (window.open) open the page: the page is then cut from
    its opener's window (no navigating it to a look-alike asking for the key), and its files
    are not for another site's page to load."""
    env = new_env(tmp_path)
    with serve_front(env) as (_front, _runner):
        link = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate",
                "Sec-Fetch-Dest": "document"}
        opened = requests.get(f"http://127.0.0.1:{env.port}/dashboard", headers=link,
                              timeout=10)
        assert opened.status_code == 200
        assert opened.headers.get("Cross-Origin-Opener-Policy") == "same-origin"
        for name in ("dashboard.js", "dashboard.css"):
            part = requests.get(f"http://127.0.0.1:{env.port}/dashboard/{name}", timeout=10)
            assert part.headers.get("Cross-Origin-Resource-Policy") == "same-origin", name


def test_clients_cannot_take_every_event_stream_from_the_owner(tmp_path: Path) -> None:
    """With ADMIN_KEYS set, pages holding an API key alone (a client, a CORS_ORIGINS app's
    tabs) are refused before they fill every stream: the owner's page still opens one."""
    from model_serve.runtime.dashboard import EVENT_STREAMS_MAX

    env = new_env(tmp_path)
    env.update({"API_KEYS": KEY, "ADMIN_KEYS": "admin-key"})
    with serve_front(env) as (_front, _runner):
        pages: list[socket.socket] = []
        try:
            client_streams = 0
            for _ in range(EVENT_STREAMS_MAX + 1):
                conn, status = open_stream(env.port, KEY)
                pages.append(conn)
                if b" 503 " in status:
                    break
                assert b" 200 " in status
                client_streams += 1
            print(f"client streams before a 503: {client_streams}")
            assert client_streams < EVENT_STREAMS_MAX
            conn, status = open_stream(env.port, "admin-key")
            pages.append(conn)
            assert b" 200 " in status, "the owner's page was locked out"
        finally:
            for conn in pages:
                conn.close()


def test_logs_and_prompts_are_never_for_another_origin(tmp_path: Path) -> None:
    """CORS_ORIGINS opens the API to a web app's pages, never the log (the endpoint, the event
    stream's log, llama-swap's /logs) nor /slots (what users said), whatever key it holds."""
    app = "http://app.example:3000"
    env = new_env(tmp_path)
    env.update({"API_KEYS": KEY, "ADMIN_KEYS": "admin-key", "CORS_ORIGINS": app})
    with serve_front(env) as (front, _runner):
        base = f"http://127.0.0.1:{env.port}"
        admin = {**keyed("admin-key"), "Origin": app}
        front.settings.log_file.write_text("the log's line\n")
        for path in ("/api/model_serve/log", "/logs", "/logs/stream", "/api/events", "/slots",
                     "/upstream/ls/x/slots"):
            answer = requests.get(f"{base}{path}", headers=admin, timeout=10)
            assert answer.status_code == 403, (path, answer.status_code, answer.text)
            assert "never served to a page of another web site" in answer.text, path
        with requests.get(f"{base}/api/model_serve/events", headers=admin, stream=True,
                          timeout=10) as events:
            assert events.headers["Access-Control-Allow-Origin"] == app
            seen = ""
            for chunk in events.iter_content(None):
                seen += chunk.decode()
                if "event: log" in seen and "\n\n" in seen.split("event: log", 1)[1]:
                    break
        logged = seen.split("event: log", 1)[1]
        assert "refused" in logged and "the log's line" not in logged
        # The page's own origin reads it; the listed app still reads what is not the log.
        own = requests.get(f"{base}/api/model_serve/log", timeout=10,
                           headers={**keyed("admin-key"), "Origin": base})
        assert own.status_code == 200 and "the log's line" in own.text
        memory = requests.get(f"{base}/api/model_serve/memory", timeout=10,
                              headers={**keyed(), "Origin": app})
        assert memory.status_code == 200 and \
            memory.headers["Access-Control-Allow-Origin"] == app
