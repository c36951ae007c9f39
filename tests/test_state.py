"""The supervisor's typed state: the phases' allowed moves, and the state file's round trip
(the running stack's own file is checked by the end-to-end and fault tests)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from model_serve.runtime.procs import ProcRef
from model_serve.runtime.state import (
    TRANSITIONS,
    ChildState,
    Phase,
    SupervisorState,
    TransitionError,
    read_state,
    write_state,
)


def test_every_phase_has_its_moves() -> None:
    assert set(TRANSITIONS) == set(Phase)
    assert all(phase not in TRANSITIONS[phase] for phase in Phase)  # staying is no move


@pytest.mark.parametrize(("start", "path"), [
    (Phase.STOPPED, [Phase.STARTING, Phase.RUNNING, Phase.BACKOFF, Phase.STARTING,
                     Phase.BACKOFF, Phase.FAILED, Phase.BACKOFF, Phase.STARTING,
                     Phase.STOPPED]),  # the engine: crash, retries, give up, SIGHUP, stop
    (Phase.STOPPED, [Phase.RUNNING, Phase.BACKOFF, Phase.RUNNING, Phase.STOPPED]),  # sync
])
def test_the_supervisors_paths_are_allowed(start: Phase, path: list[Phase]) -> None:
    child = ChildState(phase=start)
    for step, phase in enumerate(path):
        assert child.move(phase, now=float(step))
        assert child.phase == phase and child.since == float(step)
    assert not child.move(child.phase, now=99.0) and child.since == float(len(path) - 1)


@pytest.mark.parametrize(("start", "to"), [(Phase.FAILED, Phase.RUNNING),
                                           (Phase.FAILED, Phase.STARTING),
                                           (Phase.RUNNING, Phase.STARTING)])
def test_other_moves_are_refused(start: Phase, to: Phase) -> None:
    child = ChildState(phase=start)
    with pytest.raises(TransitionError, match=f"{start} -> {to}"):
        child.move(to, now=1.0)
    assert child.phase == start


def test_the_state_file_round_trips(tmp_path: Path) -> None:
    me = ProcRef.of(os.getpid())
    state = SupervisorState(
        pid=me, port=5847, engine="llama-server", engine_version="b1", started_at=1.5,
        log_file="/l", config_path="/c",
        children={"engine": ChildState(Phase.RUNNING, 2, 3.0, "boom", me),
                  "sync": ChildState(Phase.BACKOFF, last_error="bridge")},
        model_procs=[me])
    path = tmp_path / "supervisor.json"
    write_state(path, state)
    raw = json.loads(path.read_text())
    assert raw["children"]["engine"]["state"] == "running"  # what `status --json` shows
    assert raw["children"]["engine"]["pid"] == [me.pid, me.create_time]
    back = read_state(path)
    assert back == state
    assert back.owned() == [me, me, me]
    assert back.child("unloader") == ChildState()


@pytest.mark.parametrize("text", ["", "{", "[]", '{"children": {"engine": {"state": "odd"}}}'])
def test_a_damaged_state_file_reads_safely(tmp_path: Path, text: str) -> None:
    path = tmp_path / "supervisor.json"
    path.write_text(text)
    state = read_state(path)
    if state is not None:
        assert state.pid is None and state.child("engine").phase == Phase.STOPPED
    assert read_state(tmp_path / "absent.json") is None
