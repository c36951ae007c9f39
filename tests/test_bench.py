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
