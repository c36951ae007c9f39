"""5. `model sync` with 10, 100 and 1,000 models (tiny but real GGUF headers), cold (fresh
state folder) and warm (second run), and through the Ollama bridge for 1,000 models.

Each figure is the wall time of the `model sync` command, as a user sees it. The empty
folder (0 models) is timed too, so the per-model cost excludes Python's start-up, and 2,000
models too, so linearity is judged where the per-model cost is well above the noise: the
cost per model from 1,000 to 2,000 should equal the one from 0 to 1,000.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

from bench.harness import PYTHON, REPO, Goal, Outcome, Row, isolated_env, median

SIZES = (0, 10, 100, 1000, 2000)
SHOWN = (10, 100, 1000)
BRIDGE_SIZE = 1000


def _sync(env: dict[str, str], *args: str) -> tuple[float, int]:
    """Wall time (ms) of `model sync ARGS` and the number of models it reported."""
    started = time.perf_counter()
    result = subprocess.run([PYTHON, "-m", "model_serve", "sync", *args], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    elapsed = (time.perf_counter() - started) * 1000
    found = re.search(r"^(\d+) model\(s\) for", result.stdout, re.MULTILINE)
    if result.returncode != 0 or not found:
        raise RuntimeError(f"model sync {' '.join(args)} failed ({result.returncode}):\n"
                           f"{result.stdout}{result.stderr}")
    return elapsed, int(found.group(1))


def _write_models(models: Path, count: int) -> None:
    from tests.ollama_store import gguf_bytes

    for i in range(count):
        name = f"bench{i:04d}"
        data = gguf_bytes(name=name, size_label="1B", extra={"general.basename": name})
        (models / f"{name}-1B-Q4_K_M.gguf").write_bytes(data)


def _write_store(store: Path, count: int) -> None:
    from tests.ollama_store import add_model

    for i in range(count):
        add_model(store, f"bench{i:04d}:latest", model_type="1B")


def _cold_and_warm(env: dict[str, str], root: Path, count: int, reps: int,
                   *args: str, bridged: bool = False) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"cold_ms": [], "warm_ms": []}
    for _ in range(reps):
        shutil.rmtree(root / "home" / "state", ignore_errors=True)
        if bridged:  # the bridge's links go too: a first sync ever
            shutil.rmtree(root / "models" / "ollama", ignore_errors=True)
        for key in ("cold_ms", "warm_ms"):
            elapsed, found = _sync(env, *args)
            if found != count:
                raise RuntimeError(f"model sync {' '.join(args)} found {found} models, "
                                   f"expected {count}")
            times[key].append(elapsed)
    return times


def run(root: Path, quick: bool) -> Outcome:
    reps = 1 if quick else 3
    scan: dict[int, dict[str, list[float]]] = {}
    for count in SIZES:
        folder = root / f"scan-{count}"
        env = isolated_env(folder)
        _write_models(folder / "models", count)
        scan[count] = _cold_and_warm(env, folder, count, reps, "--no-bridge")
    folder = root / "bridge"
    env = isolated_env(folder)
    _write_store(folder / "ollama", BRIDGE_SIZE)
    bridge = _cold_and_warm(env, folder, BRIDGE_SIZE, reps, bridged=True)

    cold = {n: median(t["cold_ms"]) for n, t in scan.items()}
    warm = {n: median(t["warm_ms"]) for n, t in scan.items()}
    # Marginal ms per model: 0 -> 1,000 and 1,000 -> 2,000.
    marginal = {kind: {"0-1000": (fig[1000] - fig[0]) / 1000,
                       "1000-2000": (fig[2000] - fig[1000]) / 1000}
                for kind, fig in (("cold", cold), ("warm", warm))}
    outcome = Outcome(raw={"no_bridge": {str(n): t for n, t in scan.items()},
                           "bridge": {str(BRIDGE_SIZE): bridge},
                           "marginal_ms_per_model": marginal})
    for n in SHOWN:
        outcome.rows.append(Row(f"sync --no-bridge {n} cold (ms)", cold[n], cold[0],
                                Goal("measured", "<", 1000, "ms") if n == 1000 else None))
        outcome.rows.append(Row(f"sync --no-bridge {n} warm (ms)", warm[n], warm[0],
                                Goal("measured", "<", 1000, "ms") if n == 1000 else None))
    outcome.rows += [
        Row(f"sync + bridge {BRIDGE_SIZE} cold (ms)", median(bridge["cold_ms"]), cold[0],
            Goal("measured", "<", 1000, "ms")),
        Row(f"sync + bridge {BRIDGE_SIZE} warm (ms)", median(bridge["warm_ms"]), warm[0],
            Goal("measured", "<", 1000, "ms")),
        # Linear: a model costs as much from 1,000 to 2,000 as from 0 to 1,000.
        Row("sync cold ms/model 1k-2k vs 0-1k", marginal["cold"]["1000-2000"],
            marginal["cold"]["0-1000"], Goal("ratio", "<=", 1.5)),
    ]
    outcome.notes.append("sync reference column = the same command on an empty MODELS_DIR "
                         "(Python start-up, imports, llama-server --help when cold)")
    return outcome
