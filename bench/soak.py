"""13. The soak: the features together, under load and change, on each engine.

Three names of the real gemma file (each with a 32k context and a full sliding-window cache,
about 0.8 GiB once loaded) and a MEMORY_PRESSURE_THRESHOLD measured on this machine so that
two fit and three do not. Several client threads send plain, streamed and abandoned requests
(the client closes the stream after its first token), through the real `openai` client and
raw HTTP, to random names. Meanwhile custom_models.yaml changes and `model sync` runs every
few seconds, and a model server is killed with SIGKILL now and then.

Every request is classified. Allowed: 200; 503 with Retry-After after the request waited the
whole LOAD_QUEUE_TIMEOUT while every loaded model was busy or other loads went first; 429 with
Retry-After (a full load queue); "it does not fit" or "other programs use that memory" only
where memory held by other programs (not the stack's own processes) plus the model's need
crossed the line. A stream cut while its model server was
being killed is counted apart. Anything else
is a fault: another status, a refusal that came early ("it does not fit" while two fit), a
broken stream, no answer within the hang bound. After `model stop` no process of the stack may
be left, and the front's memory must be flat: its RSS over the last quarter of the run may
exceed the first quarter's by RSS_GROWTH or RSS_SLACK_MB, whichever is more. The slack is
the allocator's: in a one-minute run the front's RSS steps up a few MB as its arenas grow
(seen: +4.7 MB in 60 s; in 180 s, +2.6 MB creeping over two minutes, one step of 2.7 MB, then
flat for the last minute while requests went on), where a leak keeps growing with the work.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import Goal, Outcome, Row, Stack, gemma_path, isolated_env

NAMES = ("ls/gemma-3:270m-q4_k_m", "ls/g2", "ls/g3")
KINDS = ("openai plain", "openai stream", "raw stream", "raw abandoned", "raw plain")
QUEUE_TIMEOUT = 10  # LOAD_QUEUE_TIMEOUT: short, so that a refused request comes back soon
HANG_BOUND = 90.0  # seconds: the queue timeout, a load, a KV save and a reply, with margin
RSS_GROWTH = 1.10  # the front's RSS, last quarter over first quarter
RSS_SLACK_MB = 8.0  # ... or this much more, whichever is more
PROMPT = [{"role": "user", "content": "Tell me about the sea."}]


def models_yaml(top_k: dict[str, int]) -> str:
    """Three names on the gemma file; `top_k` per name is what a config change edits (it
    changes the model's arguments, so the engine reloads it, but not its memory)."""
    lines = ["models:"]
    for name, base in (("gemma-3:270m-q4_k_m", None), ("g2", "gemma-3:270m-q4_k_m"),
                       ("g3", "gemma-3:270m-q4_k_m")):
        lines.append(f"  {name}:")
        if base:
            lines.append(f"    base_model: {base}")
        lines.append(f"    sampler_args: \"--swa-full --top-k {top_k[name]}\"")
    return "\n".join(lines) + "\n"


@dataclass
class Answer:
    client: int
    kind: str
    model: str
    started: float  # monotonic
    ended: float = 0.0
    status: int = 0  # 0: no HTTP answer at all
    retry_after: str = ""
    error_type: str = ""
    message: str = ""
    verdict: str = ""  # ok, busy, queue full, cut by a kill, or a fault's name

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass
class Soak:
    """One soak's settings and everything it recorded."""

    root: Path
    engine: dict[str, str]
    seconds: float
    clients: int = 6
    sync_every: float = 12.0
    kills: int = 2
    answers: list[Answer] = field(default_factory=list)
    syncs: list[dict[str, Any]] = field(default_factory=list)
    killed: list[dict[str, Any]] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)
    memory: list[tuple[float, int, int]] = field(default_factory=list)  # at, used, the stack's
    most_in_memory: int = 0
    loads: int = 0  # admission's loads and evictions, from the log
    evictions: int = 0
    front_pids: set[int] = field(default_factory=set)
    left_after_stop: list[int] = field(default_factory=list)
    stop_seconds: float = 0.0
    threshold: str = ""
    one_model_bytes: int = 0
    estimate_bytes: int = 0
    log_tail: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    # --- what it found ---------------------------------------------------------------------
    def faults(self) -> list[str]:
        found = [f"{a.kind} {a.model} after {a.seconds:.1f}s: {a.verdict} (HTTP {a.status} "
                 f"{a.error_type} {a.message[:160]})" for a in self.answers if a.verdict
                 not in ALLOWED]
        found += [f"`model sync` failed ({s['rc']}): {s['output'][-300:]}" for s in self.syncs
                  if s["rc"] != 0]
        if self.left_after_stop:
            found.append(f"processes left after `model stop`: {self.left_after_stop}")
        if len(self.front_pids) > 1:
            found.append(f"the front was restarted during the soak: pids {self.front_pids}")
        quarters = self.rss_quarters()
        if quarters is not None and quarters[1] - quarters[0] > rss_allowance(quarters[0]):
            found.append(f"front RSS grew {quarters[1] / quarters[0]:.2f}x "
                         f"({(quarters[1] - quarters[0]) / 1e6:+.1f} MB) from the first quarter "
                         f"to the last")
        if not any(a.verdict == "ok" for a in self.answers):
            found.append("no request was answered at all")
        return found

    def count(self, verdict: str) -> int:
        return sum(a.verdict == verdict for a in self.answers)

    def rss_quarters(self) -> tuple[float, float] | None:
        values = [rss for _, rss in self.rss]
        if len(values) < 8:
            return None
        quarter = len(values) // 4
        return statistics.median(values[:quarter]), statistics.median(values[-quarter:])

    def rss_growth(self) -> float | None:
        """Bytes the front's RSS grew from the first quarter to the last."""
        quarters = self.rss_quarters()
        return quarters[1] - quarters[0] if quarters else None

    def figures(self) -> dict[str, Any]:
        verdicts: dict[str, int] = {}
        for answer in self.answers:
            verdicts[answer.verdict] = verdicts.get(answer.verdict, 0) + 1
        ok = [a.seconds for a in self.answers if a.verdict == "ok"]
        quarters = self.rss_quarters()
        return {
            "engine": self.engine.get("ENGINE", "llama-server"), "seconds": self.seconds,
            "clients": self.clients, "requests": len(self.answers), "verdicts": verdicts,
            "by_kind": {k: sum(a.kind == k for a in self.answers) for k in KINDS},
            "longest_s": max((a.seconds for a in self.answers), default=0.0),
            "ok_median_s": statistics.median(ok) if ok else None,
            "syncs": len(self.syncs),
            "sync_longest_s": max((s["seconds"] for s in self.syncs), default=0.0),
            "kills": len(self.killed), "most_in_memory": self.most_in_memory,
            "loads": self.loads, "evictions": self.evictions,
            "stack_memory_peak_mib": max((m[2] for m in self.memory), default=0) / 2**20,
            "front_rss_first_quarter_mb": quarters[0] / 1e6 if quarters else None,
            "front_rss_last_quarter_mb": quarters[1] / 1e6 if quarters else None,
            "left_after_stop": self.left_after_stop, "stop_s": self.stop_seconds,
            "threshold_percent": self.threshold,
            "estimate_mib": self.estimate_bytes / 2**20,
            "one_model_mib": self.one_model_bytes / 2**20,
            "faults": self.faults()}

    def to_json(self) -> dict[str, Any]:
        return {**self.figures(), "answers": [asdict(a) for a in self.answers],
                "memory_samples": self.memory, "front_rss_samples": self.rss,
                "sync_runs": self.syncs, "killed": self.killed, "log_tail": self.log_tail}


