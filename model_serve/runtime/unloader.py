"""The pressure unloader: when memory runs short, unload the least recently USED idle model.

Two triggers:
- polling: every PRESSURE_CHECK_INTERVAL seconds memory is read; above the threshold, idle
  models are unloaded one at a time, least recently used first, re-reading memory after each.
  macOS's own pressure level also counts, but it lags behind what an unload frees, so
  re-reading it would empty the machine in one pass: a check takes one model for it. At
  warn, then none for PRESSURE_CHECK_INTERVAL (load events included); at critical, at every
  check and load event;
- events: when the engine announces that a model starts loading, its footprint (weights + KV
  cache at its context, from the GGUF header) is added to current use, and idle models are
  unloaded first if the load would cross the threshold. With the front, which made room
  before it let the load start (runtime/admission.py), only current use is checked.

A model with a request in flight, or used within MIN_MODEL_AGE_SECONDS, is never unloaded.
Every decision is logged with its reason. Run as `python -m model_serve.runtime.unloader` (the
supervisor does); it logs to stdout, which the supervisor writes to the stack's log.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from model_serve.config.settings import Settings, load_settings
from model_serve.engines import Engine, select_engine
from model_serve.engines.base import REQUEST_ENDED, REQUEST_STARTED
from model_serve.errors import ModelServeError
from model_serve.runtime.activity import ActivityTracker, ModelActivity
from model_serve.runtime.memory import MemoryReading, read_memory

log = logging.getLogger("model_serve.runtime.unloader")

ACTIVITY_POLL = 1.0  # seconds between last-use probes while models are loaded
FRONT_POLL = 5.0  # ... with the front, whose record is exact whenever it is read
IDLE_POLL = 3.0  # ... while nothing is loaded
UNLOAD_WAIT = 15.0  # seconds to wait for an unloaded model's memory to be returned
REFUSED_BACKOFF = 60.0  # a model that refused to unload is not tried again for this long
MAX_ROUNDS = 64


class PressureUnloader:
    def __init__(self, settings: Settings, engine: Engine | None = None,
                 read: Callable[[], MemoryReading] = read_memory) -> None:
        self.settings = settings
        self.engine = engine or select_engine(settings)
        self.read = read
        self.tracker = ActivityTracker(self.engine)
        self.stop = threading.Event()
        # One relief at a time (polls and events both trigger it); guards the tracker too.
        self.lock = threading.RLock()
        self.refused: dict[str, float] = {}
        self.decisions: list[dict[str, Any]] = []
        self._estimates: dict[str, int] = {}
        self._estimates_stamp: float | None = None
        self._ttls: dict[str, int] = {}
        self._last_error = ""
        self._kernel_quiet_until = 0.0  # monotonic time before which the kernel level rests

    @property
    def activity_file(self) -> Path:
        return self.settings.state_dir / "activity.json"

    # --- footprint estimates ------------------------------------------------------------
    def _plan_read(self) -> None:
        """Estimates and TTLs come from the plan, read again when the engine config changed."""
        try:
            stamp = self.engine.config_path.stat().st_mtime
        except OSError:
            stamp = None
        if stamp != self._estimates_stamp:
            self._estimates_stamp = stamp
            read = self._read_plan()
            # No plan: no estimates, and the TTLs last read stay in force.
            self._estimates, self._ttls = read if read else ({}, self._ttls)

    def estimate(self, name: str) -> int:
        """Bytes the model will take once loaded (0 when unknown)."""
        self._plan_read()
        return self._estimates.get(name, 0)

    def _read_plan(self) -> tuple[dict[str, int], dict[str, int]] | None:
        """Footprint estimate and TTL by every name the engine routes; None without a plan."""
        from model_serve.runtime.sync import build_current_plan

        try:
            _catalog, plan = build_current_plan(self.settings, self.engine)
        except ModelServeError as exc:
            log.warning("footprint estimates unavailable: %s", exc.message)
            return None
        estimates: dict[str, int] = {}
        ttls: dict[str, int] = {}
        for served in plan:
            for name in self.engine.routed_names(served):
                estimates[name] = served.estimated_bytes
                ttls[name] = served.ttl
        return estimates, ttls

    def ttl(self, name: str) -> int:
        self._plan_read()
        return self._ttls.get(name, 0)

    @property
    def keeps_ttl(self) -> bool:
        """With the front the engine leaves TTL to us: a model's slots are saved before it
        goes (the router's sleep and llama-swap's TTL would drop them), and an Ollama
        client's keep_alive can lengthen or shorten it."""
        return self.settings.front_enabled

    def expire_idle(self) -> list[str]:
        """Unload the loaded models idle for their ttl or longer."""
        if not self.keeps_ttl:
            return []
        expired = []
        now = time.time()
        with self.lock:
            for act in list(self.tracker.models.values()):
                ttl = self.ttl(act.name) if act.keep_alive is None else act.keep_alive
                if act.state != "loaded" or ttl <= 0 or act.in_flight:
                    continue
                idle = act.idle_seconds(now)
                if idle >= ttl:
                    log.info("ttl: %s idle %.0fs (ttl %ds); unloading", act.name, idle, ttl)
                    if self._unload(act, idle_seconds=ttl,
                                    why=f"idle {idle:.0f}s, past its TTL ({ttl}s)"):
                        expired.append(act.name)
        return expired

    # --- decisions ----------------------------------------------------------------------
    def candidates(self, exclude: set[str]) -> list[ModelActivity]:
        """Loaded, idle, old enough models, least recently used first."""
        now = time.time()
        eligible = []
        for act in self.tracker.models.values():
            if act.state != "loaded" or act.name in exclude:
                continue
            if act.in_flight or act.idle_seconds(now) < self.settings.min_model_age_seconds:
                continue
            if self.refused.get(act.name, 0) > now:
                continue
            eligible.append(act)
        return sorted(eligible, key=lambda a: a.last_used)

    def trigger(self, reading: MemoryReading, need: int = 0) -> str | None:
        """Why memory must be freed now: "percent", "kernel" (macOS level), or None."""
        if reading.over(self.settings.memory_pressure_threshold, need):
            return "percent"
        if reading.pressure_level == "critical":
            return "kernel"
        if reading.kernel_asks and time.monotonic() >= self._kernel_quiet_until:
            return "kernel"
        return None

    def relieve(self, reason: str, need: int = 0, exclude: set[str] | None = None) -> list[str]:
        """Unload LRU idle models until memory (plus `need` bytes) is under the threshold; for
        the kernel's level alone, one model, then (at warn) not again for
        PRESSURE_CHECK_INTERVAL."""
        exclude = exclude or set()
        threshold = self.settings.memory_pressure_threshold
        unloaded: list[str] = []
        with self.lock:
            for _ in range(MAX_ROUNDS):
                reading = self.read()
                trigger = self.trigger(reading, need)
                if trigger is None:
                    break
                self.refresh()
                candidates = self.candidates(exclude)
                now = time.time()
                listing = ", ".join(f"{a.name} (idle {a.idle_seconds(now):.0f}s)"
                                    for a in candidates) or "none"
                projected = f" + {need / 2**30:.2f} GiB for the load" if need else ""
                why = (f"memory {reading.describe()}{projected} is over {threshold:g}%"
                       if trigger == "percent" else
                       f"the kernel reports {reading.pressure_level} memory pressure "
                       f"(memory {reading.describe()}{projected})")
                if not candidates:
                    log.warning("%s: %s, but no model is idle enough to unload (loaded: %s)",
                                reason, why, ", ".join(self.tracker.models) or "none")
                    break
                victim = candidates[0]
                log.info("%s: %s; candidates, least recently used first: %s; unloading %s",
                         reason, why, listing, victim.name)
                if self._unload(victim, self.settings.min_model_age_seconds,
                                f"{why}; least recently used"):
                    unloaded.append(victim.name)
                    self._record(reason, reading, victim, candidates, need, trigger)
                if trigger == "kernel":
                    self._kernel_quiet_until = (time.monotonic()
                                                + self.settings.pressure_check_interval)
                    break
        return unloaded

    def _unload(self, victim: ModelActivity, idle_seconds: float, why: str = "") -> bool:
        """Unload `victim`, judged idle (for `idle_seconds`) on the last activity read. With
        the front, the front unloads it, judging idleness again as it does: a request the
        front admitted since that read is never cut."""
        if self.settings.front_enabled:
            through_front = self._evict_through_front(victim, idle_seconds, why)
            if through_front is not None:
                return through_front
        try:
            self.engine.unload(victim.name)
        except ModelServeError as exc:
            log.error("could not unload %s (%s); not trying it again for %.0fs", victim.name,
                      exc.message, REFUSED_BACKOFF)
            self.refused[victim.name] = time.time() + REFUSED_BACKOFF
            return False
        deadline = time.monotonic() + UNLOAD_WAIT
        while time.monotonic() < deadline:
            try:
                now = {m.name: m for m in self.engine.models()}
            except ModelServeError:
                break
            current = now.get(victim.name)
            # Gone, or already a new instance (a request loaded it again): the unload is done.
            if current is None or current.state not in ("loaded", "loading", "stopping") \
                    or (current.port is not None and current.port != victim.port):
                break
            time.sleep(0.1)
        self.tracker.models.pop(victim.name, None)
        return True

    def _evict_through_front(self, victim: ModelActivity, idle_seconds: float,
                             why: str = "") -> bool | None:
        """True: unloaded; False: in use again (or failed: not tried for a while); None: the
        front did not answer (it serves no request then: the engine is asked directly)."""
        from model_serve import internal_key
        from model_serve.loopback import LoopbackError, call

        try:
            answer = call("POST", f"{self.settings.base_url}/api/model_serve/evict",
                          internal_key.own_headers(self.settings), UNLOAD_WAIT + 90,
                          json_body={"model": victim.name, "idle_seconds": idle_seconds,
                                     "why": why},
                          unix_socket=internal_key.front_socket(self.settings))
        except LoopbackError as exc:
            log.warning("the front did not answer the unload of %s (%s); asking the engine",
                        victim.name, exc)
            return None
        if answer.status_code == 200:
            self.tracker.models.pop(victim.name, None)
            return True
        if answer.status_code == 409:
            log.info("%s is in use again: not unloaded", victim.name)
            return False
        log.error("could not unload %s (HTTP %d: %s); not trying it again for %.0fs",
                  victim.name, answer.status_code, answer.text[:200], REFUSED_BACKOFF)
        self.refused[victim.name] = time.time() + REFUSED_BACKOFF
        return False

    def _record(self, reason: str, reading: MemoryReading, victim: ModelActivity,
                candidates: list[ModelActivity], need: int, trigger: str) -> None:
        now = time.time()
        self.decisions = (self.decisions + [{
            "time": now, "reason": reason, "trigger": trigger, "unloaded": victim.name,
            "pressure_level": reading.pressure_level,
            "memory_percent": round(reading.percent, 1), "need_bytes": need,
            "candidates": [{"name": a.name, "idle_seconds": round(a.idle_seconds(now), 1)}
                           for a in candidates],
        }])[-50:]
        self._save()

    # --- loops --------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Poll last use of every loaded model; False (logged once) if the engine is away."""
        try:
            with self.lock:
                self.tracker.refresh()
        except ModelServeError as exc:
            if exc.message != self._last_error:  # log a lasting outage once, not every second
                log.warning("engine not reachable: %s", exc.message)
                self._last_error = exc.message
            return False
        if self._last_error:
            log.info("engine reachable again")
            self._last_error = ""
        self._save()
        return True

    def _save(self) -> None:
        try:
            self.tracker.save(self.activity_file, {"decisions": self.decisions})
        except OSError as exc:
            log.warning("cannot write %s: %s", self.activity_file, exc)

    def follow_events(self) -> None:
        """React to loads as the engine announces them; reconnect when the stream drops."""
        while not self.stop.is_set():
            with self.lock:  # a new stream starts with a snapshot of what is in flight
                self.tracker.requests_in_flight.clear()
            try:
                for model, status in self.engine.events(self.stop):
                    if status in (REQUEST_STARTED, REQUEST_ENDED):
                        with self.lock:
                            self.tracker.request_event(model, status == REQUEST_STARTED)
                        continue
                    if status == "loading":
                        # The front admitted this load with its footprint counted: counting it
                        # again (part of it is already in memory) would unload one model too
                        # many. Only memory others took since then can be over the line.
                        need = 0 if self.settings.front_enabled else self.estimate(model)
                        self.relieve(f"load of {model}", need=need, exclude={model})
            except Exception as exc:  # noqa: BLE001 - the stream must never kill the daemon
                log.debug("event stream ended: %s", exc)
            self.stop.wait(1.0)

    def run(self) -> int:
        log.info("pressure unloader started: threshold %g%%, check every %ds, min age %ds",
                 self.settings.memory_pressure_threshold, self.settings.pressure_check_interval,
                 self.settings.min_model_age_seconds)
        threading.Thread(target=self.follow_events, name="events", daemon=True).start()
        next_check = time.monotonic()
        parent = os.getppid()
        while not self.stop.is_set():
            if os.getppid() != parent:  # the supervisor is gone: so is our reason to run
                log.warning("the supervisor exited; the pressure unloader stops too")
                break
            if self.refresh():
                try:
                    self.expire_idle()
                except Exception:  # noqa: BLE001 - log and keep watching
                    log.exception("ttl check failed")
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + self.settings.pressure_check_interval
                try:
                    self.relieve("memory check")
                except Exception:  # noqa: BLE001 - log and keep watching
                    log.exception("memory check failed")
            busy_poll = FRONT_POLL if self.settings.front_enabled else ACTIVITY_POLL
            self.stop.wait(busy_poll if self.tracker.models else IDLE_POLL)
        log.info("pressure unloader stopped")
        return 0


def main() -> int:
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        unloader = PressureUnloader(load_settings())
    except ModelServeError as exc:
        log.error("%s", exc)
        return exc.exit_code
    signal.signal(signal.SIGTERM, lambda *_: unloader.stop.set())
    signal.signal(signal.SIGINT, lambda *_: unloader.stop.set())
    return unloader.run()


if __name__ == "__main__":
    sys.exit(main())
