"""The peers' models (PEERS), as this port serves them: `<peer>/<the peer's own name>`.

Each peer's `/v1/models` is read at the front's start and again every PEER_CHECK_INTERVAL
(and at once after a request found it down). A peer that stops answering keeps the models it
last listed, marked unavailable, and their requests get a 503 naming it at once, without a
connection attempt each. Only a peer's own models are served: the ones it forwards to peers
of its own are marked `meta.llamaswap.type: "peer"` (by llama-swap v250, and by model_serve),
and left out, so two servers that are each other's peers never list `a/b/a/...`.

Nothing here touches the local engine: admission, eviction, TTLs and saved conversations are
for local models only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from model_serve.config.peers import Peer
from model_serve.models.names import identity

log = logging.getLogger("model_serve.peers")
_UNFIT_SAID: set[str] = set()  # peers whose unfit names the log has told of

CHECK_TIMEOUT = 5.0  # seconds one read of a peer's model list may take, whole
LIST_MAX = 8 * 2**20  # bytes of a peer's model list: some thousands of models
NAME_MAX = 256  # characters of a peer's name for a model
PEER_TYPE = "peer"  # llama-swap's meta.llamaswap.type of a model it forwards to a peer


class PeerDown(Exception):
    """The peer did not answer its model list (the message says how)."""


@dataclass(frozen=True)
class RemoteModel:
    name: str  # the peer's own name for it
    state: str  # as the peer listed it at the last check ("loaded", "unloaded", ...)


def forwarded(entry: dict[str, Any]) -> bool:
    """Whether a `/v1/models` entry is a model its server forwards to a peer of its own."""
    meta = entry.get("meta")
    llamaswap = meta.get("llamaswap") if isinstance(meta, dict) else None
    return isinstance(llamaswap, dict) and llamaswap.get("type") == PEER_TYPE


def fit_name(name: Any) -> bool:
    """Whether a peer's name for a model may be served here: printable text of a sane length
    (it reaches terminals, logs and the dashboard; a newline or ESC would forge lines there)."""
    return isinstance(name, str) and 0 < len(name) <= NAME_MAX and name.isprintable()


def own_models(payload: Any, peer: str = "") -> list[RemoteModel]:
    """The models a peer serves itself, from its `/v1/models` answer (names that are not
    printable text left out, once in the log)."""
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        raise PeerDown("its /v1/models answer has no \"data\" list (not an OpenAI-compatible "
                       "server?)")
    models, unfit = [], 0
    for entry in data:
        if not isinstance(entry, dict) or forwarded(entry):
            continue
        if not fit_name(entry.get("id")):
            unfit += 1
            continue
        status = entry.get("status")
        state = status.get("value") if isinstance(status, dict) else None
        models.append(RemoteModel(entry["id"], state if isinstance(state, str) and
                                  fit_name(state) and len(state) <= 40 else "unknown"))
    if unfit and peer not in _UNFIT_SAID:
        _UNFIT_SAID.add(peer)
        log.warning("peer %s lists %d model(s) whose names are not printable text of at most "
                    "%d characters: left out", peer, unfit, NAME_MAX)
    return models


async def read_models(peer: Peer, timeout: float = CHECK_TIMEOUT) -> list[RemoteModel]:
    """The peer's own models, asked of it now: the whole answer within `timeout` and
    LIST_MAX bytes. A hostile or broken peer (one that drips its answer, streams one forever,
    or sends gigabytes) costs at most that, and no thread: requests' timeout is per read, so
    a drip held a worker thread, the check and every request awaiting it for ever."""
    import aiohttp

    try:
        async with asyncio.timeout(timeout), aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=timeout)) as session, session.get(
                f"{peer.url}/v1/models", headers=peer.headers,
                allow_redirects=False) as reply:  # not redirected: the key is for this URL
            body = bytearray()
            async for chunk in reply.content.iter_any():
                body += chunk
                if len(body) > LIST_MAX:
                    raise PeerDown(f"its /v1/models answer is over {LIST_MAX // 2**20} MiB")
            status = reply.status
    except TimeoutError:
        raise PeerDown(f"its /v1/models answer did not arrive whole within {timeout:g}s"
                       ) from None
    except aiohttp.ClientConnectorError:
        raise PeerDown("connection refused or unreachable") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise PeerDown(f"its /v1/models answer broke off ({type(exc).__name__})") from None
    if status in (401, 403):
        raise PeerDown(refusal(peer, status, bytes(body)))
    if status != 200:
        raise PeerDown(f"its /v1/models answered HTTP {status}")
    try:
        payload = json.loads(body)
    except ValueError:
        raise PeerDown("its /v1/models answer is not JSON") from None
    return own_models(payload, peer.name)


def refusal(peer: Peer, status: int, body: bytes) -> str:
    """What a peer's 401 or 403 means: our key, or what its own message says."""
    if status == 401:
        return (f"it refused our key (HTTP 401): put the key it accepts in PEER_KEYS_FILE as "
                f"{peer.name}=KEY")
    from model_serve.runtime.ollama_shapes import error_message

    return f"it refused us (HTTP {status}: {error_message(body)[:300]})"


