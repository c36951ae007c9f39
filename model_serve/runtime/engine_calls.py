"""Blocking calls that may take long (a load, an unload and its wait, saving or restoring
conversations) run on a thread pool of their own. asyncio's default pool is small (cores + 4)
and also serves the front's quick work: /health, the model list, the DNS lookup of each new
upstream connection. A few loads waited on at once must not queue those behind them."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

THREADS = 64  # more than the loads and unloads a front waits on at once in practice
T = TypeVar("T")
_pool: ThreadPoolExecutor | None = None


def _the_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="engine-call")
    return _pool


async def engine_call(function: Callable[..., T], *args: Any) -> T:
    """`await asyncio.to_thread(function, *args)`, on the engine calls' own pool."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_the_pool(), functools.partial(function, *args))
