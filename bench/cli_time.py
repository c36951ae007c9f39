"""4. Wall time of `model status`, `model list` and `model --help` against a bare Python
start-up, and what the start-up spends its import time on (`python -X importtime`)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from bench.harness import MODEL_A, PYTHON, REPO, Goal, Outcome, Row, chat, median, running_stack

COMMANDS: dict[str, list[str]] = {
    "python -c pass": [PYTHON, "-c", "pass"],
    "python -m model_serve status": [PYTHON, "-m", "model_serve", "status"],
    "python -m model_serve list": [PYTHON, "-m", "model_serve", "list"],
    "./model status": [str(REPO / "model"), "status"],
    "./model list": [str(REPO / "model"), "list"],
    "python -m model_serve --help": [PYTHON, "-m", "model_serve", "--help"],
}


def _wall(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, timeout=60)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr!r}")
    return elapsed * 1000


def import_profile(env: dict[str, str], top: int = 5) -> tuple[float, list[tuple[str, float]]]:
    """Total import time (ms) of `model status` and its `top` costliest top-level imports."""
    result = subprocess.run([PYTHON, "-X", "importtime", "-m", "model_serve", "status"],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    total = 0.0
    outer: list[tuple[str, float]] = []
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        self_us, cumulative_us, name = line.removeprefix("import time:").split("|")
        total += int(self_us)
        if len(name) - len(name.lstrip(" ")) == 1:  # imported at top level, not nested
            outer.append((name.strip(), int(cumulative_us) / 1000))
    outer.sort(key=lambda item: item[1], reverse=True)
    return total / 1000, outer[:top]


def run(root: Path, quick: bool) -> Outcome:
    runs = 5 if quick else 20
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    with running_stack(root) as stack:
        chat(stack.base_url, MODEL_A, 4)  # status and list with one model loaded
        for argv in COMMANDS.values():  # untimed: .pyc files and page cache warm
            _wall(argv, stack.env)
        for _ in range(runs):
            for name, argv in COMMANDS.items():  # interleaved, so drift hits all alike
                times[name].append(_wall(argv, stack.env))
        total_import, top = import_profile(stack.env)
    base = median(times["python -c pass"])
    outcome = Outcome(raw={"wall_ms": times, "import_total_ms": total_import,
                           "top_imports_ms": dict(top)})
    for name in COMMANDS:
        if name != "python -c pass":
            label = name.replace("python -m model_serve", "-m model_serve")
            outcome.rows.append(Row(f"{label} (ms)", median(times[name]), base,
                                    Goal("measured", "<", 80, "ms")))
    outcome.notes.append(f"`model status` import time {total_import:.0f} ms in all; top "
                         "top-level imports (cumulative): "
                         + ", ".join(f"{name} {ms:.0f} ms" for name, ms in top))
    return outcome
