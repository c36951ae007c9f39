"""Server-sent events as llama-server and llama-swap send them: one JSON payload per `data:`
line, `[DONE]` at the end of an OpenAI stream."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any


def sse_payloads(lines: Iterable[str | bytes]) -> Iterator[Any]:
    """The JSON payload of each `data:` line until `[DONE]`; other lines, and payloads that
    are not JSON, are skipped."""
    for line in lines:
        if isinstance(line, bytes):
            line = line.decode("utf-8", errors="replace")
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        try:
            yield json.loads(payload)
        except ValueError:
            continue