@dataclass
class PeerState:
    peer: Peer
    models: dict[str, RemoteModel] = field(default_factory=dict)  # identity -> model
    up: bool = False
    checked: float = 0.0  # time.time() of the last check's end; 0 = never
    problem: str = "not checked yet"
    checking: asyncio.Task[None] | None = None

    def unavailable(self, interval: int) -> str:
        """Why its models get a 503 now, and when they come back."""
        return (f"peer {self.peer.name} ({self.peer.url}) is unavailable: {self.problem}; "
                f"its models come back when it does (checked every {interval}s, PEERS)")


@dataclass(frozen=True)
class PeerRoute:
    """Where a `<peer>/<model>` request goes."""

    state: PeerState
    remote: str  # the peer's own name: the body's `model` sent to it


@dataclass(frozen=True)
class Listed:
    name: str  # as served here: <peer>/<its name>
    peer: str
    remote: str
    state: str  # the peer's word for it, or "unavailable"


class Peers:
    """`is_local(name)`: whether the name is one of this server's own (it wins: a peer's
    model of that name is refused, once in the log)."""

    def __init__(self, peers: tuple[Peer, ...], interval: int,
                 is_local: Callable[[str], bool]) -> None:
        self.states = {p.name.lower(): PeerState(p) for p in peers}
        self.interval = interval
        self.is_local = is_local
        self._said: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self.states)

    def state_of(self, name: str) -> PeerState | None:
        """The peer a served name belongs to, by its first part (before '/')."""
        prefix, slash, _rest = name.partition("/")
        return self.states.get(prefix.lower()) if slash else None

    def serves(self, name: str) -> bool:
        """Whether a request for `name` is a peer's: `<peer>/...`, or a name that only one
        peer lists (not ours: the front asks this of names it does not serve itself)."""
        return self.state_of(name) is not None or self.unqualified(name) is not None

    def unqualified(self, name: str) -> PeerRoute | None:
        """llama-swap's rule: a peer's model may be asked for by its own name alone when
        exactly one peer lists it."""
        found = [(s, s.models[identity(name)]) for s in self.states.values()
                 if identity(name) in s.models]
        if len(found) != 1 or self._collides(*found[0]):
            return None
        return PeerRoute(found[0][0], found[0][1].name)

    async def find(self, name: str) -> PeerRoute | None:
        """The peer and its own name for `name`; None when no peer lists it. A peer not
        checked yet is checked first; one that lists no such model, again (at most once per
        second: it may have just got it)."""
        state = self.state_of(name)
        if state is None:
            return self.unqualified(name)
        remote = name.partition("/")[2]
        if state.checked == 0 or (state.up and identity(remote) not in state.models
                                  and time.time() - state.checked > 1):
            await self.check(state)
        model = state.models.get(identity(remote))
        if model is None or self._collides(state, model):
            return None
        return PeerRoute(state, model.name)

    def listing(self) -> list[Listed]:
        listed = []
        for state in self.states.values():
            for model in state.models.values():
                if self._collides(state, model):
                    continue
                listed.append(Listed(f"{state.peer.name}/{model.name}", state.peer.name,
                                     model.name, model.state if state.up else "unavailable"))
        return sorted(listed, key=lambda m: m.name)

    def report(self) -> list[dict[str, Any]]:
        """Each peer as the front sees it now (`model status`, the dashboard): up, or down
        with the reason; the models it serves here; when it was last checked."""
        counts: dict[str, int] = {}
        for listed in self.listing():
            counts[listed.peer] = counts.get(listed.peer, 0) + 1
        return [{"name": s.peer.name, "url": s.peer.url, "up": s.up, "problem": s.problem,
                 "models": counts.get(s.peer.name, 0), "checked": s.checked or None,
                 "timeout": s.peer.timeout} for s in self.states.values()]

    def _collides(self, state: PeerState, model: RemoteModel) -> bool:
        name = f"{state.peer.name}/{model.name}"
        if not self.is_local(name):
            return False
        if name not in self._said:
            self._said.add(name)
            log.warning("%s, a model of the peer %s, has the name of one of this server's own "
                        "models: it is not served; rename the peer in PEERS", name,
                        state.peer.name)
        return True

    async def check(self, state: PeerState) -> None:
        """Read the peer's list now; with a check already under way, wait for that one."""
        if state.checking is None or state.checking.done():
            state.checking = asyncio.create_task(self._check(state))
        await asyncio.shield(state.checking)

    async def _check(self, state: PeerState) -> None:
        try:
            models = await read_models(state.peer)
        except PeerDown as exc:
            self.mark_down(state, str(exc))
        else:
            if not state.up:
                log.info("peer %s (%s) answers: %d models", state.peer.name, state.peer.url,
                         len(models))
            state.models = {identity(m.name): m for m in models}
            state.up, state.problem = True, ""
        state.checked = time.time()

    def mark_down(self, state: PeerState, problem: str) -> None:
        """Its models stay listed, unavailable, until a check finds it answering again."""
        if state.up or state.checked == 0 or problem != state.problem:
            log.warning("peer %s (%s) is not answering: %s", state.peer.name, state.peer.url,
                        problem)
        state.up, state.problem = False, problem

    def down_now(self, state: PeerState, problem: str) -> None:
        """A request found it down: said at once, and checked again (it may be back)."""
        self.mark_down(state, problem)
        if state.checking is None or state.checking.done():
            state.checking = asyncio.create_task(self._check(state))

    async def keep_checked(self) -> None:
        try:
            while True:
                await asyncio.gather(*(self.check(s) for s in self.states.values()))
                await asyncio.sleep(self.interval)
        finally:  # the front stops: no check outlives it (each holds a connection)
            checks = [s.checking for s in self.states.values() if s.checking is not None]
            for check in checks:
                check.cancel()
            await asyncio.gather(*checks, return_exceptions=True)


@dataclass(frozen=True)
class Survey:
    """One peer's models as `model list` shows them, asked of it now."""

    peer: Peer
    models: list[Listed]
    problem: str = ""  # why it did not answer; empty when it did


def survey(peers: tuple[Peer, ...], is_local: Callable[[str], bool]) -> list[Survey]:
    """Every peer asked at once (each within CHECK_TIMEOUT); names of local models left out.
    Not from a running event loop (the CLI's)."""

    async def ask(peer: Peer) -> Survey:
        try:
            models = await read_models(peer)
        except PeerDown as exc:
            return Survey(peer, [], str(exc))
        listed = [Listed(f"{peer.name}/{m.name}", peer.name, m.name, m.state) for m in models]
        return Survey(peer, [m for m in listed if not is_local(m.name)])

    async def ask_all() -> list[Survey]:
        return list(await asyncio.gather(*(ask(p) for p in peers)))

    return asyncio.run(ask_all()) if peers else []
