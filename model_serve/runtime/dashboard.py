"""The dashboard: `/dashboard` on the port, and the read endpoints under `/api/model_serve/`
that it (and any other client) reads. The front only routes here; this module keeps what the
page shows that nothing else records: the last requests (status, duration, tokens), the
requests waiting for their model, and an hour of memory readings with the loads and unloads.

The page is three static files (dashboard_page/); it changes nothing by itself: its buttons
call the guarded control endpoints (POST, same origin, ADMIN_KEYS or API_KEYS) as any client
would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from model_serve.errors import ModelServeError
from model_serve.runtime.memory import read_memory

if TYPE_CHECKING:
    from model_serve.runtime.front import Front, Route

log = logging.getLogger("model_serve.front")

PAGE_DIR = Path(__file__).with_name("dashboard_page")
PAGE_FILES = {"/dashboard": ("index.html", "text/html"),
              "/dashboard/": ("index.html", "text/html"),
              "/dashboard/dashboard.js": ("dashboard.js", "text/javascript"),
              "/dashboard/dashboard.css": ("dashboard.css", "text/css")}
# Names, paths and log lines on the page come from files and clients: no script but the page's
# own file runs, nothing loads from elsewhere, and no other site may frame it.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
    # A site that opened the page (a link, window.open: the gate lets that navigation in) keeps
    # no handle on its window: it cannot send it elsewhere (a look-alike asking for the key) or
    # watch it. Nor may another site load the page's files into its own.
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
RECORD = "model_serve.record"  # the request's RequestRecord, on the aiohttp request
TAIL_KEPT = 4096  # bytes of an answer kept: its timings and usage come last
STREAM_END = b"data: [DONE]"  # the last event of an OpenAI stream
REQUESTS_KEPT = 200  # last requests kept for the page
MEMORY_EVERY = 10.0  # seconds between memory readings
MEMORY_KEPT = 360  # an hour of them
MARKS_KEPT = 500  # loads and unloads seen
REASON_KEPT = 120.0  # seconds a reason said for an unload waits for the unload
EXIT_RECENT = 30.0  # seconds: a model server's recorded exit this recent explains an unload
VIEW_EVERY = 1.0  # seconds between looks at the engine view (loads and unloads, no I/O)
EVENTS_TICK = 0.5  # seconds between checks for new requests on an open event stream
STATUS_EVERY = 2.0  # seconds between model and memory updates on an event stream
STATUS_FRESH = 1.5  # a status this recent is shared by every page open
LOG_LINES = 200
LOG_READ_MAX = 256 * 1024  # bytes of new log lines sent at once (the rest on the next tick)
# An event stream whose reader takes nothing for this long is gone (a tab frozen, a laptop
# asleep, a client that never reads): its connection is closed, not kept with a task forever.
EVENTS_WRITE_TIMEOUT = 30.0
# Event streams open at once: each reads the log twice a second in a thread of the front's
# own pool (which the request path uses too); pages past this many get a 503 and retry.
EVENT_STREAMS_MAX = 16
# Of those, kept for the owner's pages (a key that may read the log): clients with an API key
# alone, or a CORS_ORIGINS app's tabs, must not take every stream and lock the owner out.
EVENT_STREAMS_OWNER = 4
# Lines of the engine's output that can quote a request (llama-server's "got exception" with
# the JSON parser's "last read: '<text>'", a grammar it could not parse, its -v request and
# response dumps, prompt debug lines): on the port, the log panel shows that one was withheld.
_QUOTES_REQUEST = re.compile(
    r"got exception|last read|::=|error parsing grammar|request:|response:|prompt:|"
    r"formatted prompt|prompt token|\"(?:prompt|content|messages|input|text)\"",
    re.IGNORECASE)
_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (\S+) \w+ ")
_ENGINE_LINE = re.compile(r"^(\S+ \S+ model_serve\.engine \w+ )(.*)$")
# A line llama-server (or a model server through the router, "[port] ...") or llama-swap
# writes itself, as opposed to a text it prints over several lines (a grammar, a template, a
# request at -v): only those are shown.
_ENGINE_OWN_LINE = re.compile(r"^(\[\d+\] )?(\d+\.\d+\.\d+\.\d+ [IWED] |\[[A-Z]+\] )")
WITHHELD = ("[withheld from the dashboard: a line of the engine's output that may quote a "
            "request; 'model logs' shows it]")
_TIMING = re.compile(rb'"(cache_n|prompt_n|predicted_n|predicted_per_second|prompt_tokens|'
                     rb'completion_tokens)":\s*([0-9.]+)')


@dataclass(slots=True)
class RequestRecord:
    """One request for a model, from its arrival to its answer's end."""

    seq: int
    at: float  # wall clock, when it arrived
    model: str  # served name
    engine_id: str
    path: str
    began: float  # monotonic
    status: int | None = None
    duration: float | None = None
    restored: bool = False  # a saved conversation was restored for it
    tail: bytes = b""  # the answer's last bytes: its timings are read from them when shown
    last: tuple[bytes, bytes] = (b"", b"")  # the answer's last two chunks, as they pass
    engine_status: int | None = None  # the engine's answer began with this status
    answered: int | None = None  # the status of an answer read to its end from the engine

    def keep(self, status: int, payload: bytes | None = None) -> None:
        """The answer was read whole: its status, and the end of its last chunks (or of
        `payload`, the whole answer; one chunk may be a large answer too)."""
        self.answered = status
        self.tail = (b"".join(self.last) if payload is None else payload)[-TAIL_KEPT:]
        self.last = (b"", b"")

    def to_json(self) -> dict[str, Any]:
        found = {k.decode(): float(v) for k, v in _TIMING.findall(self.tail)}
        prompt = found.get("prompt_tokens")
        if "prompt_n" in found:  # llama-server's timings: the tokens read, and those reused
            prompt = found["prompt_n"] + found.get("cache_n", 0)
        predicted = found.get("predicted_n", found.get("completion_tokens"))
        speed = found.get("predicted_per_second")
        if speed is None and predicted and self.duration:
            speed = predicted / self.duration
        return {"seq": self.seq, "at": self.at, "model": self.model, "path": self.path,
                "status": self.status,
                "duration": round(self.duration, 3) if self.duration is not None else None,
                "prompt_tokens": int(prompt) if prompt is not None else None,
                "predicted_tokens": int(predicted) if predicted is not None else None,
                "tokens_per_second": round(speed, 1) if speed else None,
                "restored": self.restored}


