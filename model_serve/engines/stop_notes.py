"""Stops model_serve makes on purpose, noted before it makes them (one file per model in
state/intended-stops, from any process), so the exit watcher does not diagnose them as
crashes. Apart from model_exits so that the engines, which stop models, need not import it."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

from model_serve.config.settings import Settings

log = logging.getLogger("model_serve.exits")

STOPS_DIR = "intended-stops"
ON_PURPOSE_WINDOW = 30.0  # seconds a noted stop covers the model's exit


def _stop_note(settings: Settings, model_id: str) -> Path:
    return settings.state_dir / STOPS_DIR / hashlib.sha256(model_id.encode()).hexdigest()[:24]


def note_stopping(settings: Settings, model_ids: list[str]) -> None:
    """Say, before stopping them, that these models' servers end on purpose."""
    for model_id in model_ids:
        note = _stop_note(settings, model_id)
        try:
            note.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            note.touch()
            os.utime(note)  # touch leaves an existing file's time alone on some systems
        except OSError as exc:  # the stop goes on; at worst its exit is diagnosed
            log.warning("could not note the stop of %s: %s", model_id, exc)


def stop_noted(settings: Settings, model_id: str, since: float) -> bool:
    """Whether a stop of this model was noted at or after `since` (wall clock); the note is
    left for the exit watcher."""
    try:
        return _stop_note(settings, model_id).stat().st_mtime >= since
    except OSError:
        return False


def stopped_on_purpose(settings: Settings, model_id: str) -> bool:
    """Whether model_serve noted this model's stop within ON_PURPOSE_WINDOW (the note is
    used up: a later exit is judged on its own)."""
    note = _stop_note(settings, model_id)
    try:
        recent = time.time() - note.stat().st_mtime < ON_PURPOSE_WINDOW
        note.unlink()
    except OSError:
        return False
    return recent
