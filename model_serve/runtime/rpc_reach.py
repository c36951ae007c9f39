"""Whether a model's RPC workers answer, asked before its load.

llama-server connects to every worker while it reads its options: one that refuses the
connection ends it at once ("Failed to connect to HOST:PORT", an abort), and one on a host
that drops packets holds it for the system's TCP connect timeout (about two minutes on
Linux). A worker serves one client at a time, for the client's whole life (ggml-rpc-server
accepts the next connection when the last one closes): a second model server on a worker that
another one holds waits, silent, until that one ends. So a worker is asked what llama-server
asks first, HELLO, with a short timeout, and the request gets a 503 naming the worker at once
instead of a failed or hanging load.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
from collections.abc import Sequence

REACH_TIMEOUT = 3.0  # seconds a worker gets to accept a connection
HELLO_TIMEOUT = 5.0  # ... and then to answer HELLO
UNREACHABLE_KIND = "rpc_worker_unreachable"
# ggml-rpc's HELLO (protocol 7): command 14, the request's size, then the client's transport
# capabilities (24 bytes; none offered); the answer: its size, then version (3 bytes), a pad
# byte and the server's capabilities.
_CAPS = 24
_HELLO = struct.pack("<BQ", 14, _CAPS) + bytes(_CAPS)
BUSY = ("another model server is using it (a worker serves one at a time: unload the other "
        "model on it, or give each model workers of its own)")


async def _problem(worker: str, timeout: float) -> str:
    """Why `worker` (host:port) cannot be reached, or '' when it accepts a connection."""
    host, _, port = worker.rpartition(":")
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, int(port))
    except TimeoutError:
        return f"no answer within {timeout:g}s"
    except OSError as exc:  # asyncio's own loop puts "Connect call failed" in strerror
        return (os.strerror(exc.errno) if exc.errno else str(exc)).lower()
    try:
        writer.write(_HELLO)
        async with asyncio.timeout(HELLO_TIMEOUT):
            (size,) = struct.unpack("<Q", await reader.readexactly(8))
            answer = await reader.readexactly(min(size, 1 << 10))
    except TimeoutError:
        return BUSY
    except (OSError, asyncio.IncompleteReadError, struct.error):
        return ("it closed the connection: not an RPC worker, or one of another llama.cpp "
                "version")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if len(answer) < 3:
        return "its answer to HELLO is not ggml-rpc's"
    return ""


async def unreachable(workers: Sequence[str],
                      timeout: float = REACH_TIMEOUT) -> list[tuple[str, str]]:
    """The workers that do not accept a connection, each with why; all asked at once."""
    problems = await asyncio.gather(*(_problem(worker, timeout) for worker in workers))
    return [(worker, problem) for worker, problem in zip(workers, problems, strict=True)
            if problem]


def describe(model: str, missing: list[tuple[str, str]]) -> str:
    """The refusal's text: which workers, why, and what to run on them."""
    listed = "; ".join(f"{worker} ({problem})" for worker, problem in missing)
    hosts = ", ".join(dict.fromkeys(worker.rpartition(":")[0] for worker, _ in missing))
    return (f"{model} runs on RPC workers, and {len(missing)} cannot be reached: {listed}. "
            f"Run 'model worker status' on {hosts} (start it with 'model worker start "
            "--port N'), or remove the worker from rpc: in custom_models.yaml")
