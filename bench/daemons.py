"""6. What the stack's own daemons cost while a model sits idle, and 7. how fast the pressure
unloader frees memory: on the engine's load event vs on its periodic check."""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench.harness import (
    MODEL_A,
    MODEL_B,
    Goal,
    Outcome,
    Row,
    Stack,
    chat,
    median,
    running_stack,
    wait_until,
)

MB = 1e6


def footprint(root: Path, quick: bool) -> Outcome:
    """RSS and CPU of the supervisor (with its sync-loop thread), the unloader and the front."""
    import psutil

    window = 10.0 if quick else 60.0
    with running_stack(root) as stack:  # BRIDGE_SYNC_INTERVAL default: the sync thread runs
        chat(stack.base_url, MODEL_A, 16)
        time.sleep(2.0)  # the model is loaded and idle
        procs = {name: psutil.Process(pid) for name, pid in stack.pids().items()}
        cpu0 = {name: sum(p.cpu_times()[:2]) for name, p in procs.items()}
        started = time.monotonic()
        rss = {name: 0 for name in procs}
        threads = {name: p.num_threads() for name, p in procs.items()}
        while time.monotonic() - started < window:
            for name, proc in procs.items():
                rss[name] = max(rss[name], proc.memory_info().rss)
            time.sleep(1.0)
        elapsed = time.monotonic() - started
        cpu = {name: (sum(p.cpu_times()[:2]) - cpu0[name]) / elapsed * 100
               for name, p in procs.items()}
        states = stack.states()
    if states.get(MODEL_A) != "loaded":
        raise RuntimeError(f"the model did not stay loaded during the window: {states}")
    outcome = Outcome(raw={"window_s": elapsed, "rss_bytes_max": rss, "cpu_percent": cpu,
                           "threads": threads})
    outcome.rows += [
        Row("supervisor + unloader RSS (MB)", (rss["supervisor"] + rss["unloader"]) / MB, None,
            Goal("measured", "<", 80)),
        Row("front RSS (MB)", rss.get("front", 0) / MB, None, Goal("measured", "<", 50)),
        Row("unloader RSS (MB)", rss["unloader"] / MB, None, Goal("measured", "<", 40)),
        Row("supervisor+sync RSS (MB)", rss["supervisor"] / MB),
        Row(f"daemons CPU total (% core, {elapsed:.0f}s)", sum(cpu.values()), None,
            Goal("measured", "<", 1)),
        Row("unloader CPU (% core)", cpu["unloader"], None, Goal("measured", "<", 0.5)),
        Row("supervisor+sync CPU (% core)", cpu["supervisor"]),
    ]
    return outcome


def _last_decision(stack: Stack) -> dict:
    record = json.loads((stack.state / "activity.json").read_text())
    return (record.get("decisions") or [{}])[-1]


def _event_path(root: Path, reps: int) -> list[float]:
    """Polling off (an hour): A loaded and idle, then a request to B; until A is unloaded."""
    import threading

    times: list[float] = []
    # FRONT=off: at 1% the front would not let the load start (it makes room first).
    with running_stack(root, two_models=True, MEMORY_PRESSURE_THRESHOLD="1", FRONT="off",
                       MIN_MODEL_AGE_SECONDS="0", PRESSURE_CHECK_INTERVAL="3600") as stack:
        idle, busy = MODEL_A, MODEL_B
        chat(stack.base_url, idle, 4)
        for _ in range(reps):
            time.sleep(2.0)  # the unloader (1 s poll) has seen `idle` loaded and idle
            request = threading.Thread(target=chat, args=(stack.base_url, busy, 16))
            sent = time.monotonic()
            request.start()
            try:
                done = wait_until(lambda m=idle: stack.states()[m] == "unloaded", 60,
                                  f"{idle} to be unloaded for {busy}")
            finally:
                request.join(120)
            decision = _last_decision(stack)
            if decision.get("reason") != f"load of {busy}":
                raise RuntimeError(f"unloaded for another reason than the load: {decision}")
            times.append(done - sent)
            idle, busy = busy, idle
    return times


def _polling(root: Path, reps: int, interval: int = 30) -> tuple[list[float], list[str]]:
    """Polling alone: from A's reply (idle, eligible at min age 0) until a check unloads it.

    The reaction depends on where in the check interval memory runs short, so the phase is
    spread evenly: after a check (seen as A unloading), wait (k + 0.5) / reps of the interval
    before loading A again. The mean then estimates the average reaction (interval / 2).
    """
    times: list[float] = []
    with running_stack(root, MEMORY_PRESSURE_THRESHOLD="1", MIN_MODEL_AGE_SECONDS="0",
                       FRONT="off", PRESSURE_CHECK_INTERVAL=str(interval)) as stack:

        def unloaded() -> bool:
            return stack.states()[MODEL_A] == "unloaded"

        chat(stack.base_url, MODEL_A, 4)  # a first check unloads it: the phase is known
        checked = wait_until(unloaded, interval + 30, "a check to unload A", interval=0.05)
        for k in range(reps):
            time.sleep(max(0.0, checked + (k + 0.5) / reps * interval - time.monotonic()))
            chat(stack.base_url, MODEL_A, 4)
            idle_since = time.monotonic()
            checked = wait_until(unloaded, interval + 30, "a check to unload A", interval=0.05)
            decision = _last_decision(stack)
            if decision.get("reason") != "memory check":
                raise RuntimeError(f"unloaded for another reason than a check: {decision}")
            times.append(checked - idle_since)
    return times, stack.log_lines("memory check")


def unload_reaction(root: Path, quick: bool) -> Outcome:
    reps = 1 if quick else 3
    event = _event_path(root / "event", reps)
    polling, checks = ([], []) if quick else _polling(root / "polling", reps)
    outcome = Outcome(raw={"event_path_s": event, "polling_s": polling,
                           "polling_check_log": checks})
    average = sum(polling) / len(polling) if polling else None
    outcome.rows.append(Row("unload reaction, load event (s)", median(event), average,
                            Goal("measured", "<", 1, "s")))
    if polling:
        outcome.rows.append(Row("unload reaction, 30 s polling (s)", average,
                                note=f"mean over phases spread across the interval; "
                                     f"longest {max(polling):.1f} s"))
    else:
        outcome.notes.append("unload reaction by polling alone (~2 minutes) skipped in --quick")
    return outcome