ALLOWED = {"ok", "busy", "queue full", "cut by a kill", "no room (others)"}


# --- one request ---------------------------------------------------------------------------
def _classify(answer: Answer, body: dict[str, Any] | None) -> None:
    """The verdict of a request that got an HTTP status other than 200."""
    error = (body or {}).get("error") or {}
    answer.error_type = str(error.get("type") or "") if isinstance(error, dict) else ""
    answer.message = str(error.get("message") or error) if error else json.dumps(body)[:300]
    if answer.status == 429:
        answer.verdict = "queue full" if answer.retry_after else "429 without Retry-After"
    elif answer.status == 503 and answer.error_type == "no_memory_for_model":
        if not answer.retry_after:
            answer.verdict = "503 without Retry-After"
        elif ("busy" in answer.message or "LOAD_QUEUE_TIMEOUT" in answer.message
              or "still stopping" in answer.message) \
                and answer.seconds >= QUEUE_TIMEOUT - 0.5:
            answer.verdict = "busy"  # every loaded model busy, or other loads ahead, all along
        else:  # two fit: a refusal before the queue timeout means admission misjudged
            answer.verdict = "refused early"
    else:
        answer.verdict = f"HTTP {answer.status}"


def _body(model: str, stream: bool, tokens: int) -> dict[str, Any]:
    return {"model": model, "messages": PROMPT, "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}


def _raw(base_url: str, answer: Answer, stream: bool, abandon: bool, tokens: int) -> None:
    import requests

    response = requests.post(f"{base_url}/v1/chat/completions", json=_body(
        answer.model, stream, tokens), stream=stream, timeout=(10, HANG_BOUND))
    with response:
        answer.status = response.status_code
        answer.retry_after = response.headers.get("Retry-After", "")
        if response.status_code != 200:
            answer.ended = time.monotonic()
            with contextlib.suppress(ValueError):
                return _classify(answer, response.json())
            return _classify(answer, {"error": response.text[:300]})
        if not stream:
            reply = response.json()
            answer.verdict = "ok" if reply["usage"]["completion_tokens"] == tokens else \
                "short reply"
            return None
        from model_serve.sse import sse_payloads

        finished = False
        for chunk in sse_payloads(response.iter_lines(chunk_size=None)):
            if "error" in chunk:
                answer.message = str(chunk["error"])[:300]
                answer.verdict = "error in the stream"
                return None
            choices = chunk.get("choices") or []
            if abandon and choices and choices[0].get("delta", {}).get("content"):
                answer.verdict = "ok"  # the client leaves: the response is closed here
                return None
            if choices and choices[0].get("finish_reason"):
                finished = True
        answer.verdict = "ok" if finished else "stream ended early"
        return None


def _openai(base_url: str, answer: Answer, stream: bool, tokens: int) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="soak", max_retries=0,
                           timeout=HANG_BOUND)
    try:
        if not stream:
            reply = client.chat.completions.create(
                model=answer.model, messages=PROMPT, max_tokens=tokens, temperature=0,
                extra_body={"ignore_eos": True})
            answer.status = 200
            answer.verdict = "ok" if reply.usage and reply.usage.completion_tokens == tokens \
                else "short reply"
            return
        chunks = client.chat.completions.create(
            model=answer.model, messages=PROMPT, max_tokens=tokens, temperature=0,
            stream=True, extra_body={"ignore_eos": True})
        answer.status = 200
        finished = False
        with chunks:
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].finish_reason:
                    finished = True
        answer.verdict = "ok" if finished else "stream ended early"
    except openai.APIStatusError as exc:
        answer.status = exc.status_code
        answer.retry_after = exc.response.headers.get("Retry-After", "")
        answer.ended = time.monotonic()
        try:
            body = exc.response.json()
        except ValueError:
            body = {"error": exc.response.text[:300]}
        _classify(answer, body if isinstance(body, dict) else {"error": body})
    finally:
        client.close()


