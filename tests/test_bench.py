"""The benchmark suite runs and writes its figures: `python -m bench --quick --only sync`
(real `model sync` runs on real GGUF headers; no model server is started)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_quick_sync_benchmark_writes_its_figures(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "sync", "--results-dir",
         str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    [written] = tmp_path.glob("*.json")
    assert f"raw figures: {written}" in result.stdout
    report = json.loads(written.read_text())

    assert report["quick"] is True and report["errors"] == {}
    assert report["machine"]["cpus"] > 0 and report["machine"]["llama_server_version"]
    sync = report["benchmarks"]["sync"]
    for count in ("10", "100", "1000"):
        for kind in ("cold_ms", "warm_ms"):
            assert sync["no_bridge"][count][kind] and all(
                t > 0 for t in sync["no_bridge"][count][kind])
    assert all(t > 0 for t in sync["bridge"]["1000"]["cold_ms"] + sync["bridge"]["1000"]["warm_ms"])
    assert all(t > 0 for t in sync["real_vocabulary"]["200"]["cold_ms"])

    rows = {row["benchmark"]: row for row in report["rows"]}
    assert rows == {row["benchmark"]: row for row in sync["rows"]}
    at_1000 = rows["sync --no-bridge 1000 cold (ms)"]
    assert at_1000["measured"] > 0 and at_1000["reference"] > 0 and at_1000["ratio"] > 0
    assert at_1000["goal"] == "< 1000 ms" and at_1000["result"] in ("PASS", "MISS")
    # The table the user reads carries the same rows.
    assert all(name in result.stdout for name in rows)


def test_quick_ollama_benchmark_measures_both_stacks(tmp_path: Path) -> None:
    """`--only ollama`: model_serve and the real Ollama (../shared/tools/ollama) side by side;
    every row has a figure for each, and neither stack leaves a process behind."""
    import psutil

    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "ollama", "--results-dir",
         str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    [written] = tmp_path.glob("*.json")
    report = json.loads(written.read_text())
    assert report["errors"] == {}
    raw = report["benchmarks"]["ollama"]
    assert raw["context"] == 8192
    for key in ("warm_ms", "stream_tok_s", "unload_ttft_s", "long_turn_ttft_s", "swap_ttft_s",
                "rss_bytes"):
        for side in ("model_serve", "ollama"):
            assert raw[key][side] and all(v > 0 for v in raw[key][side]), (key, side)
    # Each swap really changed the model in memory: one loaded, never the same one twice.
    for side in ("model_serve", "ollama"):
        held = raw["loaded_after_swap"][side]
        assert all(len(names) == 1 for names in held), (side, held)
        assert held[0] != held[1], (side, held)
    rows = {row["benchmark"]: row for row in report["rows"]}
    assert len(rows) == 6 and all(name in result.stdout for name in rows)
    assert all(row["measured"] > 0 and row["reference"] > 0 for row in rows.values())
    left = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
            if "model-serve-bench-" in " ".join(p.info["cmdline"] or [])]
    assert left == []
