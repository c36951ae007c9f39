"""16. What RPC costs: the gemma model over two ggml-rpc-servers on loopback against the same
model alone, side by side in one run, one llama-server at a time.

Generation and prompt tokens/s from `/completion`'s own timings, the model server talking to
the workers directly; the bytes that cross to and from the workers per generated token,
counted by a relay in front of each worker in a run of their own (the difference between a
65-token and a 1-token reply, divided by 64, so the load and the prompt cancel out); the model
server's RSS, which is this machine's share. Loopback is a floor for a real network: every
byte here also crosses it.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.harness import (
    Outcome,
    Row,
    free_port,
    gemma_path,
    hand_started_server,
    healthy,
    median,
    stop_process,
    wait_until,
)

PROMPT_TOKENS = 512
GENERATED = 64
WORKERS = 2


def rpc_server_binary() -> Path | None:
    """The RPC server `model worker` would run (RPC_SERVER_BIN, else beside llama-server)."""
    from model_serve.config.settings import load_settings
    from model_serve.engines.rpc_server import find_rpc_server
    from model_serve.errors import ModelServeError

    try:
        return find_rpc_server(load_settings())
    except ModelServeError:
        return None


@contextlib.contextmanager
def workers(count: int) -> Iterator[tuple[list[str], list[int]]]:
    """`count` ggml-rpc-servers on loopback, one thread each: (host:port list, pids)."""
    procs: list[subprocess.Popen[bytes]] = []
    addresses = []
    try:
        for _ in range(count):
            port = free_port()
            procs.append(subprocess.Popen(
                [str(rpc_server_binary()), "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True))
            addresses.append(f"127.0.0.1:{port}")
        for address in addresses:
            wait_until(lambda a=address: _listens(a), 10, f"a worker on {address}")
        yield addresses, [p.pid for p in procs]
    finally:
        for proc in procs:
            stop_process(proc)


def _listens(address: str) -> bool:
    import socket

    host, _, port = address.rpartition(":")
    with socket.socket() as probe:
        return probe.connect_ex((host, int(port))) == 0


class Relay:
    """A TCP relay on loopback in front of one worker, counting the bytes both ways."""

    def __init__(self, target: str) -> None:
        import socket

        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.bytes = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: Any, sink: Any) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 20):
                with self.lock:
                    self.bytes += len(data)
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(2)

    def close(self) -> None:
        self.server.close()


def _traffic(relays: list[Relay]) -> int:
    return sum(relay.bytes for relay in relays)


def measure(extra: list[str], reps: int, relays: list[Relay]) -> dict[str, list[float]]:
    """Tokens/s and RSS of one freshly started server; with `relays`, only the traffic."""
    import psutil
    import requests

    port = free_port()
    args = ["--model", str(gemma_path()), "--host", "127.0.0.1", "--port", str(port),
            "--ctx-size", "2048", "--parallel", "1", "--fit", "off", "--threads", "1", *extra]
    prompt = [10 + (i * 37) % 20000 for i in range(PROMPT_TOKENS)]
    figures: dict[str, list[float]] = {"prompt": [], "generation": [], "bytes_per_token": [],
                                       "rss": []}
    base = f"http://127.0.0.1:{port}"

    def complete(tokens: list[int], n: int) -> dict:
        body = {"prompt": tokens, "n_predict": n, "cache_prompt": False, "ignore_eos": True,
                "temperature": 0}
        reply = requests.post(base + "/completion", json=body, timeout=600)
        reply.raise_for_status()
        return reply.json()

    with hand_started_server(args) as proc:
        wait_until(lambda: healthy(base), 120, "llama-server to answer")
        complete(prompt[:32], 4)
        for _ in range(reps):
            if relays:
                before = _traffic(relays)
                complete(prompt[:32], 1)
                one = _traffic(relays) - before
                before = _traffic(relays)
                complete(prompt[:32], GENERATED + 1)
                many = _traffic(relays) - before
                figures["bytes_per_token"].append((many - one) / GENERATED)
                continue
            timings = complete(prompt, GENERATED)["timings"]
            figures["prompt"].append(timings["prompt_per_second"])
            figures["generation"].append(timings["predicted_per_second"])
        if not relays:
            figures["rss"].append(psutil.Process(proc.pid).memory_info().rss)
    return figures


def run(root: Path, quick: bool) -> Outcome:
    root.mkdir(parents=True, exist_ok=True)
    if rpc_server_binary() is None:
        outcome = Outcome()
        outcome.notes.append("rpc: llama.cpp's RPC server was not found (./install.sh builds "
                             "it; or set RPC_SERVER_BIN)")
        return outcome
    rounds, reps = (1, 2) if quick else (2, 4)
    names = ("alone, defaults", "alone, --no-repack", f"over {WORKERS} loopback workers")
    raw: dict[str, dict[str, list[float]]] = {
        n: {"prompt": [], "generation": [], "bytes_per_token": [], "rss": []} for n in names}
    with workers(WORKERS) as (addresses, _pids):
        variants = {names[0]: [], names[1]: ["--no-repack"],
                    names[2]: ["--rpc", ",".join(addresses)]}
        for round_number in range(rounds):
            for name in names if round_number % 2 == 0 else reversed(names):  # ABBA
                began = time.monotonic()
                figures = measure(variants[name], reps, [])
                print(f"[bench] rpc: {name}: generation {median(figures['generation']):.1f} "
                      f"tok/s ({time.monotonic() - began:.0f}s)", file=sys.stderr, flush=True)
                for key, values in figures.items():
                    raw[name][key] += values
        relays = [Relay(address) for address in addresses]
        try:
            figures = measure(["--rpc", ",".join(r.address for r in relays)], reps, relays)
        finally:
            for relay in relays:
                relay.close()
        raw[names[2]]["bytes_per_token"] += figures["bytes_per_token"]
    over, alone, plain = raw[names[2]], raw[names[0]], raw[names[1]]
    outcome = Outcome(raw={"variants": raw, "prompt_tokens": PROMPT_TOKENS,
                           "generated": GENERATED, "workers": WORKERS})
    mib = 2**20
    outcome.rows += [
        Row(f"gen {GENERATED} tok (tok/s): {names[2]} vs alone", median(over["generation"]),
            median(alone["generation"]), note="reference: alone, defaults"),
        Row(f"gen {GENERATED} tok (tok/s): {names[2]} vs --no-repack",
            median(over["generation"]), median(plain["generation"]),
            note="reference: alone, --no-repack (the kernels the workers run)"),
        Row(f"prompt {PROMPT_TOKENS} tok (tok/s): {names[2]} vs alone",
            median(over["prompt"]), median(alone["prompt"]), note="reference: alone, defaults"),
        Row("RPC traffic per generated token (MB, loopback)",
            median(over["bytes_per_token"]) / 1e6,
            note="both directions, counted by a relay in front of each worker; a floor for "
                 "a real network"),
        Row("model server RSS (MiB): over workers vs alone", median(over["rss"]) / mib,
            median(alone["rss"]) / mib, note="this machine's share of the model"),
    ]
    outcome.notes.append(f"rpc: at 1 Gbit/s, {median(over['bytes_per_token']) / 1e6:.2f} MB per "
                         f"token alone caps generation near "
                         f"{125e6 / median(over['bytes_per_token']):.0f} tok/s")
    return outcome