def one_request(base_url: str, answer: Answer, tokens: int) -> Answer:
    """Send it, wait for all of it (or its first token, if abandoned), and judge it."""
    import openai
    import requests

    try:
        if answer.kind == "openai plain":
            _openai(base_url, answer, False, tokens)
        elif answer.kind == "openai stream":
            _openai(base_url, answer, True, tokens)
        else:
            _raw(base_url, answer, stream=answer.kind != "raw plain",
                 abandon=answer.kind == "raw abandoned",
                 tokens=200 if answer.kind == "raw abandoned" else tokens)
    except (openai.APITimeoutError, requests.Timeout) as exc:
        answer.verdict = "hung"
        answer.message = f"{type(exc).__name__}: {exc}"[:300]
    except Exception as exc:  # noqa: BLE001 - every failure is a finding, never a crash
        answer.verdict = "cut" if answer.status == 200 else "no answer"
        answer.message = f"{type(exc).__name__}: {exc}"[:300]
    if not answer.ended:
        answer.ended = time.monotonic()
    if answer.seconds > HANG_BOUND and answer.verdict in ALLOWED:
        answer.verdict = "hung"
    return answer


# --- the actors ----------------------------------------------------------------------------
def _client(soak: Soak, base_url: str, number: int, until: float) -> None:
    rng = random.Random(number)
    turn = number
    while time.monotonic() < until:
        answer = Answer(number, KINDS[turn % len(KINDS)], rng.choice(NAMES), time.monotonic())
        turn += 1
        one_request(base_url, answer, rng.randint(4, 24))
        with soak.lock:
            soak.answers.append(answer)


