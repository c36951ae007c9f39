"""Serving through the stack vs straight to llama-server: warm overhead, cold start and
concurrency. Every pair is measured in the same run on the same model file, interleaved."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.harness import (
    MODEL_A,
    MODEL_B,
    Goal,
    Outcome,
    Reply,
    Row,
    chat,
    free_port,
    hand_started_server,
    healthy,
    median,
    p95,
    running_stack,
    wait_until,
)


def _ordered(i: int, pair: tuple[str, str]) -> tuple[str, str]:
    """ABBA order, so neither side always goes first."""
    return pair if i % 2 == 0 else (pair[1], pair[0])


def warm(root: Path, quick: bool) -> Outcome:
    """1. The same request to the loaded model's own port and through the stack's port."""
    import requests

    pairs, stream_pairs = (8, 2) if quick else (40, 6)
    latency: dict[str, list[float]] = {"stack": [], "direct": []}
    rate: dict[str, list[float]] = {"stack": [], "direct": []}
    # Kept-alive connections the server closed without saying so, by the reply before.
    drops = {side: {"after plain": [], "after stream": []} for side in ("stack", "direct")}
    with running_stack(root) as stack:
        chat(stack.base_url, MODEL_A, 16)  # loads the model
        urls = {"stack": stack.base_url,
                "direct": f"http://127.0.0.1:{stack.port_of(MODEL_A)}"}
        sessions = {side: requests.Session() for side in urls}  # keep-alive, like the SDK
        for side in urls:  # one untimed request each: connections open, prompt cached
            chat(urls[side], MODEL_A, 16, session=sessions[side])
        for i in range(pairs + stream_pairs):
            for side in _ordered(i, ("stack", "direct")):
                stream = i >= pairs
                for _attempt in range(2):
                    try:
                        reply = chat(urls[side], MODEL_A, 128 if stream else 16,
                                     stream=stream, session=sessions[side])
                    except requests.ConnectionError as exc:
                        # A client without retries would see this error. Counted; the retry
                        # opens a new connection and only it is timed.
                        after = "after stream" if i > pairs else "after plain"
                        drops[side][after].append(f"request {i}: {exc}")
                        continue
                    if stream:
                        rate[side].append(reply.decode_rate)
                    else:
                        latency[side].append(reply.total * 1000)
                    break
    outcome = Outcome(raw={"latency_ms": latency, "stream_tokens_per_s": rate,
                           "keepalive_drops": drops, "request_tokens": 16, "stream_tokens": 128})
    outcome.rows += [
        Row("warm latency median (ms)", median(latency["stack"]), median(latency["direct"]),
            Goal("ratio", "<=", 1.02)),
        Row("warm latency p95 (ms)", p95(latency["stack"]), p95(latency["direct"]),
            Goal("ratio", "<=", 1.05)),
        Row("stream 128 tok (tok/s)", median(rate["stack"]), median(rate["direct"]),
            Goal("ratio", ">=", 0.99)),
    ]
    for after in ("after plain", "after stream"):
        outcome.rows.append(Row(f"keep-alive drops {after} reply", len(drops["stack"][after]),
                                len(drops["direct"][after]), Goal("measured", "==", 0)))
    return outcome


def _cold_reference(args: list[str]) -> float:
    """Start llama-server by hand with the router's own arguments; TTFT from the spawn."""
    port = free_port()
    args = list(args)
    args[args.index("--port") + 1] = str(port)
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    with hand_started_server(args) as proc:
        wait_until(lambda: proc.poll() is not None or healthy(url), 120,
                   "the hand-started llama-server to answer /health", interval=0.01)
        if proc.poll() is not None:
            raise RuntimeError(f"hand-started llama-server exited with {proc.returncode}")
        reply = chat(url, MODEL_A, 16, stream=True)
        return reply.first_token - started


def cold(root: Path, quick: bool) -> Outcome:
    """2. First request to an unloaded model through the stack vs llama-server by hand."""
    reps = 2 if quick else 5
    via_stack: list[float] = []
    by_hand: list[float] = []
    # KV_CACHE off: a restored conversation would spare the stack work the reference does.
    with running_stack(root, KV_CACHE="off") as stack:
        chat(stack.base_url, MODEL_A, 16)  # the file is in the page cache for both sides
        args = stack.args_of(MODEL_A)[1:]
        for i in range(reps):
            for side in _ordered(i, ("stack", "hand")):
                stack.unload(MODEL_A)  # and one model server in memory at a time
                if side == "stack":
                    via_stack.append(chat(stack.base_url, MODEL_A, 16, stream=True).ttft)
                else:
                    by_hand.append(_cold_reference(args))
    outcome = Outcome(raw={"ttft_s": {"stack": via_stack, "hand": by_hand},
                           "hand_args": args})
    outcome.rows.append(Row("cold start TTFT median (s)", median(via_stack), median(by_hand),
                            Goal("ratio", "<=", 1.15)))
    return outcome


