"""HTTP to our own servers on loopback (the engine, the front, a model's server) with the
standard library. Every call is one short request to a known local address: no proxies,
redirects, cookies or TLS, which is all `requests` would add, at about 5 MB of memory in the
front and tens of milliseconds of imports in each command."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when a call is made: commands that never call start faster
    import http.client
    import socket


class LoopbackError(OSError):
    """The server did not answer (refused, timed out, closed, or spoke no HTTP)."""


@dataclass
class Answer:
    status_code: int
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)


def _connect(url: str, params: dict[str, str] | None, timeout: float,
             unix_socket: Path | None = None) -> tuple[http.client.HTTPConnection, str]:
    import http.client
    from urllib.parse import urlencode, urlsplit

    parts = urlsplit(url)
    query = "&".join(q for q in (parts.query, urlencode(params or {})) if q)
    target = (parts.path or "/") + (f"?{query}" if query else "")
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    if unix_socket is not None:  # the same request (Host included), through the socket
        conn.sock = unix_connection(unix_socket, timeout)
    return conn, target


def unix_connection(path: Path, timeout: float) -> socket.socket:
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        raise
    return sock


def call(method: str, url: str, headers: dict[str, str] | None = None, timeout: float = 10,
         json_body: Any = None, params: dict[str, str] | None = None,
         unix_socket: Path | None = None) -> Answer:
    """One request; the whole answer. `unix_socket`: sent through it, not to `url`'s port
    (the front's own socket)."""
    import http.client

    try:
        conn, target = _connect(url, params, timeout, unix_socket)
    except OSError as exc:
        raise LoopbackError(f"{method} {url} via {unix_socket}: {exc}") from exc
    sent = dict(headers or {})
    body = None
    if json_body is not None:
        body = json.dumps(json_body).encode()
        sent["Content-Type"] = "application/json"
    try:
        conn.request(method, target, body=body, headers=sent)
        response = conn.getresponse()
        return Answer(response.status, response.read())
    except (OSError, http.client.HTTPException) as exc:
        raise LoopbackError(f"{method} {url}: {exc or type(exc).__name__}") from exc
    finally:
        conn.close()


class LineStream:
    """An open GET answer, read line by line as the server sends (server-sent events)."""

    def __init__(self, url: str, conn: http.client.HTTPConnection,
                 response: http.client.HTTPResponse) -> None:
        self.url, self._conn, self._response = url, conn, response

    def __iter__(self) -> Iterator[bytes]:
        import http.client

        try:
            while line := self._response.readline():
                yield line.rstrip(b"\r\n")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise LoopbackError(f"GET {self.url}: {exc or type(exc).__name__}") from exc

    def close(self) -> None:
        self._conn.close()


def stream_lines(url: str, headers: dict[str, str] | None = None, connect_timeout: float = 5,
                 read_timeout: float = 3600) -> LineStream:
    """Open a GET whose answer comes over time; LoopbackError unless it answers 200."""
    import http.client

    conn, target = _connect(url, None, connect_timeout)
    try:
        conn.request("GET", target, headers=headers or {})
        response = conn.getresponse()
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        raise LoopbackError(f"GET {url}: {exc or type(exc).__name__}") from exc
    if response.status != 200:
        conn.close()
        raise LoopbackError(f"GET {url} answered HTTP {response.status}")
    if conn.sock is not None:
        conn.sock.settimeout(read_timeout)
    return LineStream(url, conn, response)
