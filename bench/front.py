"""11. What the front costs and what it saves, on the router: the same 1-token request through
the front, to the engine behind it, and to the model's own port, interleaved (what the front
adds is the median of the per-round differences; the front reaches a loaded model's own port,
so it skips the router's hop, and its own cost shows against that port); 200 requests in
a row on one kept-alive connection through the front and straight to the router; the front's
memory."""

from __future__ import annotations

import json
from pathlib import Path

from bench.harness import MODEL_A, Goal, Outcome, Row, chat, median, running_stack

MB = 1e6


def _drops(url: str, count: int) -> int:
    """Requests that failed on one kept-alive session (no retry), of `count` in a row."""
    import requests

    failed = 0
    with requests.Session() as session:
        for _ in range(count):
            try:
                chat(url, MODEL_A, 1, session=session)
            except requests.RequestException:
                failed += 1
    return failed


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
        for side, url in urls.items():  # untimed: connections open, prompt cached
            chat(url, MODEL_A, 1, session=sessions[side])
        order = list(urls)
        for i in range(rounds):
            for side in order[i % 3:] + order[:i % 3]:  # rotate: no side always first
                for _attempt in range(2):  # a dropped kept-alive connection is retried once
                    try:
                        reply = chat(urls[side], MODEL_A, 1, session=sessions[side])
                        break
                    except requests.ConnectionError:
                        sessions[side] = requests.Session()
                latency[side].append((reply.done - reply.started) * 1000)
        drops = {"front": _drops(urls["front"], in_a_row),
                 "engine": _drops(urls["engine"], in_a_row)}
        front_rss = psutil.Process(int(state["children"]["front"]["pid"][0])).memory_info().rss
    med = {side: median(values) for side, values in latency.items()}
    # Per round, front minus engine: pairs taken moments apart cancel the machine's drift.
    added = median([f - e for f, e in zip(latency["front"], latency["engine"], strict=True)])
    own = median([f - m for f, m in zip(latency["front"], latency["model"], strict=True)])
    outcome = Outcome(raw={"latency_ms": latency, "drops": drops, "in_a_row": in_a_row,
                           "front_rss_bytes": front_rss})
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
    ]
    return outcome
