"""OLLAMA_HOST read as Ollama reads it, and whether it reaches model_serve's own port (the
variable is also what Ollama's clients set to find a server: model_serve, say)."""

from __future__ import annotations

from urllib.parse import urlsplit

LOOPBACK = ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::", "")


def server_url(setting: str) -> str:
    """OLLAMA_HOST as a URL, read as Ollama reads it: `host:port` gets http://, a host
    alone Ollama's port."""
    url = setting.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.port is None and parts.hostname:
        url = f"{parts.scheme}://{parts.netloc}:{443 if parts.scheme == 'https' else 11434}"
    return url


def points_at(url: str, host: str, port: int) -> bool:
    """Whether `url` reaches the server listening on host:port."""
    parts = urlsplit(url)
    name = (parts.hostname or "").lower()
    return parts.port == port and (name in LOOPBACK or name == host.lower())
