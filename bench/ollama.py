"""15. model_serve (router + front) against the real Ollama 0.32.15, side by side in one run.

Both stacks run at once, each with its own store, on the same GGUF (gemma-3-270m Q4_K_M), the
same context (DEFAULT_CTX_SIZE = OLLAMA_CONTEXT_LENGTH = 8192), one request at a time
(OLLAMA_NUM_PARALLEL=1, as our --parallel 1) and one model loaded at a time
(MAX_LOADED_MODELS=1, OLLAMA_MAX_LOADED_MODELS=1). Every request goes to the OpenAI paths both
serve (/v1/chat/completions, /v1/completions), and every row alternates the sides (ABBA).
The swap needs two different files: Ollama shares one runner between names of the same blob
(and `ollama create` drops bytes after the GGUF's end), so the second model is a copy of the
GGUF whose `general.name` differs by one letter (another digest, the same weights), on both
sides. Memory is the RSS sum of each stack's processes with one model warm:
ours (supervisor, unloader, front, router, the model's llama-server), Ollama's (`ollama serve`
and its runner).
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.harness import (
    PROMPT,
    Goal,
    Outcome,
    Row,
    gemma_path,
    median,
    running_stack,
    wait_until,
)
from bench.kv_cache import CONVERSATION, NEXT_TURN

MB = 1e6
CONTEXT = "8192"


def _stream(url: str, body: dict[str, Any], path: str = "/v1/chat/completions",
            session: Any = None) -> tuple[float, float, int, float]:
    """(TTFT s, total s, tokens, decode tok/s) of one streamed OpenAI request."""
    import requests

    from model_serve.sse import sse_payloads

    http = session or requests
    started = time.perf_counter()
    response = http.post(url + path, stream=True, timeout=600,
                         json={**body, "stream": True, "temperature": 0, "seed": 1,
                               "stream_options": {"include_usage": True}})
    response.raise_for_status()
    first, pieces, usage = 0.0, 0, 0
    for chunk in sse_payloads(response.iter_lines(chunk_size=None)):
        if chunk.get("usage"):
            usage = int(chunk["usage"].get("completion_tokens") or 0)
        for choice in chunk.get("choices") or []:
            text = choice.get("text") or (choice.get("delta") or {}).get("content")
            if text:
                first = first or time.perf_counter()
                pieces += 1
    done = time.perf_counter()
    tokens = usage or pieces
    if not first:
        raise RuntimeError(f"{url}: no token streamed")
    rate = (tokens - 1) / (done - first) if tokens > 1 and done > first else 0.0
    return first - started, done - started, tokens, rate


def _one_token(url: str, model: str, session: Any) -> float:
    """Milliseconds of a 1-token chat completion, not streamed."""
    started = time.perf_counter()
    response = session.post(url + "/v1/chat/completions", timeout=300, json={
        "model": model, "messages": PROMPT, "max_tokens": 1, "temperature": 0})
    response.raise_for_status()
    return (time.perf_counter() - started) * 1000


class Side:
    """One stack as the bench drives it: its URL, its two model names, how to unload."""

    def __init__(self, name: str, url: str, models: tuple[str, str]) -> None:
        self.name, self.url, self.models = name, url, models

    def unload(self, model: str) -> None:
        raise NotImplementedError

    def pids(self) -> list[int]:
        raise NotImplementedError

    def loaded(self) -> list[str]:
        """The models this stack holds in memory now, as it reports them."""
        raise NotImplementedError


class Ours(Side):
    def __init__(self, stack: Any, models: tuple[str, str]) -> None:
        super().__init__("model_serve", stack.base_url, models)
        self.stack = stack

    def unload(self, model: str) -> None:
        import requests

        # The front's eviction: saves the conversation, as an idle TTL or memory would.
        requests.post(f"{self.url}/unload", params={"model": model},
                      timeout=120).raise_for_status()

    def pids(self) -> list[int]:
        import psutil

        top = psutil.Process(self.stack.pids()["supervisor"])
        return [top.pid, *(child.pid for child in top.children(recursive=True))]

    def loaded(self) -> list[str]:
        return sorted(name for name, state in self.stack.states().items() if state == "loaded")


class Theirs(Side):
    def __init__(self, ollama: Any, models: tuple[str, str]) -> None:
        super().__init__("ollama", ollama.host, models)
        self.ollama = ollama

    def unload(self, model: str) -> None:
        import requests

        requests.post(f"{self.url}/api/generate", json={"model": model, "keep_alive": 0},
                      timeout=120).raise_for_status()
        wait_until(lambda: not requests.get(f"{self.url}/api/ps", timeout=10).json()["models"],
                   60, f"ollama to unload {model}")

    def pids(self) -> list[int]:
        return self.ollama.pids()

    def loaded(self) -> list[str]:
        import requests

        return sorted(m["name"] for m in
                      requests.get(f"{self.url}/api/ps", timeout=10).json()["models"])


def _rss(pids: list[int]) -> int:
    import psutil

    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_info().rss
    return total


def _rename(gguf: Path) -> None:
    """Change the first letter of the GGUF's `general.name` in place: another file, another
    digest, the same weights and length."""
    import struct

    with gguf.open("r+b") as file:
        head = file.read(1 << 20)
        key = head.index(b"general.name")
        kind, length = struct.unpack_from("<IQ", head, key + len(b"general.name"))
        if kind != 8 or not length:  # GGUF type 8 is a string
            raise RuntimeError(f"{gguf}: general.name is not a string")
        at = key + len(b"general.name") + 12
        file.seek(at)
        file.write(b"Y" if head[at:at + 1] != b"Y" else b"Z")


@contextlib.contextmanager
def _sides(root: Path) -> Iterator[tuple[Ours, Theirs]]:
    from tests.real_ollama import serving

    gguf = gemma_path()
    other = root / "second" / "gemma-3-270m-second-q4_k_m.gguf"
    other.parent.mkdir(parents=True)
    shutil.copyfile(gguf, other)
    _rename(other)
    with running_stack(root / "model_serve", DEFAULT_CTX_SIZE=CONTEXT,
                       MAX_LOADED_MODELS="1") as stack, \
            serving(root / "ollama", OLLAMA_CONTEXT_LENGTH=CONTEXT, OLLAMA_NUM_PARALLEL="1",
                    OLLAMA_MAX_LOADED_MODELS="1") as ollama:
        (root / "model_serve" / "models" / other.name).symlink_to(other)
        stack.model("sync")
        import json

        listed = json.loads(stack.model("list", "--json").stdout)
        by_path = {Path(m["path"]).name: m["name"] for m in listed}
        ours = (by_path[gguf.name], by_path[other.name])
        ollama.create("gemma3-a", gguf)
        ollama.create("gemma3-b", other)
        yield Ours(stack, ours), Theirs(ollama, ("gemma3-a", "gemma3-b"))


def _order(i: int, sides: tuple[Side, Side]) -> tuple[Side, Side]:
    return sides if i % 2 == 0 else (sides[1], sides[0])


def run(root: Path, quick: bool) -> Outcome:
    import requests

    warm_n, streams, unloads, long_turns, swaps = (10, 2, 2, 1, 2) if quick else (30, 5, 5, 3, 6)
    raw: dict[str, dict[str, list[float]]] = {
        key: {"model_serve": [], "ollama": []}
        for key in ("warm_ms", "stream_tok_s", "stream_tokens", "unload_ttft_s",
                    "long_turn_ttft_s", "swap_ttft_s", "rss_bytes", "loaded_after_swap")}
    with _sides(root) as pair:
        sessions = {side.name: requests.Session() for side in pair}
        for side in pair:  # loads model A, opens the connection, caches the prompt
            _one_token(side.url, side.models[0], sessions[side.name])
        for i in range(warm_n):
            for side in _order(i, pair):
                raw["warm_ms"][side.name].append(
                    _one_token(side.url, side.models[0], sessions[side.name]))
        for i in range(streams):
            for side in _order(i, pair):
                _ttft, _total, tokens, rate = _stream(side.url, {
                    "model": side.models[0], "messages": PROMPT, "max_tokens": 128,
                    "ignore_eos": True}, session=sessions[side.name])
                raw["stream_tok_s"][side.name].append(rate)
                raw["stream_tokens"][side.name].append(tokens)
        for side in pair:
            raw["rss_bytes"][side.name].append(_rss(side.pids()))
        for i in range(unloads):
            for side in _order(i, pair):
                side.unload(side.models[0])
                raw["unload_ttft_s"][side.name].append(_stream(side.url, {
                    "model": side.models[0], "messages": PROMPT, "max_tokens": 1})[0])
        follow_up = {}
        for side in pair:  # the conversation's first turn: its reply joins the next prompt
            body = {"model": side.models[0], "prompt": CONVERSATION, "max_tokens": 16}
            with requests.post(side.url + "/v1/completions", timeout=600,
                               json={**body, "temperature": 0, "seed": 1}) as first:
                first.raise_for_status()
                reply = first.json()["choices"][0]["text"]
            follow_up[side.name] = CONVERSATION + reply + "\n" + NEXT_TURN
        for i in range(long_turns):
            for side in _order(i, pair):
                prompt = follow_up[side.name]
                body = {"model": side.models[0], "max_tokens": 16}
                # The model holds the conversation, as after a turn; then it is unloaded.
                _stream(side.url, {**body, "prompt": prompt}, "/v1/completions")
                side.unload(side.models[0])
                raw["long_turn_ttft_s"][side.name].append(
                    _stream(side.url, {**body, "prompt": prompt}, "/v1/completions")[0])
        for i in range(swaps):
            for side in _order(i, pair):
                loaded, wanted = side.models if i % 2 == 0 else side.models[::-1]
                _stream(side.url, {"model": loaded, "messages": PROMPT, "max_tokens": 1})
                raw["swap_ttft_s"][side.name].append(_stream(side.url, {
                    "model": wanted, "messages": PROMPT, "max_tokens": 1})[0])
                raw["loaded_after_swap"][side.name].append(side.loaded())

    def med(key: str, name: str) -> float:
        return median(raw[key][name])

    ours, theirs = "model_serve", "ollama"
    outcome = Outcome(raw={"context": int(CONTEXT), **raw})
    outcome.rows += [
        Row(f"vs Ollama: warm 1-token chat, median of {warm_n} (ms)", med("warm_ms", ours),
            med("warm_ms", theirs), Goal("ratio", "<=", 1.0)),
        Row("vs Ollama: 128-token stream (tok/s)", med("stream_tok_s", ours),
            med("stream_tok_s", theirs), Goal("ratio", ">=", 0.95)),
        Row("vs Ollama: first token after an unload (s)", med("unload_ttft_s", ours),
            med("unload_ttft_s", theirs), Goal("ratio", "<=", 1.0)),
        Row("vs Ollama: next turn of a ~3k-token chat after an unload (s)",
            med("long_turn_ttft_s", ours), med("long_turn_ttft_s", theirs),
            Goal("ratio", "<=", 1.0)),
        Row("vs Ollama: swap to another model, one loaded at a time (s)",
            med("swap_ttft_s", ours), med("swap_ttft_s", theirs), Goal("ratio", "<=", 1.0)),
        Row("vs Ollama: memory of the stack, one model warm (MB RSS)",
            med("rss_bytes", ours) / MB, med("rss_bytes", theirs) / MB),
    ]
    short = [n for n in (ours, theirs) if min(raw["stream_tokens"][n]) < 128]
    if short:
        outcome.notes.append(f"ollama bench: streams shorter than 128 tokens on {short} "
                             f"(Ollama has no ignore_eos): {raw['stream_tokens']}")
    return outcome
