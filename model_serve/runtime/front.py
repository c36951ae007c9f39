"""The front: model_serve's own server on LISTEN_HOST:LLAMA_SWAP_PORT, in front of the engine
(which listens on 127.0.0.1:ENGINE_PORT). A pass-through, never a second engine:

- every path goes to the engine as it came, streams chunk by chunk; a client that goes away
  closes the upstream request, which stops the generation;
- an upstream connection dropped before any byte of its answer (the router drops kept-alive
  connections now and then) is retried once;
- one set of names on every engine: requests may use a served name, its dash form or an
  alias; replies carry the name the client sent; `/v1/models` lists the served names;
- llama-swap's API on every engine (`/running`, `/unload`, `/api/models/unload[/<id>]`,
  `/upstream/<id>/...`), and the original tool's `POST /unload?model=NAME`;
- the port answers to its owner (gate.py): Host, other web origins, and keys by what a path
  does (API_KEYS, ADMIN_KEYS, model_serve's own key); paths routed as normalized;
- the start, end and number in flight of every request, per model (`/api/model_serve/activity`);
- Ollama's API (`/api/chat`, `/api/tags`, ...), translated onto the paths above by
  ollama_routes.py;
- on the router, a request for a loaded model goes to the model's own server (see Front);
- other servers' models (PEERS) as `<peer>/<model>`, forwarded with the peer's key
  (peers.py), never admitted here.

Run as `python -m model_serve.runtime.front` (the supervisor does).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from aiohttp import ClientResponse, ClientSession, ClientTimeout, TCPConnector, web
from aiohttp import client_exceptions as client_errors
from yarl import URL

from model_serve import internal_key
from model_serve.config.settings import Settings, keys_files_open_to_others, load_settings
from model_serve.engines import Engine, select_engine, slot_cache
from model_serve.engines.base import LOADED_STATES, EngineModel
from model_serve.engines.slot_cache import Restored
from model_serve.errors import ModelServeError
from model_serve.models import kinds
from model_serve.models.names import identity
from model_serve.models.plan import ServedModel
from model_serve.runtime import gate, model_field
from model_serve.runtime.admission import FAILED_KIND, Admission, Refusal
from model_serve.runtime.connections import ConnectionCap
from model_serve.runtime.dashboard import RECORD, Dashboard
from model_serve.runtime.engine_calls import engine_call
from model_serve.runtime.engine_view import EngineView
from model_serve.runtime.gate import (
    Access,
    Gate,
    access_of,
    control_method_ok,
    normalized_path,
    request_key,
)
from model_serve.runtime.ollama_routes import OllamaApi
from model_serve.runtime.peers import PeerRoute, Peers, PeerState, refusal
from model_serve.runtime.rpc_reach import UNREACHABLE_KIND

log = logging.getLogger("model_serve.front")

# Headers that belong to one connection, not to the request (RFC 9110 7.6.1), and the ones the
# front sets itself.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "te", "trailer", "transfer-encoding", "upgrade", "host",
                        "content-length", "authorization", "x-api-key"})
# Paths whose JSON body names a model.
MODEL_PATHS = ("/v1/", "/v/", "/sdapi/", "/audioapi/", "/completion", "/infill", "/embedding",
               "/rerank", "/apply-template",
               "/tokenize", "/detokenize")
# What a client's browser says of itself and its site: our gate has judged it; a peer would
# judge us by it (refuse the origin, say) and has no use for the cookies of our port.
NOT_TO_PEERS = frozenset({"origin", "referer", "cookie", "sec-fetch-site", "sec-fetch-mode",
                          "sec-fetch-dest", "sec-fetch-user"})
VIA = "1.1 model_serve"  # RFC 9110's Via, on what we send a peer: a loop is seen by it
EVENT_MAX = 2**20  # bytes of a stream held while waiting for an event's end (to rename it)
PEER_BODY_MAX = 64 * 2**20  # bytes of a peer's whole answer held to rename it; more go as sent
PEER_REFUSAL_MAX = 64 * 2**10  # bytes of a peer's 401/403 read for its reason
NAMES_REFRESH = 2.0  # seconds between checks of the engine config (names follow every sync)
LOAD_WAIT = 300.0  # seconds /upstream waits for a model to load
HOLD_LIMIT = 300.0  # seconds a request waits at most for a model the sync is restarting
REFUSALS_LOGGED = 10.0  # seconds between log lines about refused requests (per status)
ALL = "*"  # a hold on every model (llama-swap restarts them all on a config change)
# Writes the client's reply from the engine's (a translation); sees each chunk it reads.
Answer = Callable[[web.Request, ClientResponse, Callable[[bytes], None]],
                  Awaitable[web.StreamResponse]]


@dataclass
class ModelActivity:
    in_flight: int = 0
    requests: int = 0
    last_started: float = 0.0
    last_ended: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"in_flight": self.in_flight, "requests": self.requests,
                "last_started": self.last_started, "last_ended": self.last_ended,
                "last_used": max(self.last_started, self.last_ended)}


@dataclass
class Route:
    """What a name reaches: the engine's id for the model and the name it is served by."""

    engine_id: str
    served: str
    ttl: int = 0
    footprint: int = 0  # bytes it takes once loaded (estimated from the GGUF header)
    kind: str = kinds.CHAT  # what it answers (models/kinds.py)
    embeddings: bool = False
    reranking: bool = False
    workers: tuple[str, ...] = ()  # its RPC workers (host:port), asked before a load


@dataclass
class Names:
    """Every name a client may use, from the plan the engine config was written from."""

    routes: dict[str, Route] = field(default_factory=dict)  # identity(name) -> Route
    aliases: dict[str, list[str]] = field(default_factory=dict)  # served -> other names
    models: dict[str, ServedModel] = field(default_factory=dict)  # served -> its plan
    stamp: float | None = None
    embedding_models: list[str] = field(default_factory=list)  # named in a refusal's advice
    rerank_models: list[str] = field(default_factory=list)

    def find(self, name: str) -> Route | None:
        return self.routes.get(identity(name))


def build_names(settings: Settings, engine: Engine) -> Names:
    from model_serve.runtime.sync import build_current_plan

    _catalog, plan = build_current_plan(settings, engine)
    names = Names()
    for served in plan:
        route = Route(engine.model_id(served.name), served.name, served.ttl,
                      served.estimated_bytes, served.kind, served.embeddings, served.reranking,
                      tuple(served.workers))
        if served.embeddings:
            names.embedding_models.append(served.name)
        if served.reranking:
            names.rerank_models.append(served.name)
        routed = engine.routed_names(served)
        names.aliases[served.name] = [n for n in routed if n != served.name]
        names.models[served.name] = served
        for name in routed:
            names.routes[identity(name)] = route
    return names


