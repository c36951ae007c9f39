"""14. What `embeddings: true` costs a chat model: gemma-3-270m served as model_serve serves it
(8,192-token context, --swa-full, its built-in chat template), with and without
`--embeddings --pooling mean`, both loaded at once with one thread each and asked in turn, so
both see the same load on the machine. Figures: resident memory once warm, 48-token
generation and prompt speed, and the time of one short embedding."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

from bench.harness import (
    Goal,
    Outcome,
    Row,
    free_port,
    gemma_path,
    hand_started_server,
    healthy,
    median,
    wait_until,
)

SERVED_AS = ["--ctx-size", "8192", "--parallel", "1", "--fit", "off", "--swa-full",
             "--no-jinja", "--chat-template", "gemma", "--threads", "1"]
VARIANTS = {"without": [], "with": ["--embeddings", "--pooling", "mean"]}
GENERATED = 48


def run(root: Path, quick: bool) -> Outcome:
    import psutil
    import requests

    model = gemma_path()
    rounds = 3 if quick else 8
    raw: dict[str, dict[str, list[float]]] = {
        name: {"generation": [], "prompt": [], "rss_mib": [], "embedding_ms": []}
        for name in VARIANTS}
    with contextlib.ExitStack() as servers:
        bases: dict[str, str] = {}
        procs = {}
        for name, extra in VARIANTS.items():
            port = free_port()
            procs[name] = servers.enter_context(hand_started_server(
                ["--model", str(model), "--host", "127.0.0.1", "--port", str(port),
                 *SERVED_AS, *extra]))
            bases[name] = f"http://127.0.0.1:{port}"
        for name, base in bases.items():
            wait_until(lambda base=base: healthy(base), 120, f"llama-server ({name}) to answer")
        for i in range(rounds):
            for name in VARIANTS if i % 2 == 0 else reversed(VARIANTS):  # ABBA
                body = {"prompt": "Once upon a time " * 40 + str(i), "n_predict": GENERATED,
                        "ignore_eos": True, "temperature": 0, "cache_prompt": False}
                timings = requests.post(bases[name] + "/completion", json=body,
                                        timeout=600).json()["timings"]
                raw[name]["generation"].append(timings["predicted_per_second"])
                raw[name]["prompt"].append(timings["prompt_per_second"])
            started = time.perf_counter()
            answer = requests.post(bases["with"] + "/v1/embeddings",
                                   json={"input": f"a short sentence {i}"}, timeout=600)
            answer.raise_for_status()
            raw["with"]["embedding_ms"].append((time.perf_counter() - started) * 1000)
        for name, proc in procs.items():
            raw[name]["rss_mib"].append(psutil.Process(proc.pid).memory_info().rss / 2**20)
    print(f"[bench] embeddings: generation {median(raw['with']['generation']):.1f} vs "
          f"{median(raw['without']['generation']):.1f} tok/s", file=sys.stderr, flush=True)
    outcome = Outcome(raw={"variants": VARIANTS, "served_as": SERVED_AS, **raw})
    with_, without = raw["with"], raw["without"]
    outcome.rows += [
        Row("embeddings: true, resident (MiB)", median(with_["rss_mib"]),
            median(without["rss_mib"]), Goal("ratio", "<=", 1.05),
            note="reference: the same model without --embeddings"),
        Row("embeddings: true, gen 48 tok (tok/s)", median(with_["generation"]),
            median(without["generation"]), Goal("ratio", ">=", 0.9)),
        Row("embeddings: true, prompt (tok/s)", median(with_["prompt"]),
            median(without["prompt"]), Goal("ratio", ">=", 0.9)),
        Row("embeddings: true, one short embedding (ms)", median(with_["embedding_ms"])),
    ]
    return outcome
