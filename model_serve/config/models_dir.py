"""Which LM Studio folder MODELS_DIR is when the user did not set it, chosen once and kept.

LM Studio moved its models from ~/.cache/lm-studio/models (the original tool's default) to
~/.lmstudio/models. When both exist, the one holding models of the user's own wins over one
holding only what model_serve put there (the bridge's links in ollama/, `model add`'s links
in added/); when both or neither hold such models, the original. The first time the stack
uses the folder, the choice is written to STATE_DIR/models-dir and kept while that folder
exists: a flip would move the bridge's links and the names under which conversations are
saved, so a model the user later puts in the other folder does not move the stack.
"""

from __future__ import annotations

import os
from pathlib import Path

BRIDGE_DIR = "ollama"  # the bridge's links, MODELS_DIR/ollama
ADDED_DIR = "added"  # `model add`'s links, MODELS_DIR/added
CHOICE_FILE = "models-dir"  # in STATE_DIR
_OWN_MODEL_DEPTH = 4  # LM Studio keeps publisher/model/file.gguf; a little deeper is allowed


def holds_own_models(folder: Path) -> bool:
    """A GGUF file under `folder` that model_serve did not put there."""
    root_depth = len(folder.parts)
    for current, dirs, files in os.walk(folder):
        here = Path(current)
        if here == folder:
            dirs[:] = [d for d in dirs if d not in (BRIDGE_DIR, ADDED_DIR)]
        if len(here.parts) - root_depth >= _OWN_MODEL_DEPTH:
            dirs[:] = []
        if any(name.lower().endswith(".gguf") for name in files):
            return True
    return False


def recorded_choice(state_dir: Path) -> Path | None:
    try:
        text = (state_dir / CHOICE_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return Path(text) if text else None


def choose_models_dir(original: Path, current: Path, state_dir: Path) -> Path:
    """MODELS_DIR when unset: the kept choice, else as the module docstring says."""
    kept = recorded_choice(state_dir)
    if kept in (original, current) and kept is not None and kept.is_dir():
        return kept
    if original.is_dir() and current.is_dir():
        return current if holds_own_models(current) and not holds_own_models(original) \
            else original
    if not original.exists() and current.is_dir():
        return current
    return original


def keep_choice(models_dir: Path, state_dir: Path) -> None:
    """Record the default folder the stack now uses (once; again only if it changed)."""
    if recorded_choice(state_dir) == models_dir:
        return
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / CHOICE_FILE).write_text(f"{models_dir}\n", encoding="utf-8")
    except OSError:
        pass  # unrecorded, the same rule chooses again next time
