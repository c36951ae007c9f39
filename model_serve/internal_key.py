"""The keys model_serve uses to reach its own servers.

With the front on the port, nobody but model_serve should reach the engine or a model's own
server on loopback: they answer to the *engine key*, which the supervisor makes at each start
and keeps in a 0600 file (never on a command line, where `ps` would show it). The front
accepts another one, the *owner key*, as the owner's: the sync's hold and release and the
CLI's control calls use it. Two keys, because the engine key travels (to every model
server's loopback port, in llama-swap's environment): a program that catches it there still
cannot open the front's control endpoints or `/slots`.
With FRONT=off the engine is the port, and the user's API_KEYS are its keys.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from model_serve.config.settings import Settings
from model_serve.fileio import write_if_changed


def owner_key_file(settings: Settings) -> Path:
    return settings.state_dir / "owner-key"


def make(settings: Settings) -> str:
    """New keys for this start (the old ones stop working when the engine restarts); the
    engine key is returned."""
    write_if_changed(owner_key_file(settings), secrets.token_urlsafe(32) + "\n", mode=0o600)
    key = secrets.token_urlsafe(32)
    write_if_changed(settings.internal_key_file, key + "\n", mode=0o600)
    return key


def write_keys_file(path: Path, keys: tuple[str, ...]) -> Path:
    """Keys for a program that reads them from a file (never a command line): one a line,
    0600."""
    write_if_changed(path, "\n".join(keys) + "\n", mode=0o600)
    return path


def _bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _read(path: Path) -> str | None:
    try:
        key = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return key or None


def read(settings: Settings) -> str | None:
    """The engine key."""
    return _read(settings.internal_key_file)


def read_owner(settings: Settings) -> str | None:
    return _read(owner_key_file(settings))


def engine_headers(settings: Settings) -> dict[str, str]:
    """What model_serve sends to the engine and to the model servers."""
    if not settings.front_enabled:
        return settings.auth_headers
    return _bearer(read(settings))


FRONT_SOCKET = "front.sock"
# Longest socket path every platform takes (macOS's sun_path holds 104 bytes, Linux's 108).
SOCKET_PATH_MAX = 103


def front_socket_path(settings: Settings) -> Path | None:
    """Where the front listens for model_serve's own calls (None: a path too long for a
    socket, so they go through the port): a Unix socket, 0600, that no client can fill
    up, unlike the port's MAX_CONNECTIONS."""
    path = settings.state_dir / FRONT_SOCKET
    return path if len(str(path).encode()) <= SOCKET_PATH_MAX else None


def front_socket(settings: Settings) -> Path | None:
    """The front's own socket, when it runs and has one: model_serve's own calls (the
    unloader's, the sync's hold, `model status`) go through it."""
    path = front_socket_path(settings) if settings.front_enabled else None
    return path if path is not None and path.is_socket() else None


def own_headers(settings: Settings) -> dict[str, str]:
    """What model_serve sends to its own port: the owner key where the front runs (it opens
    the control endpoints), else the user's first API key."""
    key = read_owner(settings) if settings.front_enabled else None
    return _bearer(key) or settings.auth_headers