def _model_servers(engine_pid: int) -> list[Any]:
    import psutil

    try:
        children = psutil.Process(engine_pid).children(recursive=True)
    except psutil.Error:
        return []
    found = []
    for child in children:
        with contextlib.suppress(psutil.Error):
            if "llama-server" in " ".join(child.cmdline()):
                found.append(child)
    return found


def _chaos(soak: Soak, stack: Stack, began: float, until: float, stop: threading.Event) -> None:
    """Config changes every `sync_every` seconds; `kills` SIGKILLs spread over the run."""
    from model_serve.config.settings import load_settings
    from model_serve.runtime.state import read_state

    rng = random.Random(99)
    top_k = {"gemma-3:270m-q4_k_m": 40, "g2": 40, "g3": 40}
    kill_at = [began + (i + 1) * (until - began) / (soak.kills + 1) for i in range(soak.kills)]
    next_sync = began + soak.sync_every
    pid_file = load_settings(stack.env).pid_file
    while not stop.wait(0.2) and time.monotonic() < until:
        now = time.monotonic()
        if kill_at and now >= kill_at[0]:
            state = read_state(pid_file)
            engine = state.child("engine").pid if state and state.child("engine") else None
            servers = _model_servers(engine.pid) if engine else []
            if servers:
                victim = rng.choice(servers)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim.pid, signal.SIGKILL)
                soak.killed.append({"at": time.monotonic(), "pid": victim.pid})
                kill_at.pop(0)
        if now >= next_sync:
            name = rng.choice(sorted(top_k))
            top_k[name] = 81 - top_k[name]  # 40 <-> 41
            (stack.root / "home" / "custom_models.yaml").write_text(models_yaml(top_k))
            started = time.monotonic()
            done = stack.model("sync", timeout=HANG_BOUND, check=False)
            soak.syncs.append({"at": started, "seconds": time.monotonic() - started,
                               "rc": done.returncode, "changed": name,
                               "output": (done.stdout + done.stderr)[-2000:]})
            next_sync += soak.sync_every  # a fixed cadence: a slow sync delays only the next


def _watch(soak: Soak, stack: Stack, stop: threading.Event) -> None:
    """The front's RSS and the most models in memory at once, every half second."""
    import psutil

    from model_serve.config.settings import load_settings
    from model_serve.runtime.memory import read_stack_memory

    pid_file = load_settings(stack.env).pid_file
    while not stop.wait(0.5):
        with contextlib.suppress(OSError, KeyError, ValueError, psutil.Error):
            pids = stack.pids()
            soak.front_pids.add(pids["front"])
            soak.rss.append((time.monotonic(), psutil.Process(pids["front"]).memory_info().rss))
            servers = read_stack_memory(pid_file).servers_bytes
            soak.memory.append((time.monotonic(), _used(), servers))
        with contextlib.suppress(Exception):
            soak.most_in_memory = max(soak.most_in_memory, _in_memory(stack))


def _private(supervisor: int) -> int:
    """Memory the stack's processes hold of their own (resident minus shared: the model file's
    pages are page cache, which `used` does not count)."""
    import psutil

    total = 0
    root = psutil.Process(supervisor)
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            info = proc.memory_info()
            total += info.rss - info.shared
    return total


def _in_memory(stack: Stack) -> int:
    from tests.conftest import models_in_memory

    return models_in_memory(stack.env)


# --- the stack -----------------------------------------------------------------------------
def _used() -> int:
    import psutil

    memory = psutil.virtual_memory()
    return memory.total - memory.available


def _percent(line: float) -> str:
    import psutil

    return f"{100 * line / psutil.virtual_memory().total:.2f}"