class RequestLog:
    """The last requests and the ones not answered yet. Kept cheap: the request path only
    stores references; reading the figures out of the answer waits until someone looks."""

    def __init__(self) -> None:
        self.done: deque[RequestRecord] = deque(maxlen=REQUESTS_KEPT)
        self.open: dict[int, RequestRecord] = {}
        self.seq = 0
        self.version = 0  # moves on every begin and end: an event stream has news

    def begin(self, request: web.Request, route: Route) -> RequestRecord:
        self.seq += 1
        self.version += 1
        record = RequestRecord(self.seq, time.time(), route.served, route.engine_id,
                               request.path, time.monotonic())
        self.open[record.seq] = record
        request[RECORD] = record
        return record

    def end(self, record: RequestRecord, response: web.StreamResponse | None) -> None:
        # No response: the client left (499 as nginx logs it), or it closed the connection
        # on the stream's last event, before the engine's answer ended (then it had it all).
        if response is None and record.answered is None and record.engine_status and \
                STREAM_END in b"".join(record.last)[-64:]:
            record.keep(record.engine_status)
        record.status = response.status if response is not None else record.answered or 499
        if record.last[1]:  # not read to its end: keep what shows its figures, if any
            record.keep(record.status)
        record.duration = time.monotonic() - record.began
        self.open.pop(record.seq, None)
        self.done.append(record)
        self.version += 1

    def since(self, seq: int) -> list[RequestRecord]:
        return [r for r in self.done if r.seq > seq]


@dataclass(slots=True)
class MemorySample:
    at: float
    used_bytes: int
    total_bytes: int
    percent: float
    loaded: int  # models loaded then


