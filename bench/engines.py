"""9. The two engines on the same work: the llama-swap engine measured against the router,
each as a whole stack on the gemma file, one after the other (two stacks at once would share
the cores). Through the stack's port: warm latency of a 16-token reply, streaming tokens/s of
a 128-token reply, cold start (time to the first token right after an unload), and how long an
unload takes until the engine reports the model gone."""

from __future__ import annotations

import time
from pathlib import Path

from bench.harness import Outcome, Reply, Row, chat, median, running_stack

NAME = "ls/gemma-3:270m-q4_k_m"  # the served name; both engines route it


def _llama_swap_settings() -> dict[str, str] | None:
    """ENGINE=llama-swap on a port whose neighbours (the models' ports) are free; None when no
    llama-swap can be found (not in shared/tools, not on PATH)."""
    import shutil

    from tests.test_llama_swap import REAL_LLAMA_SWAP, port_block

    binary = REAL_LLAMA_SWAP if REAL_LLAMA_SWAP.exists() else shutil.which("llama-swap")
    if not binary:
        return None
    return {"ENGINE": "llama-swap", "LLAMA_SWAP_BIN": str(binary),
            "LLAMA_SWAP_PORT": str(port_block())}


def _measure(root: Path, reps: int, **settings: str) -> dict[str, list[float]]:
    import requests

    from model_serve.config.settings import load_settings
    from model_serve.engines import select_engine

    figures: dict[str, list[float]] = {"latency_ms": [], "stream_tps": [], "cold_ttft_s": [],
                                       "unload_s": [], "keepalive_drops": []}
    # KV_CACHE off: only the router would restore conversations after an unload.
    with running_stack(root, KV_CACHE="off", **settings) as stack:
        engine = select_engine(load_settings(stack.env))
        model_id = next(m.name for m in engine.models() if m.served_name == NAME)
        session = requests.Session()

        def reply(tokens: int, stream: bool = False) -> Reply:
            """One request on the kept-alive session. llama-server sometimes closes a kept-alive
            connection after a streamed reply: through the router the client sees the
            connection dropped, through llama-swap an HTTP 502 ("proxy error: EOF"). Either is
            counted and retried once."""
            try:
                return chat(stack.base_url, NAME, tokens, stream=stream, session=session)
            except requests.HTTPError as exc:
                if exc.response is None or exc.response.status_code != 502:
                    raise
            except requests.ConnectionError:
                pass
            figures["keepalive_drops"].append(1.0)
            return chat(stack.base_url, NAME, tokens, stream=stream)

        reply(16)  # loads the model
        for _ in range(reps * 4):
            figures["latency_ms"].append(reply(16).total * 1000)
        for _ in range(reps):
            figures["stream_tps"].append(reply(128, stream=True).decode_rate)
        for _ in range(reps):
            started = time.perf_counter()
            engine.unload(model_id)
            assert engine.wait_unloaded(model_id), "the model did not unload"
            figures["unload_s"].append(time.perf_counter() - started)
            figures["cold_ttft_s"].append(chat(stack.base_url, NAME, 8, stream=True).ttft)
    return figures


def run(root: Path, quick: bool) -> Outcome:
    reps = 2 if quick else 5
    router = _measure(root / "router", reps)
    swap_settings = _llama_swap_settings()
    outcome = Outcome(raw={"llama-server": router})
    if swap_settings is None:
        outcome.notes.append("engines: no llama-swap found (shared/tools or PATH): only the "
                             "router was measured")
        swap: dict[str, list[float]] = {key: [] for key in router}
    else:
        swap = _measure(root / "llama-swap", reps, **swap_settings)
        outcome.raw["llama-swap"] = swap
    for key, label in (("latency_ms", "warm latency median (ms)"),
                       ("stream_tps", "stream 128 tok (tok/s)"),
                       ("cold_ttft_s", "cold start TTFT (s)"),
                       ("unload_s", "unload until gone (s)")):
        outcome.rows.append(Row(f"llama-swap vs router: {label}",
                                median(swap[key]) if swap[key] else None, median(router[key]),
                                note="reference: the router"))
    outcome.rows.append(Row("llama-swap vs router: keep-alive drops (retried)",
                            float(len(swap["keepalive_drops"])),
                            float(len(router["keepalive_drops"]))))
    return outcome