@contextlib.contextmanager
def _stack(root: Path, soak: Soak, **settings: str) -> Iterator[Stack]:
    from tests.conftest import stack_processes_under

    stack = Stack(root, isolated_env(root, **{
        "DEFAULT_CTX_SIZE": "32768", "MIN_MODEL_AGE_SECONDS": "0", "MODEL_THREADS": "1",
        "LOAD_QUEUE_TIMEOUT": str(QUEUE_TIMEOUT), "BRIDGE_SYNC_INTERVAL": "0",
        **soak.engine, **settings}))
    models = root / "models" / "google"
    models.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        (models / gemma_path().name).symlink_to(gemma_path())
    (root / "home" / "custom_models.yaml").write_text(models_yaml(
        {"gemma-3:270m-q4_k_m": 40, "g2": 40, "g3": 40}))
    try:
        stack.model("start")
        yield stack
    finally:
        log = stack.state / "logs" / "model_serve.log"
        if log.exists():
            text = log.read_text(errors="replace")
            soak.loads = text.count("admission: loading ")
            soak.evictions = text.count("(least recently used")
            soak.log_tail = text.splitlines()[-60:]
        began = time.monotonic()
        stack.model("stop", timeout=120, check=False)
        soak.stop_seconds = time.monotonic() - began
        soak.left_after_stop = stack_processes_under(root)
        for pid in soak.left_after_stop:  # never leave anything behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _measure_one(root: Path, soak: Soak) -> int:
    """What one model's server holds in memory once loaded, on a stack with room for all; returns
    the model's estimate (what admission counts before a load)."""
    import requests

    with _stack(root / "measure", soak, MEMORY_PRESSURE_THRESHOLD="99") as stack:
        listed = json.loads(stack.model("list", "--json").stdout)
        estimate = max(m["estimated_bytes"] for m in listed)
        # The stack's own processes, not the machine's use: other programs come and go.
        supervisor = stack.pids()["supervisor"]
        before = _private(supervisor)
        requests.post(f"{stack.base_url}/v1/chat/completions", timeout=120,
                      json=_body(NAMES[0], False, 1)).raise_for_status()
        time.sleep(1)
        soak.one_model_bytes = _private(supervisor) - before
    if soak.one_model_bytes < 400 * 2**20:
        raise RuntimeError(f"a model took only {soak.one_model_bytes / 2**20:.0f} MiB: the "
                           "soak needs more")
    time.sleep(2)
    return estimate


def run_soak(root: Path, engine: dict[str, str], seconds: float, clients: int = 6,
             sync_every: float = 12.0, kills: int = 2) -> Soak:
    """One soak on one engine (`engine`: its settings, {} for the router)."""
    soak = Soak(root, engine, seconds, clients, sync_every, kills)
    estimate = soak.estimate_bytes = _measure_one(root, soak)
    # Two loaded plus one more fit; three loaded do not (as tests/test_admission.py sets it).
    soak.threshold = _percent(_used() + 1.5 * soak.one_model_bytes + estimate)
    with _stack(root / "soak", soak, MEMORY_PRESSURE_THRESHOLD=soak.threshold) as stack:
        stop = threading.Event()
        began = time.monotonic()
        until = began + seconds
        actors = [threading.Thread(target=_client, args=(soak, stack.base_url, i, until))
                  for i in range(clients)]
        actors.append(threading.Thread(target=_chaos, args=(soak, stack, began, until, stop)))
        watcher = threading.Thread(target=_watch, args=(soak, stack, stop), daemon=True)
        watcher.start()
        for actor in actors:
            actor.start()
        for actor in actors:
            actor.join(seconds + 2 * HANG_BOUND)
        stop.set()
        watcher.join(10)
        _excuse_kills(soak)
        _excuse_no_room(soak)
        if any(actor.is_alive() for actor in actors):
            soak.answers.append(Answer(-1, "client thread", "-", began, time.monotonic(),
                                       verdict="hung", message="a client thread never ended"))
    return soak