class MemoryHistory:
    """An hour of memory readings, and the loads and unloads the engine view showed."""

    def __init__(self) -> None:
        self.samples: deque[MemorySample] = deque(maxlen=MEMORY_KEPT)
        self.marks: deque[dict[str, Any]] = deque(maxlen=MARKS_KEPT)
        self.loaded: set[str] | None = None
        self.version = 0  # moves with every reading and mark: a page then reads them again
        self.reasons: dict[str, tuple[float, str]] = {}  # engine id -> why it goes (when said)

    def note(self, engine_id: str, why: str) -> None:
        """Why a model is about to be unloaded (the first reason said counts)."""
        self.reasons.setdefault(engine_id, (time.monotonic(), why))

    def look(self, states: dict[str, str],
             served: Callable[[str], str]) -> list[dict[str, Any]]:
        """Marks each load and unload since the last look (`states`: engine id -> state). An
        empty view is the engine's feed being down, not every model gone. `served`: the name
        a model is served by, from its engine id. Returns the new marks."""
        if not states:
            return []
        loaded = {name for name, state in states.items() if state == "loaded"}
        new: list[dict[str, Any]] = []
        if self.loaded is not None:
            now = time.time()
            for name in sorted(loaded - self.loaded):
                new.append({"at": now, "event": "load", "model": served(name)})
            for name in sorted(self.loaded - loaded):
                said = self.reasons.pop(name, None)
                new.append({"at": now, "event": "unload", "model": served(name),
                            "engine_id": name, "why": said[1] if said else None})
        self.marks.extend(new)
        self.version += len(new)
        stale = time.monotonic() - REASON_KEPT
        for name in [n for n, (at, _why) in self.reasons.items() if at < stale]:
            del self.reasons[name]  # said, but it never went (in use again, say)
        self.loaded = loaded
        return new

    def to_json(self) -> dict[str, Any]:
        return {"samples": [asdict(s) for s in self.samples], "marks": list(self.marks)}


class LogFilter:
    """Log lines as the port may show them: never what a request said. Shown are model_serve's
    own records, and those of the engine's lines that begin with its own log prefix and name
    nothing that quotes a request (_QUOTES_REQUEST); not a line without that prefix (a text
    the engine prints over several lines: a grammar it could not parse, a template, a request
    at -v), whatever it holds. A record's continuation lines (a traceback) go as the record
    went. The owner's own file keeps every line."""

    def __init__(self) -> None:
        self.withholding = False  # the record the next continuation line belongs to

    def shown(self, line: str) -> str:
        record = _RECORD.match(line)
        if record is None:  # a continuation line
            return WITHHELD if self.withholding else line
        engine = _ENGINE_LINE.match(line)
        if engine is None:
            self.withholding = False
            return line  # model_serve's own record
        text = engine.group(2)
        self.withholding = (_ENGINE_OWN_LINE.match(text) is None
                            or _QUOTES_REQUEST.search(text) is not None)
        return engine.group(1) + WITHHELD if self.withholding else line

    def lines(self, text: str) -> list[str]:
        return [self.shown(line) for line in text.splitlines()]


def shown(line: str) -> str:
    """One line on its own, as the port may show it."""
    return LogFilter().shown(line)