def _batch(urls: dict[str, str], streams: int, tokens: int) -> tuple[float, int, list[str]]:
    """`streams` concurrent streams, alternating over the models; (tok/s, tokens, errors)."""
    models = list(urls)

    def one(i: int) -> Reply | str:
        model = models[i % len(models)]
        try:
            return chat(urls[model], model, tokens, stream=True)
        except Exception as exc:  # noqa: BLE001 - every failure is counted, not raised
            return f"{model}: {exc}"

    started = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(one, range(streams)))
    elapsed = time.perf_counter() - started
    done = sum(r.tokens for r in results if isinstance(r, Reply))
    return done / elapsed, done, [r for r in results if isinstance(r, str)]


PAIR_TOKENS = 16  # short: with default threads on a small CPU this can crawl at < 1 tok/s


def _concurrency(root: Path, streams: int, tokens: int, rounds: int,
                 **settings: str) -> dict[str, Any]:
    """`rounds` batches of `streams` through the stack and to the models' own ports, then
    one pair of short streams (one per model) through the stack."""
    rate: dict[str, list[float]] = {"stack": [], "direct": []}
    errors: dict[str, list[str]] = {"stack": [], "direct": []}
    with running_stack(root, two_models=True, **settings) as stack:
        for model in (MODEL_A, MODEL_B):
            chat(stack.base_url, model, 4)  # both loaded before timing
        targets = {
            "stack": {m: stack.base_url for m in (MODEL_A, MODEL_B)},
            "direct": {m: f"http://127.0.0.1:{stack.port_of(m)}" for m in (MODEL_A, MODEL_B)},
        }
        for i in range(rounds):
            for side in _ordered(i, ("stack", "direct")):
                tok_s, _done, failed = _batch(targets[side], streams, tokens)
                rate[side].append(tok_s)
                errors[side] += failed
        pair, _done, failed = _batch(targets["stack"], 2, PAIR_TOKENS)
        errors["stack"] += failed
    return {"aggregate_tokens_per_s": rate, "pair_tokens_per_s": pair, "errors": errors}


def concurrency(root: Path, quick: bool) -> Outcome:
    """3. 32 concurrent streams over 2 models, through the stack vs to their own ports, with
    one thread per model (MODEL_THREADS=1) so the two busy model servers share the cores.

    Then what MODEL_THREADS is for: two models answering at once with llama-server's default
    threads (one per core each) against MODEL_THREADS=1. On a small CPU the default can stall
    both servers (seen here from 0.4 to 23 tok/s between runs), so that pass is one short pair
    of streams, reported without a goal.
    """
    streams, tokens = 32, (16 if quick else 32)
    rounds = 1 if quick else 3
    threads_1 = _concurrency(root / "threads-1", streams, tokens, rounds, MODEL_THREADS="1")
    default = _concurrency(root / "default", streams, tokens, 0)
    outcome = Outcome(raw={"threads_1": threads_1, "default": default, "streams": streams,
                           "tokens_per_stream": tokens, "pair_tokens": PAIR_TOKENS,
                           "models": 2, "rounds": rounds})
    rate = threads_1["aggregate_tokens_per_s"]
    outcome.rows.append(Row(f"{streams} streams/2 models, MODEL_THREADS=1 (tok/s)",
                            median(rate["stack"]),
                            median(rate["direct"]), Goal("ratio", ">=", 0.95)))
    errors = {side: len(threads_1["errors"][side]) + len(default["errors"][side])
              for side in ("stack", "direct")}
    outcome.rows.append(Row("concurrent streams: errors", errors["stack"], errors["direct"],
                            Goal("measured", "==", 0)))
    outcome.rows.append(Row("2 models at once, default threads vs MODEL_THREADS=1 (tok/s)",
                            default["pair_tokens_per_s"], threads_1["pair_tokens_per_s"]))
    return outcome