class Front:
    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.engine = engine or select_engine(settings)
        self.upstream = settings.engine_url
        self.names = Names()
        self.activity: dict[str, ModelActivity] = {}
        self.holds: dict[str, Hold] = {}  # hold id -> what it holds
        self.session: ClientSession | None = None
        self.fresh_session: ClientSession | None = None  # new connections only: retries
        self._engine_auth = internal_key.engine_headers(settings)
        self.gate = Gate(settings, internal_key.read_owner(settings)
                         if settings.front_enabled else None)
        self._warned: set[str] = set()
        self.view = EngineView(self.engine)
        self.serving = 0  # requests being served now (MAX_CONCURRENT_REQUESTS)
        self._refusals_said: dict[int, tuple[float, int]] = {}  # status -> (logged at, unsaid)
        # On the router, a request for a loaded model goes to the model's own server: it skips
        # the router's hop (about 2 ms, and a new connection each time: the router closes every
        # connection it proxies). The view's order of events keeps a freed port from being
        # mistaken for its old model. Not with MAX_LOADED_MODELS: the router then evicts by its
        # own record of last use, which only requests through it update. Not on llama-swap,
        # which must see every request for its TTL and swaps.
        self.direct = self.engine.name == "llama-server" and not settings.max_loaded_models
        self.admission = Admission(settings, self.engine, self.view, self.usage)
        self.admission.failures.file_of = self._file_of
        self.ollama = OllamaApi(self)  # Ollama's API, translated onto the paths below
        # Other servers' models (PEERS), served as <peer>/<model>: forwarded, never admitted.
        self.peers = Peers(settings.peers, settings.peer_check_interval,
                           lambda name: self.names.find(name) is not None)
        self.dashboard = Dashboard(self)  # /dashboard and its read endpoints

    # --- names ------------------------------------------------------------------------------
    async def refresh_names(self) -> None:
        try:
            stamp = self.engine.config_path.stat().st_mtime
        except OSError:
            return
        if stamp == self.names.stamp:
            return
        try:
            names = await asyncio.to_thread(build_names, self.settings, self.engine)
        except Exception as exc:  # noqa: BLE001 - the task must outlive any one bad scan
            message = exc.message if isinstance(exc, ModelServeError) else \
                f"{type(exc).__name__}: {exc}"
            log.warning("model names not refreshed: %s", message)
            log.debug("refreshing the model names failed", exc_info=True)
            return
        names.stamp = stamp
        if self.names.stamp is not None:
            self.admission.failures.forget()  # a sync changed the config: try every model again
        self.names = names
        # Admission sums what loaded models hold (Metal's limit), those loaded before this
        # front started too: each model's footprint, as its requests bring it.
        self.admission.footprints.update({r.engine_id: r.footprint
                                          for r in names.routes.values()})

    def _file_of(self, engine_id: str) -> tuple[str, Path] | None:
        served = next((self.names.models.get(r.served) for r in self.names.routes.values()
                       if r.engine_id == engine_id), None)
        return (served.name, served.model.path) if served is not None else None

    async def keep_names_fresh(self) -> None:
        while True:
            await self.refresh_names()
            await asyncio.sleep(NAMES_REFRESH)

    # --- activity ---------------------------------------------------------------------------
    def started(self, route: Route) -> None:
        act = self.activity.setdefault(route.served, ModelActivity())
        act.in_flight += 1
        act.requests += 1
        act.last_started = time.time()

    def ended(self, route: Route) -> None:
        act = self.activity.setdefault(route.served, ModelActivity())
        act.in_flight = max(0, act.in_flight - 1)
        act.last_ended = time.time()

    def _by_engine_id(self) -> Iterator[tuple[str, ModelActivity]]:
        """Each served name's activity, with the engine id it reaches."""
        for served, act in self.activity.items():
            route = self.names.find(served)
            yield (route.engine_id if route else served), act

    def usage(self, engine_id: str) -> tuple[int, float]:
        """Requests in flight for a model (by the engine's id) and when it was last used."""
        in_flight, last_used = 0, 0.0
        for model, act in self._by_engine_id():
            if model == engine_id:
                in_flight += act.in_flight
                last_used = max(last_used, act.last_started, act.last_ended)
        return in_flight, last_used

    def in_flight(self, engine_ids: list[str]) -> int:
        """Requests in flight for these models (by the engine's id; ALL: every model)."""
        return sum(act.in_flight for model, act in self._by_engine_id()
                   if ALL in engine_ids or model in engine_ids)

    # --- holds: a model the sync restarts gets no new request meanwhile ----------------------
    async def wait_if_held(self, route: Route) -> None:
        deadline = time.monotonic() + HOLD_LIMIT
        while True:
            now = time.monotonic()
            for hold_id in [i for i, h in self.holds.items() if now - h.since > HOLD_LIMIT]:
                log.warning("hold %s on %s expired after %.0fs without its release", hold_id,
                            ", ".join(sorted(self.holds[hold_id].models)), HOLD_LIMIT)
                self.holds.pop(hold_id).released.set()
            hold = next((h for h in self.holds.values()
                         if ALL in h.models or route.engine_id in h.models), None)
            if hold is None or time.monotonic() >= deadline:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(hold.released.wait(), deadline - time.monotonic())

    async def hold(self, request: web.Request) -> web.StreamResponse:
        """Hold new requests for these models and wait (bounded) until the ones in flight
        have finished; the sync then reloads the engine and releases them."""
        try:
            body = await request.json()
            models = body.get("models")
            drain = float(body.get("drain_seconds", 30))
        except (ValueError, AttributeError, TypeError):
            return _error(400, "expected {\"models\": [ids] or null, \"drain_seconds\": N}",
                          "invalid_request")
        ids = [ALL] if models is None else [str(m) for m in models]
        hold_id = uuid.uuid4().hex
        self.holds[hold_id] = Hold(frozenset(ids), asyncio.Event(), time.monotonic())
        deadline = time.monotonic() + drain
        while self.in_flight(ids) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return web.json_response({"hold": hold_id, "held": ids,
                                  "in_flight": self.in_flight(ids)})

    async def release(self, request: web.Request) -> web.StreamResponse:
        """Releases the one hold named (`{"hold": id}`): two syncs' holds are two holds."""
        try:
            hold_id = (await request.json()).get("hold")
        except (ValueError, AttributeError, TypeError):
            hold_id = None
        hold = self.holds.pop(hold_id, None) if isinstance(hold_id, str) else None
        if hold is None:
            return _error(404, "no such hold: send {\"hold\": <the id hold answered>}",
                          "hold_not_found")
        hold.released.set()
        return web.json_response({"released": sorted(hold.models)})

    async def evict(self, request: web.Request) -> web.StreamResponse:
        """The unloader's unload of an idle model (`{"model": id, "idle_seconds": N, "why":
        text}`): 200 once it is out of memory, 409 when a request uses it (or did within N
        seconds). `why` is shown on the dashboard."""
        try:
            data = await request.json()
            engine_id, idle = str(data["model"]), float(data.get("idle_seconds", 0))
        except (ValueError, KeyError, TypeError, AttributeError):
            return _error(400, 'expected {"model": id, "idle_seconds": N}', "invalid_request")
        self.dashboard.memory.note(engine_id, f"the unloader: {data.get('why') or 'idle'}")
        try:
            unloaded = await self.admission.evict(engine_id, idle)
        except ModelServeError as exc:
            return _error(502, exc.message, "unload_failed")
        if not unloaded:
            return _error(409, f"{engine_id} is in use", "model_in_use")
        return web.json_response({"unloaded": engine_id})

    # --- the request path -------------------------------------------------------------------
    def _refused(self, request: web.Request) -> web.Response | None:
        """Whether the port answers this request at all (gate.py)."""
        host = request.headers.get("Host")
        if not self.gate.host_allowed(host):
            name = gate.host_name(host or "")
            self._warn_once(f"refused a request for the host name {name!r} (a DNS rebinding "
                            "guard): add it to ALLOWED_HOSTS in .env if it is yours")
            return _error(403, f"this server does not answer to the name {name!r}: add it to "
                          "ALLOWED_HOSTS in .env if it is yours", "host_not_allowed")
        origin = request.headers.get("Origin")
        if request.method == "OPTIONS" and origin is not None:  # a browser's preflight
            if not self.gate.origin_allowed(origin, host):
                return _error(403, f"the origin {origin} is not in CORS_ORIGINS",
                              "origin_not_allowed")
            return web.Response(status=204, headers=self.gate.preflight_headers(
                origin, request.headers.get("Access-Control-Request-Headers")))
        if self.gate.cross_site(request.headers, host) and not self.gate.opens_public_page(
                request.method, request.path, request.headers):
            self._warn_once(f"refused a request a page of another web site sent (Origin "
                            f"{origin or 'not given'}): list it in CORS_ORIGINS to allow it")
            return _error(403, "a page of another web site sent this request; list its origin "
                          "in CORS_ORIGINS in .env to allow it", "origin_not_allowed")
        access = access_of(request.method, request.path, dict(request.query))
        if self.gate.same_origin_only(access, request.path, origin, host):
            return _error(403, "logs, and what users said to their models, are never served "
                          "to a page of another web site (CORS_ORIGINS or not)",
                          "origin_not_allowed")
        refusal = self.gate.refusal(access, request_key(request.headers))
        if refusal is not None:
            return _error(refusal.status, refusal.message, refusal.kind)
        if access is Access.CONTROL and not control_method_ok(request.method, request.path):
            if request.path in ("/models", "/v1/models"):
                hint = ("reload the config with 'model sync'" if "reload" in request.query
                        else "model_serve manages the model files: 'model pull', 'model rm'")
                return _error(405, f"{request.method} {request.path} is not served here: "
                              f"{hint}", "method_not_allowed")
            return _error(405, f"{request.path} acts on POST only", "method_not_allowed")
        return None

    def _warn_once(self, message: str) -> None:
        """One log line per distinct refusal: a setup the checks break shows in `model
        logs`, and a page that retries cannot fill the log."""
        if message not in self._warned and len(self._warned) < 100:
            self._warned.add(message)
            log.warning("%s", message)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = normalized_path(request.path)
        if path != request.path:
            request = request.clone(rel_url=URL.build(path=path,
                                                      query_string=request.query_string))
        refused = self._refused(request)
        if refused is not None:
            return self.ollama.shaped(request, refused)
        if path in ("/health", "/v1/health") and request.method in ("GET", "HEAD"):
            healthy = await asyncio.to_thread(self.engine.healthy, 1.0)
            if healthy:
                return web.Response(text="OK")
            return _error(503, "the engine is not answering (starting or restarting)",
                          "engine_unavailable", retry_after=2)
        # model_serve's own calls (the unloader's evict, a sync's hold and release) pass the
        # cap: clients that fill the port must not stop memory relief or a sync.
        own = self.gate.own_key is not None and request_key(request.headers) == self.gate.own_key
        if self.serving >= self.settings.max_concurrent_requests and not own:
            self._warn_once("refused requests past MAX_CONCURRENT_REQUESTS "
                            f"({self.settings.max_concurrent_requests}) with HTTP 503")
            return self.ollama.shaped(request, _error(
                503, f"{self.serving} requests are being served (MAX_CONCURRENT_REQUESTS); "
                "retry shortly", "server_busy", retry_after=2))
        self.serving += 1
        try:
            return await self._handle(request)
        finally:
            self.serving -= 1

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        special = self.ollama.route(request) or self._special(request) or \
            self.dashboard.route(request)
        if special is not None:
            return await special(request)
        return await self.forward(request)

    def _special(self, request: web.Request
                 ) -> Callable[[web.Request], Awaitable[web.StreamResponse]] | None:
        path, method = request.path, request.method
        if path == "/v1/models" and method == "GET":
            return self.list_models
        if path == "/api/model_serve/activity" and method == "GET":
            return self.activity_report
        if path == "/api/model_serve/hold" and method == "POST":
            return self.hold
        if path == "/api/model_serve/release" and method == "POST":
            return self.release
        if path == "/api/model_serve/evict" and method == "POST":
            return self.evict
        if path.startswith("/upstream/"):
            return self.upstream_request
        unloads = path in ("/unload", "/api/models/unload") or \
            path.startswith("/api/models/unload/")
        if self.engine.name == "llama-swap":
            # llama-swap serves its own API; only the original tool's form is ours, and its
            # unloads while conversations are saved first (llama-swap would drop them).
            if unloads and (self.settings.kv_cache_enabled or
                            (path == "/unload" and method == "POST")):
                return self.unload
            return None
        if path == "/running" and method == "GET":
            return self.running
        if path == "/models/load" and method == "POST":
            return self.load  # through admission, not around it
        if path == "/models/unload" and method == "POST":
            return self.unload  # its conversations saved first
        return self.unload if unloads else None

    async def forward(self, request: web.Request, path_qs: str | None = None,
                      base: str | None = None, body: bytes | None = None,
                      answer: Answer | None = None) -> web.StreamResponse:
        """`body` and `path_qs` given: another request in place of the client's (a
        translation); `answer` then writes the reply from the engine's."""
        sent = route = reuse = None
        loads = True
        if body is None and request.method in ("POST", "PUT", "PATCH") and \
                request.can_read_body:
            read = await self.read_body(request)
            if isinstance(read, web.Response):
                return read
            body = read
        if body is not None and (path_qs or request.path).startswith(MODEL_PATHS):
            kind = request.headers.get("Content-Type", "")
            try:
                body, sent, route = self._named_in_body(body, kind)
                if route is None and sent is not None:
                    # A name a sync has just added: read the names now, not at the next
                    # refresh, so its request gets admission (and a restored
                    # conversation).
                    await self.refresh_names()
                    body, sent, route = self._named_in_body(body, kind)
            except model_field.BadBody as exc:
                return _error(400, str(exc), "invalid_request")
        # A peer is sent only what any client may ask of a model: a body naming it, on a
        # model path; never a control or secret path (its key may open more there than the
        # client's opens here), nor a path a query names it on.
        to_peer = sent is not None and access_of(
            request.method, (path_qs or request.path).partition("?")[0], {}) is Access.CLIENT
        if len(request.query.getall("model", [])) > 1 or (
                sent is not None and request.query.get("model", sent) != sent):
            # Engines read the query and the body by other rules: one name, one model.
            return _error(400, "the request names more than one model (query and body)",
                          "invalid_request")
        if route is None and "model" in request.query and path_qs is None:
            query, sent, route = self._named_in_query(request)
            if query is not None:
                path_qs = f"{request.path}?{query}"
                # The router's `autoload=false` asks about a model without loading it.
                loads = request.query.get("autoload", "").lower() != "false"
        if route is None and to_peer and sent is not None and body is not None and \
                self.peers.serves(sent):
            return await self.forward_to_peer(request, body, path_qs, sent, answer)
        if route is None and sent is not None and body is None and path_qs is None and \
                request.method == "GET" and request.path == "/props" and \
                self.peers.serves(sent):
            return await self.props_of_peer(request, sent)
        if route is None and sent is not None and self.engine.name == "llama-server":
            # The router also serves files of its own download cache by name, without
            # admission: only the names model_serve serves reach it.
            return _error(404, f"model not found: {sent} (see 'model list')",
                          "model_not_found")
        sent_path = (path_qs or request.path).partition("?")[0]  # translated: what goes on
        if route is not None and (refused := self._kind_refusal(sent_path, route)):
            return refused  # before a load: the model could not answer it
        counted = route if loads else None
        record = response = None
        if counted is not None:
            record = self.dashboard.requests.begin(request, counted)  # held ones show too
            try:
                await self.wait_if_held(counted)
            except BaseException:  # the client left while held
                self.dashboard.requests.end(record, None)
                raise
            # In flight from here: a sync's hold waits for a request inside admission too
            # (waiting for room or loading), so a reload does not cut the load it waits on.
            self.started(counted)
        try:
            if counted is not None:
                admitted = await self._admit(counted, body if body and body[:1] == b"{"
                                             else None)
                if isinstance(admitted, web.Response):
                    response = admitted
                    return admitted
                reuse = admitted
                record.restored = reuse is not None  # type: ignore[union-attr]
                port = self.view.port(counted.engine_id) if self.direct and base is None \
                    else None
                if port:
                    base = f"http://127.0.0.1:{port}"
            response = await self._proxy(request, body, path_qs or request.path_qs, base,
                                         sent, counted, reuse, answer)
            return response
        finally:
            if counted is not None:
                self.ended(counted)
                self.dashboard.requests.end(record, response)  # type: ignore[arg-type]

    async def forward_to_peer(self, request: web.Request, body: bytes, path_qs: str | None,
                              sent: str, answer: Answer | None) -> web.StreamResponse:
        """A request for `<peer>/<model>`: to the peer, with its key and its own name for the
        model; no admission, activity or saved conversation here (the peer has its own).
        A name without `<peer>/` is one only one peer lists (llama-swap's rule)."""
        peer = await self._peer_route(request, sent)
        if isinstance(peer, web.Response):
            return peer
        try:
            body, _sent, _remote = model_field.in_body(
                body, request.headers.get("Content-Type", ""),
                lambda name: peer.remote if name == sent else None)
        except model_field.BadBody as exc:
            return _error(400, str(exc), "invalid_request")
        return await self._proxy(request, body, path_qs or request.path_qs, peer.state.peer.url,
                                 sent, None, answer=answer, peer=peer)

    async def props_of_peer(self, request: web.Request, sent: str) -> web.StreamResponse:
        """`GET /props?model=<peer>/<model>`: the peer's /props for its own name, read-only
        (a POST /props changes a model server's settings: a control path, never sent on);
        the query's other words stay here (the router's `autoload` is the peer's business)."""
        peer = await self._peer_route(request, sent)
        if isinstance(peer, web.Response):
            return peer
        return await self._proxy(request, None, f"/props?{urlencode({'model': peer.remote})}",
                                 peer.state.peer.url, sent, None, peer=peer)

    async def _peer_route(self, request: web.Request, sent: str) -> PeerRoute | web.Response:
        """Where a peer's model is, or why it cannot be asked now."""
        if VIA in request.headers.get("Via", ""):
            # Came from a model_serve through its PEERS (this one, when a peer's URL is our
            # own port): a peer serves its own models only, so sending it on would be a loop,
            # each hop holding a connection until the port is full.
            return _error(508, f"{sent}: this request came through another server's PEERS "
                          "(or ours: a peer's URL that is this server's own port) and would be "
                          "forwarded again; a peer serves only its own models", "peer_loop")
        peer = await self.peers.find(sent)
        state = peer.state if peer is not None else self.peers.state_of(sent)
        assert state is not None
        if not state.up:
            return self._peer_unavailable(state)
        if peer is None:
            return _error(404, f"model not found: {sent} (the peer {state.peer.name} does not "
                          "list it; see 'model list')", "model_not_found")
        return peer

    async def admit(self, route: Route) -> web.Response | CacheReuse | None:
        """A load with no request to send yet (the router's /models/load, Ollama's)."""
        return await self._admit(route, None)

    async def read_body(self, request: web.Request) -> bytes | web.Response:
        """The whole body, within MAX_BODY_MB and REQUEST_READ_TIMEOUT; else the 413 or 408."""
        limit, timeout = self.settings.max_body_mb, self.settings.request_read_timeout
        try:
            async with asyncio.timeout(timeout):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"the request body is over MAX_BODY_MB ({limit} MB): send less, "
                          "or raise MAX_BODY_MB in .env", "request_too_large")
        except TimeoutError:
            response = _error(408, f"the request body did not arrive within "
                              f"REQUEST_READ_TIMEOUT ({timeout}s)", "request_timeout")
            response.force_close()
            return response

    async def _admit(self, route: Route,
                     body: bytes | None) -> web.Response | CacheReuse | None:
        """Room made and the model loaded (admission): None, or what to check in this
        request's reply when a saved conversation was restored for it; else the 503 to
        answer."""
        admitted = await self.admission.admit(route.engine_id, route.footprint, body,
                                              route.workers)
        if isinstance(admitted, Refusal):
            self._log_refusal(admitted)
            kind = admitted.kind or ("load_queue_full" if admitted.status == 429
                                     else "no_memory_for_model")
            # The openai client retries a 503 after Retry-After unless told not to: a model
            # whose file is broken would hold its caller for nothing.
            # Nor would a worker that is down come back by itself within a retry.
            headers = {"x-should-retry": "false"} \
                if admitted.kind in (FAILED_KIND, UNREACHABLE_KIND) else None
            return _error(admitted.status, admitted.message, kind,
                          retry_after=admitted.retry_after, headers=headers)
        return CacheReuse(admitted) if admitted is not None else None

    def _kind_refusal(self, path: str, route: Route) -> web.Response | None:
        """An embeddings request for a chat model and the like: a 400 that says what to do."""
        message = kinds.refusal(path, route.served, route.kind, route.embeddings,
                                route.reranking, self.names.embedding_models,
                                self.names.rerank_models)
        return _error(400, message, "invalid_request_error") if message else None

    def _log_refusal(self, refusal: Refusal) -> None:
        """Each refusal's reason in the log, at most one line per REFUSALS_LOGGED seconds and
        status (a crowd of clients must not flood it), with the count of those left out."""
        now = time.monotonic()
        last, unsaid = self._refusals_said.get(refusal.status, (-REFUSALS_LOGGED, 0))
        if now - last < REFUSALS_LOGGED:
            self._refusals_said[refusal.status] = (last, unsaid + 1)
            return
        more = f" ({unsaid} more since the last such line)" if unsaid else ""
        log.warning("refused with HTTP %d: %s%s", refusal.status, refusal.message, more)
        self._refusals_said[refusal.status] = (now, 0)

    def _engine_id(self, name: str) -> str | None:
        route = self.names.find(name)
        return route.engine_id if route else None

    def _named_in_body(self, body: bytes,
                       content_type: str) -> tuple[bytes, str | None, Route | None]:
        body, sent, engine_id = model_field.in_body(body, content_type, self._engine_id)
        return body, sent, self.names.find(sent) if engine_id is not None and sent else None

    def _named_in_query(self, request: web.Request
                        ) -> tuple[str | None, str | None, Route | None]:
        query, sent, engine_id = model_field.in_query(list(request.query.items()),
                                                      self._engine_id)
        return query, sent, self.names.find(sent) if engine_id is not None and sent else None

    async def _proxy(self, request: web.Request, body: bytes | None, path_qs: str,
                     base: str | None, sent: str | None, route: Route | None,
                     reuse: CacheReuse | None = None, answer: Answer | None = None,
                     peer: PeerRoute | None = None) -> web.StreamResponse:
        assert self.session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP
                   and (peer is None or k.lower() not in NOT_TO_PEERS)}
        # A peer gets its own key (PEER_KEYS_FILE), never the client's nor ours.
        headers.update(peer.state.peer.headers if peer else self._engine_auth)
        if peer is not None:
            via = headers.pop("Via", headers.pop("via", ""))
            headers["Via"] = f"{via}, {VIA}" if via else VIA
        if body is not None and (route is not None or peer) and body[:1] == b"{":
            # Read as JSON here (its model admitted): the engine must read it so too, whatever
            # the client called it (llama-swap reads a text/plain body's model otherwise).
            for key in [k for k in headers if k.lower() == "content-type"]:
                del headers[key]
            headers["Content-Type"] = "application/json"
        direct = base is not None and route is not None and base != self.upstream
        # A body only where the method has one: a GET with a form body is read by the router.
        data: Any = body if body is not None else (
            request.content if request.can_read_body and request.method in ("POST", "PUT",
                                                                            "PATCH")
            else None)
        retried = lost_retried = False
        while True:
            try:
                # A retry takes a new connection: the other kept-alive ones to a server that
                # dropped one may be dead too (a killed model server reset two in a row).
                session = self.fresh_session if retried and self.fresh_session else self.session
                upstream = await session.request(
                    request.method, (base or self.upstream) + path_qs, headers=headers,
                    data=data, allow_redirects=False, auto_decompress=False,
                    **({"timeout": _silence(peer.state.peer.timeout)} if peer else {}))
                if upstream.status == 502 and self.engine.name == "llama-swap" and \
                        body is not None and route is not None and not lost_retried:
                    # llama-swap's answer when the model's server ended under the request
                    # (killed, crashed) before any byte of it: sent again once, through
                    # admission, as the router's case below (the model loads again).
                    lost_retried = True
                    upstream.release()
                    log.info("llama-swap answered 502 for %s (its server ended); sending the "
                             "request again once", route.served)
                    await self._until_engine_sees_it_gone(route.engine_id,
                                                          self.view.port(route.engine_id))
                    self.view.forget(route.engine_id)
                    admitted = await self._admit(route, body)
                    if isinstance(admitted, web.Response):
                        return admitted
                    reuse = admitted or reuse
                    continue
                break
            except client_errors.SocketTimeoutError:
                if peer is None:
                    raise
                return self._peer_silent(peer, started=False)
            except (client_errors.ClientOSError,  # refused, reset, or closed on us
                    client_errors.ServerDisconnectedError) as exc:
                refused_connection = isinstance(exc, client_errors.ClientConnectorError)
                if peer is not None and (refused_connection or retried or body is None):
                    return self._peer_failed(peer, exc, refused_connection)
                if not refused_connection and body is None:
                    return _error(502, f"the engine closed the connection: {exc}",
                                  "engine_disconnected")
                if not refused_connection and not retried:
                    # Dropped before any byte of the answer: safe to send again, once.
                    retried = True
                    log.info("upstream connection dropped before the answer; retrying once")
                    continue
                if not direct or route is None:
                    if refused_connection:
                        return _error(503, "the engine is not answering (starting or "
                                      "restarting)", "engine_unavailable", retry_after=2)
                    return _error(502, f"the engine closed the connection: {exc}",
                                  "engine_disconnected")
                # The model server went (unloaded, crashed; or it failed the retry too): once
                # the router has seen that (else it would proxy to the dead port), it is
                # loaded again as any other load is: room made first, its saved conversation
                # restored.
                await self._until_engine_sees_it_gone(route.engine_id, URL(base or "").port)
                self.view.forget(route.engine_id)
                admitted = await self._admit(route, body)
                if isinstance(admitted, web.Response):
                    return admitted
                reuse = admitted or reuse
                base, direct = None, False
            except (client_errors.ClientError, asyncio.TimeoutError) as exc:
                if peer is None:
                    raise
                return self._peer_failed(peer, exc, True)
        if peer is not None and upstream.status in (401, 403):
            # The client's own key and origin were good here: the peer refused us.
            async with upstream:
                said = refusal(peer.state.peer, upstream.status,
                               await _read_at_most(upstream, PEER_REFUSAL_MAX))
            return _error(502, f"the peer {peer.state.peer.name}: {said}", "peer_refused")
        if peer is not None and 300 <= upstream.status < 400:
            # Never followed nor passed on: it could send our client anywhere, and its
            # Location may name the peer's private address.
            upstream.release()
            return _error(502, f"the peer {peer.state.peer.name} answered with a redirect "
                          f"(HTTP {upstream.status}), which is not passed on: check its URL in "
                          "PEERS (the base URL its API answers on)", "peer_refused")
        async with upstream:
            try:
                return await self._relay(request, upstream, sent, route, reuse, answer, peer)
            except client_errors.SocketTimeoutError:
                if peer is None:
                    raise
                return self._peer_silent(peer, started=True)  # nothing of it sent on yet

    async def _relay(self, request: web.Request, upstream: ClientResponse, sent: str | None,
                     route: Route | None, reuse: CacheReuse | None, answer: Answer | None,
                     peer: PeerRoute | None) -> web.StreamResponse:
        """The upstream's answer to our client: renamed to the name it sent, or written by
        `answer` (a translation)."""
        record = request.get(RECORD)  # the dashboard's record of this request
        if record is not None:
            record.engine_status = upstream.status
        if answer is not None:
            def seen(chunk: bytes) -> None:
                nonlocal reuse
                if record is not None:
                    record.last = (record.last[1], chunk)  # the timings come last
                if reuse is not None and reuse.feed(chunk):
                    reuse = None

            answered = await answer(request, upstream, seen)
            if record is not None:
                record.keep(answered.status)
            return answered
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for key, value in upstream.headers.items():
            # The engines allow every web origin: their CORS headers never pass.
            if key.lower() not in HOP_BY_HOP and not key.lower().startswith(
                    "access-control-"):
                response.headers.add(key, value)
        rename = _renamer(route.engine_id, sent) if route and sent != route.engine_id \
            else _renamer(peer.remote, sent) if peer else None
        length = upstream.headers.get("Content-Length")
        if peer is not None and length is not None and \
                (not length.isdigit() or int(length) > PEER_BODY_MAX):
            rename = None  # a peer's answer is not held whole past this: it goes on as sent
        if rename is not None and length is not None:
            payload = rename(await upstream.read())
            if record is not None:
                record.keep(upstream.status, payload)
            if reuse is not None:
                reuse.feed(payload)
            response.content_length = len(payload)
            await response.prepare(request)
            await response.write(payload)
        else:
            if length is not None:
                response.content_length = int(length)
            await response.prepare(request)
            pending = b""
            try:
                async for chunk in upstream.content.iter_any():
                    if record is not None:
                        record.last = (record.last[1], chunk)  # the timings come last
                    if reuse is not None and reuse.feed(chunk):
                        reuse = None
                    if rename is None:
                        await response.write(chunk)
                        continue
                    # Streams: rename whole events (they end with a blank line), as they come.
                    pending += chunk
                    end = pending.rfind(b"\n\n")
                    if end < 0 and len(pending) > EVENT_MAX:
                        # No event's end in a megabyte (a hostile peer's endless line): sent
                        # on as it is rather than held, which would grow without a bound.
                        end = len(pending) - 2
                    if end >= 0:
                        await response.write(rename(pending[:end + 2]))
                        pending = pending[end + 2:]
            except client_errors.SocketTimeoutError:
                if peer is None:
                    raise
                return await self._peer_stalled(request, peer, response)
            if pending:
                await response.write(rename(pending) if rename else pending)
            if record is not None:
                record.keep(upstream.status)
        await response.write_eof()
        return response

    async def _peer_stalled(self, request: web.Request, peer: PeerRoute,
                            response: web.StreamResponse) -> web.StreamResponse:
        """The peer stopped sending for PEER_TIMEOUT in the middle of an answer already
        begun here: a stream ends with an error event (the openai client raises it); any
        other answer is cut short (its client sees it so)."""
        said = self._peer_silent(peer, started=True)
        log.warning("%s", json.loads(said.body)["error"]["message"])  # type: ignore[arg-type]
        if response.headers.get("Content-Type", "").startswith("text/event-stream"):
            with contextlib.suppress(ConnectionError):
                # After a blank line: what came last may have been cut in the middle of an event.
                await response.write(b"\n\ndata: " + said.body + b"\n\n")  # type: ignore[operator]
                await response.write_eof()
            return response
        if request.transport is not None:
            request.transport.close()  # no end of the body: the client sees it cut
        return response

    def _peer_silent(self, peer: PeerRoute, started: bool) -> web.Response:
        """A 504 naming the peer that sent nothing for its PEER_TIMEOUT. It is not marked
        down: it answers connections, and may be busy (loading, a long answer)."""
        timeout = peer.state.peer.timeout
        what = "stopped sending its answer" if started else "sent no answer"
        return _error(504, f"the peer {peer.state.peer.name} ({peer.state.peer.url}) {what} "
                      f"for {timeout:g}s (PEER_TIMEOUT): it may be loading a large model or "
                      "stuck; raise PEER_TIMEOUT for it (PEER_TIMEOUT=300,"
                      f"{peer.state.peer.name}=900) if it is only slow", "peer_timeout")

    def _peer_unavailable(self, state: PeerState) -> web.Response:
        # Not retried by the openai client: its wait (Retry-After) would hide a down peer
        # behind a minute of silence; the client asks again when it wants to.
        return _error(503, state.unavailable(self.peers.interval), "peer_unavailable",
                      retry_after=min(self.peers.interval, 30),
                      headers={"x-should-retry": "false"})

    async def _until_engine_sees_it_gone(self, engine_id: str, port: int | None,
                                         timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(ModelServeError):
                model = next((m for m in await self.engine_models() if m.name == engine_id),
                             None)
                if model is None or model.state != "loaded" or model.port != port:
                    return
            await asyncio.sleep(0.05)

    # --- our answers on every engine ---------------------------------------------------------
    async def engine_models(self) -> list[EngineModel]:
        return await asyncio.to_thread(self.engine.models)

    async def list_models(self, request: web.Request) -> web.StreamResponse:
        await self.refresh_names()
        engine_down = None
        try:
            listed = {m.name: m for m in await self.engine_models()}
        except ModelServeError as exc:
            if not self.peers:
                return _error(503, exc.message, "engine_unavailable", retry_after=2)
            # The peers' models are served all the same: ours are listed, unavailable.
            listed, engine_down = {}, exc
        data = []
        for served, aliases in sorted(self.names.aliases.items()):
            route = self.names.find(served)
            model = listed.get(route.engine_id) if route else None
            state = "unavailable" if engine_down else model.state if model else "unloaded"
            data.append({"id": served, "object": "model", "created": 0,
                         "owned_by": "model_serve", "aliases": aliases,
                         "status": {"value": state}})
        for listed in self.peers.listing():
            # llama-swap's own marking of a peer's model: a server that has us as its peer
            # leaves these out of what it serves (runtime/peers.py).
            data.append({"id": listed.name, "object": "model", "created": 0,
                         "owned_by": "model_serve", "name": f"{listed.peer}: {listed.remote}",
                         "meta": {"llamaswap": {"type": "peer", "peerID": listed.peer}},
                         "status": {"value": listed.state}})
        return web.json_response({"object": "list", "data": data})

    async def running(self, request: web.Request) -> web.StreamResponse:
        try:
            models = await self.engine_models()
        except ModelServeError as exc:
            return _error(503, exc.message, "engine_unavailable", retry_after=2)
        running = []
        for model in models:
            if model.state not in LOADED_STATES:
                continue
            route = self.names.find(model.name)
            running.append({
                "model": route.served if route else model.served_name,
                "state": "ready" if model.state == "loaded" else model.state,
                "cmd": "", "proxy": f"http://127.0.0.1:{model.port}" if model.port else "",
                "ttl": route.ttl if route else 0, "name": "", "description": ""})
        return web.json_response({"running": running})

    async def unload(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        name = request.query.get("model", "") if path == "/unload" else ""
        if path.startswith("/api/models/unload/"):
            name = path[len("/api/models/unload/"):].lstrip("/")
        if path == "/unload" and request.method == "GET":
            name = ""  # llama-swap's GET /unload stops every model, whatever the query says
        if path == "/models/unload":  # the router's own form: {"model": id}
            name = await _model_in_json(request)
            if not name:
                return _error(400, 'expected {"model": NAME}', "invalid_request")
        try:
            models = await self.engine_models()
            if name:
                route = self.names.find(name)
                chosen = self.engine.resolve(route.engine_id if route else name, models)
                if not chosen:
                    return _error(404, f"model not found: {name}", "model_not_found")
                for model in chosen:  # asked by hand: its next request tries a load again
                    self.admission.failures.forget(model.name)
            else:
                self.admission.failures.forget()
                chosen = [m for m in models if m.state in LOADED_STATES]
            for model in chosen:
                if model.state in LOADED_STATES:
                    self.dashboard.memory.note(model.name, f"asked: {request.method} {path}")
                    await engine_call(self.engine.unload, model.name)
                    # Answer once it is out of memory: a request right after must load it
                    # again (through admission), not find the old server going away.
                    await engine_call(self.engine.wait_unloaded, model.name, 30)
                    self.view.forget(model.name)
        except ModelServeError as exc:
            return _error(502, exc.message, "unload_failed")
        if path == "/api/models/unload":
            return web.json_response({"msg": "ok"})
        if path == "/models/unload":
            return web.json_response({"success": True})
        return web.Response(text="OK")

    async def load(self, request: web.Request) -> web.StreamResponse:
        """The router's `POST /models/load {"model": id}`, made through admission: room first,
        and the request answered once the model is loaded."""
        await self.refresh_names()
        name = await _model_in_json(request)
        route = self.names.find(name) if name else None
        if route is None:
            return _error(404, f"model not found: {name}", "model_not_found")
        self.admission.failures.forget(route.engine_id)  # a load asked by hand is tried
        admitted = await self._admit(route, None)
        if isinstance(admitted, web.Response):
            return admitted
        return web.json_response({"success": True})

    async def upstream_request(self, request: web.Request) -> web.StreamResponse:
        """`/upstream/<id>/<path>`: the model's own server, loaded first when it is not."""
        rest = request.path[len("/upstream/"):]
        route, tail = None, ""
        for cut in range(len(rest), 0, -1):  # ids may hold '/': the longest known prefix wins
            if cut < len(rest) and rest[cut] != "/":
                continue
            route = self.names.find(rest[:cut])
            if route is not None:
                tail = rest[cut:]
                break
        if route is None and self.peers.state_of(rest) is not None:
            # A peer's model servers are its own: its /upstream may open paths (slots, a
            # server's settings) its key allows that our client's key does not here.
            return _error(400, f"{rest.partition('/')[0]}/... is a peer's model (PEERS): "
                          "/upstream reaches this server's own model servers only; ask for it on "
                          "this port's /v1 paths (its settings: GET /props?model=NAME)",
                          "peer_model")
        if route is None:
            return _error(404, f"model not found: {rest}", "model_not_found")
        await self.wait_if_held(route)
        self.started(route)  # in flight from admission on, as in forward()
        try:
            admitted = await self._admit(route, None)
            if isinstance(admitted, web.Response):
                return admitted
            body = None
            if request.can_read_body:
                read = await self.read_body(request)
                if isinstance(read, web.Response):
                    return read
                body = read
            if self.engine.name == "llama-swap":  # its own /upstream, now that there is room
                path_qs, base = request.path_qs, None
            else:
                port = await self._loaded_port(route)
                if port is None:
                    return _error(503, f"{route.served} did not load", "model_unavailable",
                                  retry_after=5)
                query = f"?{request.query_string}" if request.query_string else ""
                path_qs, base = (tail or "/") + query, f"http://127.0.0.1:{port}"
            return await self._proxy(request, body, path_qs, base, None, None)
        finally:
            self.ended(route)

    async def _loaded_port(self, route: Route) -> int | None:
        if self.view.port(route.engine_id) is None:
            await engine_call(self.engine.load, route.engine_id, LOAD_WAIT)
            with contextlib.suppress(ModelServeError):
                self.view.update(await self.engine_models())
        return self.view.port(route.engine_id)

    async def activity_report(self, request: web.Request) -> web.StreamResponse:
        """Per served name: requests in flight, started, last use; keyed for the unloader by
        the engine's id too; the model server's port when requests reach it directly."""
        report = {}
        for served, act in self.activity.items():
            route = self.names.find(served)
            engine_id = route.engine_id if route else served
            direct = self.view.port(engine_id) if self.direct else None
            report[served] = {**act.to_json(), "engine_id": engine_id, "direct_port": direct,
                              "keep_alive": self.ollama.keep_alive_of(served)}
        return web.json_response(report)


@dataclass
class Hold:
    """New requests for these models wait (the sync is restarting them) until released."""

    models: frozenset[str]  # engine ids, or ALL
    released: asyncio.Event
    since: float


async def _model_in_json(request: web.Request) -> str:
    try:
        data = await request.json()
    except ValueError:
        return ""
    name = data.get("model") if isinstance(data, dict) else None
    return name if isinstance(name, str) else ""


class CacheReuse:
    """Reads `"cache_n": N` (llama-server's timings) from the reply to the request a saved
    conversation was restored for: whether the model really reused the restored cache."""

    PATTERN = re.compile(rb'"cache_n":\s*(\d+)\D')  # the whole number: one digit after

    def __init__(self, restored: Restored) -> None:
        self.restored = restored
        self.tail = b""

    def feed(self, chunk: bytes) -> bool:
        """True once the figure is read and its record started (then feed no more). The
        record starts at once: a client that closes on the last event would cancel this
        handler (handler_cancellation) before the reply ends."""
        text = self.tail + chunk
        match = self.PATTERN.search(text)
        if match is None:
            self.tail = text[-32:]  # a key cut between two chunks is read whole next time
            return False
        asyncio.get_running_loop().run_in_executor(None, self.record, int(match.group(1)))
        return True

    def record(self, cache_n: int) -> None:
        try:
            slot_cache.record_check(self.restored.folder, self.restored, cache_n)
        except OSError as exc:  # in the executor: nobody else would see it
            log.warning("the check of a restored conversation was not recorded: %s", exc)


def _renamer(engine_id: str, sent: str | None) -> Callable[[bytes], bytes] | None:
    if sent is None:
        return None
    old = json.dumps(engine_id, ensure_ascii=False).encode()
    new = json.dumps(sent, ensure_ascii=False).encode()
    patterns = [(b'"model":' + old, b'"model":' + new), (b'"model": ' + old, b'"model": ' + new)]

    def rename(data: bytes) -> bytes:
        for before, after in patterns:
            data = data.replace(before, after)
        return data

    return rename


def _error(status: int, message: str, kind: str, retry_after: int | None = None,
           headers: dict[str, str] | None = None) -> web.Response:
    headers = dict(headers or {})
    if retry_after:
        headers["Retry-After"] = str(retry_after)
    return web.json_response({"error": {"message": message, "type": kind, "code": status}},
                             status=status, headers=headers or None)


def _silence(seconds: float) -> ClientTimeout:
    """How long a peer may stay silent: for its answer's head, and between two reads of its
    body (llama-swap's peer timeouts.responseHeader, which bounds only the head)."""
    return ClientTimeout(total=None, sock_connect=5, sock_read=seconds or None)


def make_app(front: Front) -> web.Application:
    app = web.Application(client_max_size=front.settings.max_body_mb * 2**20)

    async def open_session(_app: web.Application) -> Any:
        # The engine is one loopback address: no happy-eyeballs racing per new connection
        # (llama-server closes kept-alive connections often, so new ones are frequent).
        front.fresh_session = ClientSession(
            connector=TCPConnector(limit=0, happy_eyeballs_delay=None, force_close=True),
            timeout=ClientTimeout(total=None, sock_connect=5), auto_decompress=False)
        front.session = ClientSession(connector=TCPConnector(limit=0, happy_eyeballs_delay=None),
                                      timeout=ClientTimeout(total=None, sock_connect=5),
                                      auto_decompress=False)
        refresher = asyncio.create_task(front.keep_names_fresh())
        peers = asyncio.create_task(front.peers.keep_checked()) if front.peers else None
        front.view.start()
        yield
        front.view.stop()
        refresher.cancel()
        if peers is not None:
            peers.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await peers  # its checks cancelled too: none left pending when the loop ends
        await front.session.close()
        await front.fresh_session.close()

    async def cors(request: web.Request, response: web.StreamResponse) -> None:
        # Every answer but a preflight (which has its own): the engines' CORS headers were
        # dropped by the proxy, and only the origins CORS_ORIGINS lists get one.
        if "Access-Control-Allow-Origin" not in response.headers:
            response.headers.update(front.gate.cors_headers(request.headers.get("Origin"),
                                                            request.headers.get("Host")))

    app.cleanup_ctx.append(open_session)
    app.cleanup_ctx.append(front.dashboard.running)
    app.on_shutdown.append(front.dashboard.closing)  # open pages must not hold up a stop
    app.on_response_prepare.append(cors)
    app.router.add_route("*", "/{tail:.*}", front.handle)
    return app


def main() -> int:
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        settings = load_settings()
        front = Front(settings)
    except ModelServeError as exc:
        log.error("%s", exc)
        return exc.exit_code
    try:  # libuv's event loop: the front's share of each request shrinks (bench/, "front")
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    log.info("front on %s, engine at %s", settings.base_url, settings.engine_url)
    for _path, warning in keys_files_open_to_others(settings):
        log.warning("%s", warning)
    with contextlib.suppress(web.GracefulExit, KeyboardInterrupt):
        asyncio.run(serve(make_app(front), settings))
    return 0


async def serve(app: web.Application, settings: Settings) -> None:
    """aiohttp's run_app, with the connection cap on its server. An idle connection, and one
    that has not sent its whole request head, is closed after REQUEST_READ_TIMEOUT: aiohttp
    arms its keep-alive timer when a connection opens and does not re-arm it per byte.
    model_serve's own calls (the unloader's, a sync's hold, `model status`) have a Unix socket
    of their own, owner-only and outside the cap: clients that fill the port must not stop
    memory relief or a sync. It opens after the port, so it answering means the port is up."""
    runner = web.AppRunner(app, handle_signals=True, access_log=None, handler_cancellation=True,
                           keepalive_timeout=settings.request_read_timeout, shutdown_timeout=5)
    await runner.setup()
    assert runner.server is not None
    ConnectionCap(runner.server, settings.max_connections)
    door: Path | None = None
    opened: tuple[int, int] | None = None
    try:
        await web.TCPSite(runner, settings.host, settings.port).start()
        door = await _open_own_socket(runner, internal_key.front_socket_path(settings))
        opened = _identity(door)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        # Only the socket this front opened: a front started after it (a restart that did not
        # wait) may already listen at the same path.
        if door is not None and opened is not None and _identity(door) == opened:
            with contextlib.suppress(OSError):
                door.unlink()


async def _read_at_most(upstream: ClientResponse, limit: int) -> bytes:
    """The start of an answer, up to `limit` bytes: a hostile upstream may send any amount."""
    data = b""
    while len(data) < limit:
        piece = await upstream.content.read(limit - len(data))
        if not piece:
            break
        data += piece
    return data


def _identity(path: Path | None) -> tuple[int, int] | None:
    try:
        st = path.lstat() if path is not None else None
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if st is not None else None


async def _open_own_socket(runner: web.AppRunner, door: Path | None) -> Path | None:
    """The front's own socket at `door`, or None (said in the log) where there can be none:
    a path too long, a filesystem without sockets (an exFAT drive), a folder in the way."""
    why = "its path is too long for a socket"
    if door is not None:
        try:
            door.parent.mkdir(parents=True, exist_ok=True)
            door.unlink(missing_ok=True)  # a dead front's
            await web.UnixSite(runner, str(door)).start()
            door.chmod(0o600)
            return door
        except OSError as exc:
            why = f"it cannot be opened ({exc})"
    log.warning("no socket of the front's own in the state folder: %s. model_serve's own calls "
                "go through the port, and wait like any client while it is full", why)
    return None


if __name__ == "__main__":
    sys.exit(main())