def _excuse_no_room(soak: Soak) -> None:
    """Other programs share this machine (on a busy one, other model servers). A refusal that
    says the model does not fit is right when, in the second before it, memory admission
    cannot free plus the model's need crossed the line: then there truly was no room. What
    admission can free is the stack's model servers; the front, the supervisor and the engine
    itself hold memory no unload gives back, so they count with the other programs."""
    import re

    import psutil

    total = psutil.virtual_memory().total
    line = float(soak.threshold) * total / 100
    for answer in soak.answers:
        found = re.search(r"needs ([0-9.]+) GiB", answer.message)
        said_memory = "does not fit" in answer.message or "other programs" in answer.message
        if answer.verdict != "refused early" or not said_memory or not found:
            continue
        need = float(found.group(1)) * 2**30
        others = [used - servers for at, used, servers in soak.memory
                  if answer.ended - 1.5 <= at <= answer.ended]
        if others and max(others) + need > line:
            answer.verdict = "no room (others)"
            answer.message += f" [others held {max(others) / 2**30:.2f} GiB]"


def _excuse_kills(soak: Soak) -> None:
    """A stream whose model server was killed under it cannot be finished: counted apart."""
    for answer in soak.answers:
        if answer.verdict not in ("cut", "stream ended early"):
            continue
        if any(answer.started <= kill["at"] <= answer.ended for kill in soak.killed):
            answer.verdict = "cut by a kill"


def rss_allowance(first_quarter: float) -> float:
    """Bytes the front's RSS may grow over a soak (see the module's note)."""
    return max(first_quarter * (RSS_GROWTH - 1), RSS_SLACK_MB * 1e6)


# --- the benchmark -------------------------------------------------------------------------
def engines() -> Iterator[tuple[str, dict[str, str]]]:
    yield "router", {}
    from bench.engines import _llama_swap_settings

    swap = _llama_swap_settings()
    if swap is not None:
        yield "llama-swap", swap


def rows_of(label: str, soak: Soak) -> list[Row]:
    figures = soak.figures()
    verdicts = figures["verdicts"]
    quarters = soak.rss_quarters()
    faults = figures["faults"]
    return [
        Row(f"soak {label}: requests answered 200", float(verdicts.get("ok", 0)),
            float(figures["requests"]), note=f"{soak.clients} clients, {soak.seconds:.0f} s"),
        Row(f"soak {label}: 503 busy / 429 queue full (Retry-After)",
            float(verdicts.get("busy", 0) + verdicts.get("queue full", 0))),
        Row(f"soak {label}: 503 no room (other programs' memory)",
            float(verdicts.get("no room (others)", 0))),
        Row(f"soak {label}: streams cut by a kill", float(verdicts.get("cut by a kill", 0)),
            note=f"{figures['kills']} model servers killed"),
        Row(f"soak {label}: faults (wrong answers, hangs, leftovers)", float(len(faults)),
            goal=Goal("measured", "==", 0), note="; ".join(faults)[:300]),
        Row(f"soak {label}: longest request (s)", figures["longest_s"],
            goal=Goal("measured", "<", HANG_BOUND, "s")),
        Row(f"soak {label}: config syncs, longest (s)", figures["sync_longest_s"],
            note=f"{figures['syncs']} syncs"),
        Row(f"soak {label}: front RSS growth, last quarter over first (MB)",
            (quarters[1] - quarters[0]) / 1e6 if quarters else None,
            goal=Goal("measured", "<=", round(rss_allowance(quarters[0] if quarters else 0) / 1e6,
                                              1), "MB"),
            note=f"{quarters[0] / 1e6:.1f} -> {quarters[1] / 1e6:.1f} MB" if quarters else ""),
        Row(f"soak {label}: processes left after stop", float(len(soak.left_after_stop)),
            goal=Goal("measured", "==", 0)),
        Row(f"soak {label}: most models in memory at once", float(soak.most_in_memory),
            note="room for two"),
    ]


def run(root: Path, quick: bool) -> Outcome:
    seconds = 90.0 if quick else 300.0
    outcome = Outcome()
    for label, engine in engines():
        soak = run_soak(root / label, engine, seconds, kills=2 if quick else 4)
        outcome.raw[label] = soak.to_json()
        outcome.rows += rows_of(label, soak)
        for fault in soak.faults()[:20]:
            outcome.notes.append(f"soak {label}: {fault}")
    return outcome

