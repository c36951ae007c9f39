"""The running stack's state file (`state/supervisor.json`), typed: written by the supervisor,
read by `model status/stop/stats` and the tests. Each child (engine, unloader, sync) moves
between phases only as TRANSITIONS allows, in the way of Supervisor's process states."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from model_serve.fileio import write_if_changed
from model_serve.runtime.procs import ProcRef


class Phase(str, Enum):
    STOPPED = "stopped"
    STARTING = "starting"  # runs, not yet ready (the engine's /health)
    RUNNING = "running"
    BACKOFF = "backoff"  # failed; waits before the next start (sync: the next try)
    FAILED = "failed"  # gave up after repeated failures; SIGHUP (a reload) retries

    def __str__(self) -> str:
        return self.value


# Where each phase may go. The sync loop has no starting phase: it is running or backing off.
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.STOPPED: frozenset({Phase.STARTING, Phase.RUNNING, Phase.BACKOFF, Phase.FAILED}),
    Phase.STARTING: frozenset({Phase.RUNNING, Phase.BACKOFF, Phase.FAILED, Phase.STOPPED}),
    Phase.RUNNING: frozenset({Phase.BACKOFF, Phase.FAILED, Phase.STOPPED}),
    Phase.BACKOFF: frozenset({Phase.STARTING, Phase.RUNNING, Phase.FAILED, Phase.STOPPED}),
    Phase.FAILED: frozenset({Phase.BACKOFF, Phase.STOPPED}),
}


class TransitionError(RuntimeError):
    """A move TRANSITIONS does not allow: a bug in the supervisor, never a user error."""


@dataclass
class ChildState:
    phase: Phase = Phase.STOPPED
    restarts: int = 0
    since: float = 0.0
    last_error: str = ""
    pid: ProcRef | None = None

    def move(self, to: Phase, now: float) -> bool:
        """Go to `to` (True), or stay (False) when already there."""
        if to == self.phase:
            return False
        if to not in TRANSITIONS[self.phase]:
            raise TransitionError(f"{self.phase} -> {to} is not an allowed move")
        self.phase, self.since = to, now
        return True

    def to_json(self) -> dict[str, Any]:
        return {"state": self.phase.value, "restarts": self.restarts, "since": self.since,
                "last_error": self.last_error, "pid": self.pid.to_json() if self.pid else None}

    @classmethod
    def from_json(cls, data: Any) -> ChildState:
        data = data if isinstance(data, dict) else {}
        try:
            phase = Phase(data.get("state", "stopped"))
        except ValueError:
            phase = Phase.STOPPED
        return cls(phase=phase, restarts=int(data.get("restarts") or 0),
                   since=float(data.get("since") or 0.0),
                   last_error=str(data.get("last_error") or ""),
                   pid=ProcRef.from_json(data.get("pid")))


@dataclass
class SupervisorState:
    pid: ProcRef | None
    port: int
    host: str = "127.0.0.1"
    engine: str = ""
    engine_version: str = ""
    started_at: float | None = None
    log_file: str = ""
    config_path: str = ""
    children: dict[str, ChildState] = field(default_factory=dict)
    model_procs: list[ProcRef] = field(default_factory=list)

    def child(self, name: str) -> ChildState:
        return self.children.get(name) or ChildState()

    def owned(self) -> list[ProcRef]:
        """The supervisor, every child it runs (engine, unloader) and the model servers."""
        refs = [self.pid, *(child.pid for child in self.children.values()), *self.model_procs]
        return [ref for ref in refs if ref is not None]

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid.to_json() if self.pid else None, "port": self.port,
                "host": self.host, "engine": self.engine, "engine_version": self.engine_version,
                "started_at": self.started_at, "log_file": self.log_file,
                "config_path": self.config_path,
                "children": {name: child.to_json() for name, child in self.children.items()},
                "model_procs": [ref.to_json() for ref in self.model_procs]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SupervisorState:
        children = data.get("children") if isinstance(data.get("children"), dict) else {}
        return cls(
            pid=ProcRef.from_json(data.get("pid")), port=int(data.get("port") or 0),
            host=str(data.get("host") or "127.0.0.1"), engine=str(data.get("engine") or ""),
            engine_version=str(data.get("engine_version") or ""),
            started_at=data.get("started_at"), log_file=str(data.get("log_file") or ""),
            config_path=str(data.get("config_path") or ""),
            children={str(name): ChildState.from_json(child)
                      for name, child in children.items()},
            model_procs=[ref for item in data.get("model_procs") or []
                         if (ref := ProcRef.from_json(item)) is not None])


def read_state(path: Path) -> SupervisorState | None:
    """The state file, or None when there is none (or it is unreadable: a crash mid-write)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return SupervisorState.from_json(data) if isinstance(data, dict) else None


def write_state(path: Path, state: SupervisorState) -> None:
    write_if_changed(path, json.dumps(state.to_json(), indent=1))
