"""11. What the front costs and what it saves, on the router: the same 1-token request through
the front, to the engine behind it, and to the model's own port, interleaved (what the front
adds is the median of the per-round differences; the front reaches a loaded model's own port,
so it skips the router's hop, and its own cost shows against that port); 200 requests in
a row on one kept-alive connection through the front and straight to the router; the front's
memory. Then the dashboard's share: what recording one request costs the front (its
RequestLog, timed in the process on aiohttp's own request objects), and the front's added
latency again while a dashboard page is open, reading its event stream."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from bench.harness import MODEL_A, Goal, Outcome, Row, chat, median, running_stack

MB = 1e6


def _drops(url: str, count: int, headers: dict[str, str] | None = None) -> int:
    """Requests that failed on one kept-alive session (no retry), of `count` in a row."""
    import requests

    failed = 0
    with requests.Session() as session:
        session.headers.update(headers or {})
        for _ in range(count):
            try:
                chat(url, MODEL_A, 1, session=session)
            except requests.RequestException:
                failed += 1
    return failed


def _recording_cost(count: int) -> tuple[float, float]:
    """Microseconds per request: recording it (begin, the answer's last chunks, end), and
    reading its figures out when a page shows it (off the request path)."""
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from model_serve.runtime.dashboard import RequestLog
    from model_serve.runtime.front import Route

    route = Route("gemma", "ls/gemma")
    log = RequestLog()
    answer = web.Response(status=200)
    last = (b'data: {"choices":[],"timings":{"cache_n":9,"prompt_n":1,"predicted_n":8,'
            b'"predicted_per_second":39.8}}\n\n')
    requests_ = [make_mocked_request("POST", "/v1/chat/completions") for _ in range(count)]
    started = time.perf_counter()
    for request in requests_:
        record = log.begin(request, route)
        record.last = (record.last[1], b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n')
        record.last = (record.last[1], last)
        record.last = (record.last[1], b"data: [DONE]\n\n")
        record.keep(200)
        log.end(record, answer)
    recorded = (time.perf_counter() - started) / count * 1e6
    started = time.perf_counter()
    for record in log.done:
        record.to_json()
    shown = (time.perf_counter() - started) / len(log.done) * 1e6
    return recorded, shown


def _follow_events(url: str, stop: threading.Event, seen: list[int]) -> None:
    """A dashboard page: reads the event stream until told to stop."""
    import requests

    with requests.get(f"{url}/api/model_serve/events", stream=True, timeout=30) as answer:
        for chunk in answer.iter_content(chunk_size=None):
            seen.append(len(chunk))
            if stop.is_set():
                return


def _timed_chat(urls: dict[str, str], sessions: dict, side: str) -> float:
    """One 1-token chat on `side` (ms); a dropped kept-alive connection is retried once on a
    new session with the same headers."""
    import requests

    for attempt in range(2):
        try:
            reply = chat(urls[side], MODEL_A, 1, session=sessions[side])
            return (reply.done - reply.started) * 1000
        except requests.ConnectionError:
            if attempt:
                raise
            kept = sessions[side].headers
            sessions[side] = requests.Session()
            sessions[side].headers.update(kept)
    raise AssertionError("unreachable")


def _added(urls: dict[str, str], sessions: dict[str, object], rounds: int) -> list[float]:
    """Per round, the front minus the engine behind it (ms), sides in rotating order."""

    latency: dict[str, list[float]] = {"front": [], "engine": []}
    for i in range(rounds):
        for side in (("front", "engine") if i % 2 else ("engine", "front")):
            latency[side].append(_timed_chat(urls, sessions, side))
    return [f - e for f, e in zip(latency["front"], latency["engine"], strict=True)]


def run(root: Path, quick: bool) -> Outcome:
    import psutil
    import requests

    rounds, in_a_row = (30, 50) if quick else (150, 200)
    latency: dict[str, list[float]] = {"front": [], "engine": [], "model": []}
    with running_stack(root) as stack:
        chat(stack.base_url, MODEL_A, 1)  # loads the model
        state = json.loads((stack.state / "supervisor.json").read_text())
        from model_serve.config.settings import load_settings

        urls = {"front": stack.base_url, "engine": load_settings(stack.env).engine_url,
                "model": f"http://127.0.0.1:{stack.port_of(MODEL_A)}"}
        sessions = {side: requests.Session() for side in urls}
        # Behind the front, the engine and the model servers answer to model_serve's own key.
        from model_serve import internal_key

        behind = internal_key.engine_headers(load_settings(stack.env))
        for side in ("engine", "model"):
            sessions[side].headers.update(behind)
        for side, url in urls.items():  # untimed: connections open, prompt cached
            chat(url, MODEL_A, 1, session=sessions[side])
        order = list(urls)
        for i in range(rounds):
            for side in order[i % 3:] + order[:i % 3]:  # rotate: no side always first
                latency[side].append(_timed_chat(urls, sessions, side))
        drops = {"front": _drops(urls["front"], in_a_row),
                 "engine": _drops(urls["engine"], in_a_row, behind)}
        front_rss = psutil.Process(int(state["children"]["front"]["pid"][0])).memory_info().rss
        # The dashboard's share, page closed and open, in alternating blocks (drift cancels).
        blocks, per_block = (2, 10) if quick else (4, 20)
        closed: list[float] = []
        opened: list[float] = []
        events: list[int] = []
        for _block in range(blocks):
            closed += _added(urls, sessions, per_block)
            stop = threading.Event()
            page = threading.Thread(target=_follow_events,
                                    args=(stack.base_url, stop, events), daemon=True)
            page.start()
            time.sleep(0.5)  # the page's first events
            opened += _added(urls, sessions, per_block)
            stop.set()
            page.join(timeout=5)
    recorded_us, shown_us = _recording_cost(20000)
    med = {side: median(values) for side, values in latency.items()}
    # Per round, front minus engine: pairs taken moments apart cancel the machine's drift.
    added = median([f - e for f, e in zip(latency["front"], latency["engine"], strict=True)])
    own = median([f - m for f, m in zip(latency["front"], latency["model"], strict=True)])
    outcome = Outcome(raw={"latency_ms": latency, "drops": drops, "in_a_row": in_a_row,
                           "front_rss_bytes": front_rss, "added_page_closed_ms": closed,
                           "added_page_open_ms": opened, "event_chunks": len(events),
                           "recording_us": recorded_us, "showing_us": shown_us})
    outcome.rows += [
        Row("1-token request, front vs engine behind it (ms)", med["front"], med["engine"]),
        Row("what the front adds, median of per-round differences (ms)", added, None,
            Goal("measured", "<=", 1, "ms")),
        Row("front vs the model's own port, median of per-round differences (ms)", own, None),
        Row("1-token request, router vs the model's own port (ms)", med["engine"],
            med["model"]),
        Row(f"{in_a_row} requests on one kept-alive connection: failed, front vs router",
            drops["front"], drops["engine"], Goal("measured", "==", 0)),
        Row("front RSS (MB)", front_rss / MB, None, Goal("measured", "<", 50)),
        Row("recording one request for the dashboard, in the front (us)", recorded_us, None,
            Goal("measured", "<", 20, "us")),
        Row("reading one request's figures when a page shows it (us, off the path)", shown_us,
            None),
        Row("what the front adds, a dashboard open, per-round differences (ms)",
            median(opened), None, Goal("measured", "<=", 1, "ms")),
        Row("what the front adds, no page open, in the same blocks (ms)", median(closed), None),
    ]
    return outcome
