"""The port's open connections, bounded: past MAX_CONNECTIONS a new connection gets an HTTP 503
and is closed before anything of it is read, so idle or slow sockets cannot use up the
front's file descriptors (macOS gives a process 256 by default) or its memory. Connections
already open are untouched; the next one is taken as soon as one closes. model_serve's own
calls come through the front's own Unix socket (runtime/front.py `serve`), which is not capped."""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
import time

from aiohttp import web

log = logging.getLogger("model_serve.front")

RESERVED_FILES = 64  # log files, the engine's pipes, the model files, sockets of our own
LOG_EVERY = 60.0  # seconds between two "connections refused" lines in one burst
RETRY_AFTER = 1


def refusal(limit: int) -> bytes:
    """The whole answer a connection past the cap gets (OpenAI's error shape)."""
    body = json.dumps({"error": {
        "message": f"the port has {limit} connections open (MAX_CONNECTIONS): try again, or "
                   "close idle connections, or raise MAX_CONNECTIONS",
        "type": "server_busy", "code": "too_many_connections"}}).encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Retry-After: {RETRY_AFTER}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    return head + body


def usable_limit(limit: int) -> int:
    """MAX_CONNECTIONS, lowered to what the open-files limit allows: each client connection
    may hold a second one to the engine. (The supervisor raises the soft limit at start; where
    that was refused, macOS's 256 would otherwise make the cap protect nothing.)"""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return limit
    budget = max(16, (soft - RESERVED_FILES) // 2)
    if limit <= budget:
        return limit
    log.warning("MAX_CONNECTIONS=%d is more than this process's open-files limit (%d) allows: "
                "capping connections at %d (raise the limit with ulimit -n, or lower "
                "MAX_CONNECTIONS)", limit, soft, budget)
    return budget


class ConnectionCap:
    """Counts the server's connections as aiohttp's Server sees them (its `connections`), and
    closes a new one past the limit. The check runs in the Server's own `connection_made`, the
    one step every accepted socket goes through, before any byte of it is read."""

    def __init__(self, server: web.Server, limit: int) -> None:
        self.server = server
        self.limit = usable_limit(limit)
        self.refused = 0
        self._said_at = 0.0
        self._accept = server.connection_made
        server.connection_made = self.connection_made  # type: ignore[method-assign]

    def connection_made(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        self._accept(handler, transport)
        if len(self.server.connections) <= self.limit or _own_socket(transport):
            return
        self.refused += 1
        transport.write(refusal(self.limit))
        handler.force_close()  # closes the transport once the answer is written
        self._say()

    def _say(self) -> None:
        now = time.monotonic()
        if now - self._said_at < LOG_EVERY:
            return
        log.warning("the port has %d connections open (MAX_CONNECTIONS): new ones get HTTP 503 "
                    "and are closed (%d refused so far)", self.limit, self.refused)
        self._said_at = now


def _own_socket(transport: asyncio.BaseTransport) -> bool:
    """A connection to the front's own Unix socket (model_serve's own calls), never capped."""
    sock = transport.get_extra_info("socket")
    return sock is not None and sock.family == socket.AF_UNIX
