"""Why a model server ended when nobody asked it to, told in words.

The router reaps its model servers itself and reports a death by signal as "exited with status
1"; llama-swap, at its usual log level, says "upstream process exited unexpectedly". Either
way the signal is lost. When a model server ends abnormally, the model is started once more
on its own, as our child, with the engine check's probe: a crash that repeats (SIGILL on this
CPU, a corrupt file) is then seen for what it is. One that does not repeat came from outside
(out of memory, or another program). The outcome goes to the log and to `state/model-exits.json`,
which `model stats` reads.

Right after the kernel ended a process for lack of memory (Linux counts those kills in
/proc/vmstat), or while memory is over MEMORY_PRESSURE_THRESHOLD, the model is not started
again: the probe would need the memory that was missing. A probe that runs is recorded in the
supervisor's state (so `model stop` finds it, even after a crash) and ends with the stack.

A server model_serve itself stops (an unload, a reload that restarts its model) may end with
a non-zero status too, e.g. when it was still loading: whoever stops it notes that first
(`engines.stop_notes.note_stopping`, one file per model in state/intended-stops), and its exit
within ON_PURPOSE_WINDOW is logged as such, never diagnosed as a crash.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from model_serve import machine
from model_serve.config.settings import Settings
from model_serve.engines.stop_notes import stopped_on_purpose
from model_serve.fileio import write_if_changed

log = logging.getLogger("model_serve.exits")

# The router's line for a model server that ended: "instance name=X exited with status N".
ROUTER_EXIT_RE = re.compile(r"instance name=(\S+) exited with status (-?\d+)")
LLAMA_SWAP_EXIT_RE = re.compile(r"<(.+?)> upstream process exited unexpectedly")
UNKNOWN_STATUS = -1
EXITS_FILE = "model-exits.json"
RECHECK_AFTER = 60.0  # seconds before the same model's exit is diagnosed again


@dataclass
class ModelExit:
    model: str  # the engine's id
    status: int
    cause: str
    signal: str = ""
    at: float = 0.0


def parse_exit(line: str) -> tuple[str, int] | None:
    """(engine id, status) from an engine output line about a model server that ended badly."""
    match = ROUTER_EXIT_RE.search(line)
    if match and int(match.group(2)) != 0:
        return match.group(1), int(match.group(2))
    match = LLAMA_SWAP_EXIT_RE.search(line)
    if match:
        return match.group(1), UNKNOWN_STATUS
    return None


def load_exits(settings: Settings) -> dict[str, ModelExit]:
    try:
        data = json.loads((settings.state_dir / EXITS_FILE).read_text(encoding="utf-8"))
        return {name: ModelExit(**item) for name, item in data.items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def memory_short(settings: Settings) -> str:
    """Why memory is too short to start the model again now, or ''."""
    from model_serve.runtime.memory import read_memory

    try:
        reading = read_memory()
    except OSError:
        return ""
    if reading.over(settings.memory_pressure_threshold) or reading.kernel_asks:
        return (f"memory is short ({reading.describe()}, over "
                f"{settings.memory_pressure_threshold:g}%)")
    return ""


def diagnose(settings: Settings, model_id: str, status: int,
             started: Callable[[subprocess.Popen[bytes] | None], None] | None = None,
             oom_killed: bool = False) -> ModelExit:
    """Start the model alone for one token and say what ended its server; not when memory was
    what ended it (`oom_killed`, or short now): the probe would need that memory."""
    from model_serve.engines import select_engine
    from model_serve.engines.engine_check import required_options, run_probe
    from model_serve.engines.llama_server import resolve_llama_server
    from model_serve.errors import ModelServeError
    from model_serve.runtime.sync import build_current_plan

    said = "exited unexpectedly" if status == UNKNOWN_STATUS else f"exited with status {status}"
    short = "the kernel ended a process for lack of memory just then" if oom_killed \
        else memory_short(settings)
    if short:
        return ModelExit(model_id, status, f"{said} while {short}: most likely out of memory "
                         "(not started again to check, which would take the same memory)")
    try:
        engine = select_engine(settings)
        _catalog, plan = build_current_plan(settings, engine)
        binary = resolve_llama_server(settings.llama_server_bin)
    except ModelServeError as exc:
        return ModelExit(model_id, status, f"{said} (not diagnosed: {exc.message})")
    served = next((s for s in plan if engine.model_id(s.name) == model_id), None)
    if served is None:
        return ModelExit(model_id, status, f"{said} (the model is no longer configured)")
    run = run_probe(binary, served.path, required_options(settings, binary), started=started)
    if run.ok:
        return ModelExit(model_id, status, f"{said}; started alone it computes, so the cause "
                         "came from outside it (out of memory, or killed by another program?)")
    last = run.output_tail.splitlines()[-1] if run.output_tail else ""
    cause = f"{run.cause} (started alone, it ends the same way)"
    if not run.signal and last:
        cause += f": {last}"
    return ModelExit(model_id, status, cause, run.signal)


class ExitWatcher:
    """Fed every engine output line by the supervisor; diagnoses bad exits in the background."""

    def __init__(self, settings: Settings, changed: Callable[[], None] = lambda: None) -> None:
        self.settings = settings
        self.changed = changed  # told when a probe starts or ends (the state file lists them)
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._threads: list[threading.Thread] = []
        self._probes: dict[str, subprocess.Popen[bytes]] = {}
        self._oom_kills = machine.oom_kills()
        self.enabled = True  # off while the supervisor itself stops the engine
        self._closed = False

    def probe_pids(self) -> list[int]:
        with self._lock:
            return [probe.pid for probe in self._probes.values()]

    def feed(self, line: str) -> None:
        found = parse_exit(line) if self.enabled else None
        if found is None:
            return
        model_id, status = found
        if stopped_on_purpose(self.settings, model_id):
            log.info("model %s: its server ended as model_serve stopped it (an unload or a "
                     "reload)", model_id)
            return
        now = time.monotonic()
        kills = machine.oom_kills()
        with self._lock:
            oom_killed = kills is not None and self._oom_kills is not None \
                and kills > self._oom_kills
            self._oom_kills = kills
            if now - self._last.get(model_id, -RECHECK_AFTER) < RECHECK_AFTER:
                return
            self._last[model_id] = now
        thread = threading.Thread(target=self._diagnose, args=(model_id, status, oom_killed),
                                  daemon=True, name=f"exit-{model_id}")
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking lines; end the probes still running, and wait for their diagnoses."""
        self.enabled = False
        with self._lock:
            self._closed = True
            running = list(self._probes.values())
        for probe in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(probe.pid, signal.SIGKILL)  # its own session: the group is its own
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _diagnose(self, model_id: str, status: int, oom_killed: bool = False) -> None:
        probed: list[int] = []

        def started(probe: subprocess.Popen[bytes] | None) -> None:
            with self._lock:
                if probe is None:
                    self._probes.pop(model_id, None)
                else:
                    probed.append(probe.pid)
                    self._probes[model_id] = probe
                closed = self._closed
            if probe is not None and closed:  # the stack stops: not now
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(probe.pid, signal.SIGKILL)
            self.changed()

        try:
            found = diagnose(self.settings, model_id, status, started, oom_killed)
        except Exception as exc:  # noqa: BLE001 - a failed diagnosis must not end the stack
            found = ModelExit(model_id, status, f"exited with status {status} ({exc})")
        if probed and self._closed:
            log.info("model %s: its diagnosis was cut short by the stop", model_id)
            return  # the probe was ended by us: nothing learned
        found.at = time.time()
        log.error("model %s: its server %s", model_id, found.cause)
        self.record(found)

    def record(self, found: ModelExit) -> None:
        with self._lock:
            exits = load_exits(self.settings)
            exits[found.model] = found
            data: dict[str, Any] = {name: asdict(item) for name, item in exits.items()}
            write_if_changed(Path(self.settings.state_dir) / EXITS_FILE,
                             json.dumps(data, indent=1))
