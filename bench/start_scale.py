"""10. `model start` with 1 and with 50 real models (hard links of the gemma file: each a model
of its own to the catalog and the engine, no extra disk), after one sync so headers are
cached, as on any start but the first. The time is split where the log shows it: our part
(from the supervisor's first line to the engine's launch: settings, sync, config) and the
engine's (from its launch until `model start` returns: the router opens every model's GGUF
header to learn its output modalities, then answers /health).
"""

from __future__ import annotations

import os
import re
import time
from datetime import datetime
from pathlib import Path

from bench.harness import Goal, Outcome, Row, Stack, gemma_path, isolated_env, median

COUNTS = (1, 50)
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def _stamp(line: str) -> float:
    found = _STAMP.match(line)
    if not found:
        raise RuntimeError(f"no time stamp in log line: {line!r}")
    return datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _our_part(log: Path, offset: int) -> float:
    """Seconds from the supervisor's first line to the engine's launch, in this run's lines."""
    lines = log.read_text(errors="replace")[offset:].splitlines()
    begin = next(line for line in lines if " supervisor " in line and "starting:" in line)
    launch = next(line for line in lines if "starting engine:" in line)
    return _stamp(launch) - _stamp(begin)


def _one_start(stack: Stack) -> tuple[float, float]:
    log = stack.state / "logs" / "model_serve.log"
    offset = log.stat().st_size if log.exists() else 0
    started = time.perf_counter()
    try:
        stack.model("start")
        wall = time.perf_counter() - started
    finally:
        stack.model("stop", timeout=90, check=False)
    return wall, _our_part(log, offset)


def run(root: Path, quick: bool) -> Outcome:
    reps = 1 if quick else 3
    figures: dict[int, dict[str, list[float]]] = {}
    for count in COUNTS:
        folder = root / f"start-{count}"
        stack = Stack(folder, isolated_env(folder))
        for i in range(count):
            os.link(gemma_path(), folder / "models" / f"gemma-copy{i:02d}-270m-q4_k_m.gguf")
        stack.model("sync", "--no-bridge")  # headers cached, as for every start but the first
        figures[count] = {"wall_s": [], "ours_s": []}
        for _ in range(reps):
            wall, ours = _one_start(stack)
            figures[count]["wall_s"].append(wall)
            figures[count]["ours_s"].append(ours)
    one, many = figures[COUNTS[0]], figures[COUNTS[1]]
    outcome = Outcome(raw={str(n): f for n, f in figures.items()})
    outcome.rows += [
        Row(f"model start, {COUNTS[1]} models vs {COUNTS[0]} (s)", median(many["wall_s"]),
            median(one["wall_s"])),
        Row(f"our part of start, {COUNTS[1]} models vs {COUNTS[0]} (ms)",
            median(many["ours_s"]) * 1000, median(one["ours_s"]) * 1000,
            Goal("ratio", "<=", 1.5)),
    ]
    outcome.notes.append("start = `model start` until it returns; our part = the supervisor's "
                         "first log line to the engine's launch; the rest is the engine's own "
                         "start (the router reads each model's GGUF header)")
    return outcome