class LogTail:
    """The log's new lines since the last read; at first (and after a rotation) its last
    LOG_LINES lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset: int | None = None
        self.file: tuple[int, int] | None = None  # (device, inode): a rotation makes a new one
        self.filter = LogFilter()

    def read(self) -> tuple[list[str], bool]:
        """(lines, whether they replace what was shown)."""
        from model_serve.runtime.stack import tail

        try:
            found = self.path.stat()
        except OSError:
            return [], False
        size, file = found.st_size, (found.st_dev, found.st_ino)
        if self.offset is None or size < self.offset or file != self.file:
            self.offset, self.file = size, file
            self.filter = LogFilter()
            return self.filter.lines(tail(self.path, LOG_LINES)), True
        if size == self.offset:
            return [], False
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read(min(size - self.offset, LOG_READ_MAX))
        end = data.rfind(b"\n")
        if end < 0:
            return [], False  # a line being written: read it whole next time
        self.offset += end + 1
        return self.filter.lines(data[:end].decode("utf-8", "replace")), False


class Dashboard:
    def __init__(self, front: Front) -> None:
        self.front = front
        self.requests = RequestLog()
        self.memory = MemoryHistory()
        self._status: tuple[float, dict[str, Any]] | None = None
        self._status_lock = asyncio.Lock()
        self._closing = asyncio.Event()  # the front stops: event streams end now
        self.streams = 0  # event streams open

    # --- routing (the front's hook) ------------------------------------------------------
    def route(self, request: web.Request
              ) -> Callable[[web.Request], Awaitable[web.StreamResponse]] | None:
        path, method = request.path, request.method
        if path in PAGE_FILES and method in ("GET", "HEAD"):
            return self.page
        if path.startswith("/dashboard/"):
            return self.not_a_page  # open to all (the gate): nothing here reaches the engine
        if method == "GET":
            return {"/api/model_serve/status": self.status,
                    "/api/model_serve/requests": self.recent,
                    "/api/model_serve/memory": self.memory_history,
                    "/api/model_serve/events": self.events,
                    "/api/model_serve/log": self.log_tail,
                    "/api/model_serve/peers": self.peers}.get(path)
        if method == "POST":
            return {"/api/model_serve/load": self.load,
                    "/api/model_serve/forget": self.forget}.get(path)
        return None

    async def running(self, _app: web.Application) -> AsyncIterator[None]:
        """Records memory and the view's loads while the front runs (its cleanup context)."""
        task = asyncio.create_task(self._record())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def closing(self, _app: web.Application) -> None:
        """The front is stopping: open event streams end at once (the server would otherwise
        wait its shutdown timeout for them, and then cut them)."""
        self._closing.set()

    async def _record(self) -> None:
        next_reading, said = 0.0, False
        while True:
            try:
                next_reading = await self._record_once(next_reading)
            except Exception:  # noqa: BLE001 - the record must outlive any one bad look
                if not said:  # once: it would repeat every second
                    log.warning("the dashboard's record of memory and unloads failed",
                                exc_info=True)
                said = True
            await asyncio.sleep(VIEW_EVERY)

    async def _record_once(self, next_reading: float) -> float:
        for engine_id in self.front.admission.evicting:
            self.memory.note(engine_id, "admission: room for another model's load")
        new = self.memory.look({n: m.state for n, m in self.front.view.models.items()},
                               self._served)
        unexplained = [m for m in new if m["event"] == "unload" and not m["why"]]
        if unexplained:
            await self._explain(unexplained)
        if time.monotonic() >= next_reading:
            next_reading = time.monotonic() + MEMORY_EVERY
            reading = await asyncio.to_thread(read_memory)
            self.memory.samples.append(MemorySample(
                time.time(), reading.used, reading.total, round(reading.percent, 1),
                len(self.memory.loaded or ())))
            self.memory.version += 1
        return next_reading

    async def _explain(self, marks: list[dict[str, Any]]) -> None:
        """An unload nobody asked for: a crash when the model server's exit was recorded
        (model_exits), else the engine's own doing."""
        from model_serve.runtime.model_exits import load_exits

        exits = await asyncio.to_thread(load_exits, self.front.settings)
        for mark in marks:
            ended = exits.get(mark["engine_id"])
            if ended is not None and abs(mark["at"] - ended.at) < EXIT_RECENT:
                mark["event"] = "crash"
                mark["why"] = ended.cause
            else:
                mark["why"] = "the engine unloaded it (its own limit or TTL)"

    # --- the page --------------------------------------------------------------------------
    async def page(self, request: web.Request) -> web.StreamResponse:
        name, kind = PAGE_FILES[request.path]
        try:
            body = await asyncio.to_thread((PAGE_DIR / name).read_bytes)
        except OSError:
            return _error(404, f"the dashboard's file {name} is missing from {PAGE_DIR}: "
                          "reinstall model_serve (./install.sh)", "not_found")
        return web.Response(body=body, content_type=kind, charset="utf-8",
                            headers=PAGE_HEADERS)

    async def not_a_page(self, request: web.Request) -> web.StreamResponse:
        return _error(404, f"the dashboard has no {request.path}: open /dashboard",
                      "not_found")

    # --- read endpoints --------------------------------------------------------------------
    async def status(self, request: web.Request) -> web.StreamResponse:
        try:
            return web.json_response(await asyncio.to_thread(self._collect))
        except ModelServeError as exc:
            return _error(503, exc.message, "engine_unavailable", retry_after=2)

    async def peers(self, request: web.Request) -> web.StreamResponse:
        """The PEERS as this front sees them (no engine needed: they are served without it)."""
        return web.json_response({"peers": self.front.peers.report()})

    async def recent(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self._requests_json(0))

    async def memory_history(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({**self.memory.to_json(),
                                  "threshold_percent": self._threshold()})

    async def log_tail(self, request: web.Request) -> web.StreamResponse:
        from model_serve.runtime.stack import tail

        try:
            lines = max(1, min(LOG_LINES, int(request.query.get("lines", "100"))))
        except ValueError:
            return _error(400, "lines must be a number", "invalid_request")
        path = self.front.settings.log_file
        text = await asyncio.to_thread(tail, path, lines)
        return web.json_response({"file": str(path), "lines": LogFilter().lines(text)})

    async def snapshot(self) -> dict[str, Any]:
        """Models (as `model stats` shows them) and memory, for the event streams: shared
        between them for STATUS_FRESH seconds, as each costs a look at every model server."""
        async with self._status_lock:
            now = time.monotonic()
            if self._status is not None and now - self._status[0] < STATUS_FRESH:
                return self._status[1]
            report = await asyncio.to_thread(self._collect)
            self._status = (time.monotonic(), report)
            return report

    def _collect(self) -> dict[str, Any]:
        from model_serve.runtime.stats import collect_stats

        front = self.front
        record = {}
        for served, act in list(front.activity.items()):
            route = front.names.find(served)
            record[route.engine_id if route else served] = act.to_json()
        report = collect_stats(front.settings, front.engine, record,
                               list(front.names.models.values()))
        data = report.to_json()
        requests = {}
        for served, act in list(front.activity.items()):
            requests[served] = act.requests
        for model in data["models"]:
            model["requests"] = requests.get(model["name"], 0)
        data["memory"]["threshold_percent"] = self._threshold()
        data["memory"]["history_version"] = self.memory.version
        data["time"] = time.time()
        return data

    def _served(self, engine_id: str) -> str:
        route = self.front.names.find(engine_id)
        return route.served if route else engine_id

    def _threshold(self) -> float:
        return self.front.settings.memory_pressure_threshold

    def _requests_json(self, seq: int) -> dict[str, Any]:
        return {"done": [r.to_json() for r in self.requests.since(seq)],
                "waiting": self._waiting()}

    def _waiting(self) -> list[dict[str, Any]]:
        """The requests not answered yet, with what each waits for."""
        front, now = self.front, time.monotonic()
        result = []
        for record in list(self.requests.open.values()):
            state = front.view.state(record.engine_id)
            if any(record.engine_id in h.models or "*" in h.models
                   for h in front.holds.values()):
                why = "held: the config sync restarts this model"
            elif front.admission.loading_now == record.engine_id:
                why = "waiting for the model to load"
            elif state == "loaded" and record.engine_id not in front.admission.evicting:
                why = "being answered"
            else:
                why = "held by admission: waiting for room or its turn to load"
            result.append({"seq": record.seq, "at": record.at, "model": record.model,
                           "path": record.path, "waited": round(now - record.began, 1),
                           "why": why})
        return result

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: `requests` as they begin and end, `status` (and `peers`, with
        PEERS) every few seconds, and `log`: new lines of the log as they come, for a key that
        may read it (control), else once why not. Read with fetch (an EventSource cannot send
        a key)."""
        from model_serve.runtime.gate import Access, Refusal, request_key

        gate = self.front.gate
        refusal = gate.refusal(Access.CONTROL, request_key(request.headers))
        origin = request.headers.get("Origin")
        if origin is not None and not gate.is_own_page(origin, request.headers.get("Host")):
            refusal = Refusal(403, "the log is never shown to a page of another web site "
                              "(CORS_ORIGINS or not)", "origin_not_allowed")
        room = EVENT_STREAMS_MAX - (0 if refusal is None else EVENT_STREAMS_OWNER)
        if self.streams >= room:
            return _error(503, f"{self.streams} dashboard pages are following events already "
                          "(the most at once); close one, or wait", "server_busy",
                          retry_after=5)
        log_tail = LogTail(self.front.settings.log_file) if refusal is None else None
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-store",
                                               "X-Accel-Buffering": "no"})
        self.streams += 1
        try:
            await response.prepare(request)
        except BaseException:
            self.streams -= 1
            raise
        # An open page is not a request being served: it must not take a place that
        # MAX_CONCURRENT_REQUESTS keeps for clients of the models.
        self.front.serving -= 1
        try:
            next_status = 0.0
            seq = max((r.seq for r in self.requests.done), default=0)
            await _send(response, "requests", self._requests_json(0))
            if refusal is not None:
                await _send(response, "log", {"refused": refusal.message})
            version = self.requests.version
            while not self._closing.is_set():
                if self.requests.version != version:
                    version = self.requests.version
                    news = self._requests_json(seq)
                    if news["done"]:
                        seq = news["done"][-1]["seq"]
                    await _send(response, "requests", news)
                if time.monotonic() >= next_status:
                    next_status = time.monotonic() + STATUS_EVERY
                    try:
                        await _send(response, "status", await self.snapshot())
                    except ModelServeError as exc:
                        await _send(response, "engine", {"error": exc.message})
                    if self.front.peers:  # served while our engine is down, so shown then too
                        await _send(response, "peers", {"peers": self.front.peers.report()})
                if log_tail is not None:
                    lines, again = await asyncio.to_thread(log_tail.read)
                    if lines or again:
                        await _send(response, "log", {"lines": lines, "reset": again,
                                                      "file": str(log_tail.path)})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), EVENTS_TICK)
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        except _Stalled:
            if request.transport is not None:
                request.transport.abort()  # close() would wait to send what it holds
        finally:
            self.front.serving += 1
            self.streams -= 1
        return response

    # --- actions (control endpoints: the gate asks for ADMIN_KEYS, or API_KEYS) ------------
    async def load(self, request: web.Request) -> web.StreamResponse:
        """Loads a model ahead of its first request, through admission (room made first)."""
        route = await self._model_named(request)
        if isinstance(route, web.Response):
            return route
        self.front.started(route)  # in use while it loads: no unloader takes it meanwhile
        try:
            admitted = await self.front.admit(route)
        finally:
            self.front.ended(route)
        if isinstance(admitted, web.Response):
            return admitted
        return web.json_response({"loaded": route.served})

    async def forget(self, request: web.Request) -> web.StreamResponse:
        """Forgets a model's saved conversations (`model forget NAME`)."""
        from model_serve.runtime.forget import forget_model

        route = await self._model_named(request)
        if isinstance(route, web.Response):
            return route
        try:
            result = await asyncio.to_thread(forget_model, self.front.settings,
                                             self.front.engine, route.served)
        except (ModelServeError, OSError) as exc:
            message = exc.message if isinstance(exc, ModelServeError) else str(exc)
            return _error(502, message, "forget_failed")
        self._status = None
        return web.json_response({"model": route.served, "saved_deleted": result.saved,
                                  "saved_bytes": result.saved_bytes,
                                  "slots_emptied": sum(result.erased.values())})

    async def _model_named(self, request: web.Request) -> Route | web.Response:
        try:
            data = await request.json()
        except ValueError:
            data = None
        name = data.get("model") if isinstance(data, dict) else None
        if not isinstance(name, str) or not name:
            return _error(400, 'expected {"model": NAME}', "invalid_request")
        await self.front.refresh_names()
        route = self.front.names.find(name)
        if route is None:
            return _error(404, f"model not found: {name} (see 'model list')",
                          "model_not_found")
        return route


class _Stalled(Exception):
    """The reader of an event stream took nothing for EVENTS_WRITE_TIMEOUT."""


async def _send(response: web.StreamResponse, event: str, data: Any) -> None:
    try:
        async with asyncio.timeout(EVENTS_WRITE_TIMEOUT):
            await response.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())
    except TimeoutError:
        raise _Stalled from None


def _error(status: int, message: str, kind: str, retry_after: int | None = None) -> web.Response:
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return web.json_response({"error": {"message": message, "type": kind, "code": status}},
                             status=status, headers=headers)
