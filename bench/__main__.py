"""`python -m bench [--quick] [--only NAME,...] [--results-dir DIR]`: run the benchmarks,
print one table, write the raw figures as JSON to bench/results/<UTC timestamp>.json."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import (
    cli_time,
    cpu_kernels,
    daemons,
    embeddings,
    engines,
    front,
    kv_cache,
    ollama,
    rpc,
    serving,
    soak,
    start_scale,
    sync_scale,
)
from bench.harness import REPO, Outcome, Row, llama_server_binary

BENCHMARKS: dict[str, Callable[[Path, bool], Outcome]] = {
    "warm": serving.warm,
    "cold": serving.cold,
    "concurrency": serving.concurrency,
    "cli": cli_time.run,
    "sync": sync_scale.run,
    "daemons": daemons.footprint,
    "unload": daemons.unload_reaction,
    "cpu": cpu_kernels.run,
    "engines": engines.run,
    "start": start_scale.run,
    "front": front.run,
    "kv": kv_cache.run,
    "soak": soak.run,
    "embeddings": embeddings.run,
    "ollama": ollama.run,
    "rpc": rpc.run,
}
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"
BUSY_PERCENT = 20.0


def others_cpu() -> float:
    """CPU in use (% of all cores) over one second while nothing of ours runs."""
    import psutil

    return psutil.cpu_percent(interval=1.0)


def _figure(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


def table(rows: list[Row]) -> str:
    from model_serve.render import table_lines

    cells = [("benchmark", "measured", "reference", "ratio", "goal", "result")]
    for row in rows:
        ratio = f"{row.ratio:.2f}" if row.ratio is not None else "-"
        goal = f"{'ratio ' if row.goal and row.goal.on == 'ratio' else ''}{row.goal or ''}"
        cells.append((row.name, _figure(row.measured), _figure(row.reference), ratio, goal,
                      row.result + (f"  ({row.note})" if row.note else "")))
    return "\n".join(table_lines(cells, right={1, 2, 3}))


def machine() -> dict[str, Any]:
    import psutil

    def run(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=REPO)
            return (out.stdout + out.stderr).strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"unavailable: {exc}"

    binary = llama_server_binary()
    version = [line for line in run([str(binary), "--version"]).splitlines()
               if line.startswith("version")]
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "memory_bytes": psutil.virtual_memory().total,
            "llama_server": str(binary), "llama_server_version": " ".join(version),
            "git_commit": run(["git", "rev-parse", "HEAD"]),
            "git_dirty": bool(run(["git", "status", "--porcelain", "--untracked-files=no"])),
            "load_average": list(os.getloadavg())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, shorter windows")
    parser.add_argument("--only", default="", help=f"comma-separated: {','.join(BENCHMARKS)}")
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS,
                        help="where the JSON goes (default: bench/results)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from "
                     f"{', '.join(BENCHMARKS)}")

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    report: dict[str, Any] = {"started": stamp, "quick": args.quick, "machine": machine(),
                              "benchmarks": {}, "rows": [], "errors": {}}
    rows: list[Row] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="model-serve-bench-") as tmp:
        for name in names:
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            busy = others_cpu()
            began = time.monotonic()
            try:
                outcome = BENCHMARKS[name](Path(tmp) / name, args.quick)
            except Exception as exc:  # noqa: BLE001 - report it, run the others
                traceback.print_exc()
                report["errors"][name] = f"{type(exc).__name__}: {exc}"
                rows.append(Row(f"{name}: ERROR {type(exc).__name__}", None))
                continue
            seconds = time.monotonic() - began
            print(f"[bench] {name} done in {seconds:.0f}s", file=sys.stderr, flush=True)
            report["benchmarks"][name] = {**outcome.raw, "seconds": seconds,
                                          "others_cpu_percent": [busy, others_cpu()],
                                          "rows": [r.to_json() for r in outcome.rows]}
            rows += outcome.rows
            notes += outcome.notes
    report["rows"] = [r.to_json() for r in rows]
    report["machine"]["load_average_end"] = list(os.getloadavg())

    busy = max((max(b["others_cpu_percent"]) for b in report["benchmarks"].values()),
               default=0.0)
    if busy > BUSY_PERCENT:
        notes.append(f"other programs used up to {busy:.0f}% of the CPU between benchmarks: "
                     "absolute figures are inflated and ratios noisy; run on a quiet machine")
    print(table(rows))
    for note in notes:
        print(f"- {note}")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"{stamp}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"raw figures: {out}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
