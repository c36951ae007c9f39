"""The key model_serve uses to reach its own servers behind the front.

With the front on the port, nobody but model_serve should reach the engine or a model's own
server on loopback: they answer to a key the supervisor makes at each start, kept in a 0600
file (never on a command line, where `ps` would show it). The front accepts it too, as the
owner's key: the sync's hold and release, and the CLI's control calls, use it.
With FRONT=off the engine is the port, and the user's API_KEYS are its keys.
"""

from __future__ import annotations

import secrets

from model_serve.config.settings import Settings
from model_serve.fileio import write_if_changed


def make(settings: Settings) -> str:
    """A new key for this start (the old one stops working when the engine restarts)."""
    key = secrets.token_urlsafe(32)
    write_if_changed(settings.internal_key_file, key + "\n", mode=0o600)
    return key


def read(settings: Settings) -> str | None:
    try:
        key = settings.internal_key_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return key or None


def engine_headers(settings: Settings) -> dict[str, str]:
    """What model_serve sends to the engine and to the model servers."""
    if not settings.front_enabled:
        return settings.auth_headers
    key = read(settings)
    return {"Authorization": f"Bearer {key}"} if key else {}


def own_headers(settings: Settings) -> dict[str, str]:
    """What model_serve sends to its own port: the internal key where the front runs (it opens
    the control endpoints), else the user's first API key."""
    key = read(settings) if settings.front_enabled else None
    return {"Authorization": f"Bearer {key}"} if key else settings.auth_headers
