"""Whether a model's RPC workers answer, asked before its load.

llama-server connects to every worker while it reads its options: one that refuses the
connection ends it at once ("Failed to connect to HOST:PORT", an abort), and one on a host
that drops packets holds it for the system's TCP connect timeout (about two minutes on
Linux). A connect with a short timeout tells both from a live worker, so the request gets a
503 naming the worker at once instead of a failed or hanging load.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

REACH_TIMEOUT = 3.0  # seconds a worker gets to accept a connection
UNREACHABLE_KIND = "rpc_worker_unreachable"


async def _problem(worker: str, timeout: float) -> str:
    """Why `worker` (host:port) cannot be reached, or '' when it accepts a connection."""
    host, _, port = worker.rpartition(":")
    try:
        async with asyncio.timeout(timeout):
            _reader, writer = await asyncio.open_connection(host, int(port))
    except TimeoutError:
        return f"no answer within {timeout:g}s"
    except OSError as exc:
        return (exc.strerror or str(exc)).lower()
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
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
