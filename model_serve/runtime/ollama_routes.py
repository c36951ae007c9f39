"""Ollama's API on the port (`/api/chat`, `/api/tags`, ... and `GET /`), on every engine.

Not a second proxy: each request is translated (ollama_shapes.py) and sent through the front's
own path, with its names, admission, restore and accounting; the engine's answer is translated
back. Model management (`/api/pull`, `/api/delete`) goes to the user's own Ollama (OLLAMA_HOST),
then the models are synced. A keep_alive a request sets holds for that model until the next
Ollama request for it; the pressure unloader reads it from the front's activity record.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import ClientResponse, web
from aiohttp import client_exceptions as client_errors

from model_serve.engines.base import LOADED_STATES
from model_serve.errors import ModelServeError
from model_serve.models.names import identity
from model_serve.models.ollama import SELF_HINT, points_at_model_serve, server_url
from model_serve.runtime import ollama_shapes as shapes
from model_serve.runtime.engine_calls import engine_call
from model_serve.runtime.gate import Access, request_key
from model_serve.runtime.ollama_shapes import OllamaError, Reply, Translated

if TYPE_CHECKING:
    from model_serve.models.plan import ServedModel
    from model_serve.runtime.front import Front, Route

log = logging.getLogger("model_serve.ollama")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
NDJSON = "application/x-ndjson"
# Ollama's endpoints that change its own store in ways model_serve leaves to Ollama itself.
NOT_SERVED = ("/api/copy", "/api/create", "/api/push", "/api/blobs/")
IDLE_WAIT = 600.0  # seconds a keep_alive 0 waits for the other requests of its model


def _error(status: int, message: str, retry_after: str | None = None) -> web.Response:
    headers = {"Retry-After": retry_after} if retry_after else None
    return web.json_response(shapes.error_body(message), status=status, headers=headers)


def _browser(request: web.Request) -> bool:
    """A page load (the router's web UI, llama-swap's /ui redirect), not an API client."""
    return "text/html" in request.headers.get("Accept", "") or \
        request.headers.get("Sec-Fetch-Mode", "") == "navigate"


class OllamaApi:
    def __init__(self, front: Front) -> None:
        self.front = front
        self.keep_alive: dict[str, float] = {}  # served name -> seconds (-1: never)
        self._ignored_said: set[str] = set()
        self._unloads: dict[str, asyncio.Task[None]] = {}  # served name -> waiting unload

    # --- routing ----------------------------------------------------------------------------
    def route(self, request: web.Request) -> Handler | None:
        path, method = request.path, request.method
        if path == "/":
            return self.banner if method in ("GET", "HEAD") and not _browser(request) else None
        if not path.startswith("/api/"):
            return None
        get = method in ("GET", "HEAD")
        handler = {
            ("/api/version", True): self.version, ("/api/tags", True): self.tags,
            ("/api/ps", True): self.ps, ("/api/show", False): self.show,
            ("/api/chat", False): self.chat, ("/api/generate", False): self.generate,
            ("/api/embed", False): self.embed, ("/api/embeddings", False): self.embeddings,
            ("/api/pull", False): self.pull,
        }.get((path, get))
        if handler is not None and (get or method == "POST"):
            return handler
        if path == "/api/delete" and method == "DELETE":
            return self.delete
        if path.startswith(NOT_SERVED):
            return self.not_served
        return None

    def shaped(self, request: web.Request, response: web.Response) -> web.StreamResponse:
        """A refusal (a key, a host name) in Ollama's shape when the path is Ollama's."""
        if request.method == "OPTIONS" or self.route(request) is None:
            return response
        shaped = _as_ollama_error(response)
        shaped.headers.update({k: v for k, v in response.headers.items()
                               if k.lower() == "www-authenticate"})
        return shaped

    # --- names ------------------------------------------------------------------------------
    def find(self, name: Any) -> tuple[Route, ServedModel] | None:
        """A served name, its dash form, an alias or an Ollama name; `X:latest` is `X`."""
        if not isinstance(name, str) or not name:
            return None
        names = self.front.names
        for candidate in (name, shapes.strip_latest(name)):
            route = names.find(candidate)
            if route is not None and route.served in names.models:
                return route, names.models[route.served]
        wanted = {identity(name), identity(shapes.strip_latest(name))}
        for served in names.models.values():
            ollama = {identity(shapes.strip_latest(n)) for n in served.model.ollama_names}
            if wanted & ollama:
                route = names.find(served.name)
                if route is not None:
                    return route, served
        return None

    async def _json(self, request: web.Request) -> dict[str, Any]:
        """The body as a JSON object, read within MAX_BODY_MB and REQUEST_READ_TIMEOUT as the
        front reads every body (its 413 or 408 raised as an OllamaError)."""
        body = await self.front.read_body(request)
        if isinstance(body, web.Response):
            raise OllamaError(shapes.error_message(body.body if isinstance(body.body, bytes)
                                                   else b""), body.status)
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            raise OllamaError("the body must be JSON") from None
        if not isinstance(data, dict):
            raise OllamaError("the body must be a JSON object")
        return data

    async def _named(self, data: dict[str, Any]) -> tuple[str, Route, ServedModel]:
        name = data.get("model") or data.get("name")
        if not isinstance(name, str) or not name:
            raise OllamaError("model is required")
        found = self.find(name)
        if found is None:
            await self.front.refresh_names()  # a name a sync has just added
            found = self.find(name)
        if found is None:
            raise OllamaError(f"model '{name}' not found", 404)
        return name, *found

    # --- facts ------------------------------------------------------------------------------
    def facts(self, served: ServedModel) -> shapes.ModelFacts:
        model = served.model
        real = os.path.realpath(model.path)
        try:
            stat = os.stat(real)
            size, mtime = stat.st_size, stat.st_mtime
        except OSError:
            size, mtime = model.size_bytes, 0.0
        info = model.info
        return shapes.ModelFacts(
            name=served.name, size=model.size_bytes or size,
            digest=shapes.digest(real, size, mtime), modified=mtime,
            architecture=info.architecture, size_label=info.size_label,
            quantization=info.file_type, context_length=info.context_length,
            serving_context=served.ctx_size, embedding_length=info.embedding_length,
            block_count=info.block_count, path=str(model.path),
            vision=bool(served.options.get("mmproj") or model.mmproj),
            tools=served.options.get("jinja") == "true",
            parameters=dict(model.params), generates=served.kind == "chat",
            embeddings=served.embeddings)

    def ttl(self, route: Route) -> float:
        """Seconds the model stays loaded once idle (<= 0: never)."""
        return self.keep_alive.get(route.served, route.ttl)

    def keep_alive_of(self, served: str) -> float | None:
        return self.keep_alive.get(served)

    # --- read-only answers -------------------------------------------------------------------
    async def banner(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="Ollama is running")

    async def version(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"version": shapes.OLLAMA_VERSION})

    async def tags(self, request: web.Request) -> web.StreamResponse:
        await self.front.refresh_names()
        models = [self.facts(s).tag() for _n, s in sorted(self.front.names.models.items())]
        models += [shapes.peer_tag(listed.name) for listed in self.front.peers.listing()]
        return web.json_response({"models": models})

    async def ps(self, request: web.Request) -> web.StreamResponse:
        try:
            listed = await self.front.engine_models()
        except ModelServeError as exc:
            return _error(503, exc.message, "2")
        now = time.time()
        running = []
        for model in listed:
            route = self.front.names.find(model.name) if model.state in LOADED_STATES else None
            served = self.front.names.models.get(route.served) if route else None
            if route is None or served is None:
                continue
            act = self.front.activity.get(route.served)
            last_used = max(act.last_started, act.last_ended) if act else now
            expires = shapes.expires_at(last_used or now, act.in_flight if act else 0,
                                        self.ttl(route), now)
            size = route.footprint or served.model.size_bytes
            running.append(self.facts(served).running(expires, size, sys.platform == "darwin"))
        return web.json_response({"models": running})

    async def show(self, request: web.Request) -> web.StreamResponse:
        try:
            _sent, _route, served = await self._named(await self._json(request))
        except OllamaError as exc:
            return _error(exc.status, exc.message)
        return web.json_response(self.facts(served).show())

    async def not_served(self, request: web.Request) -> web.StreamResponse:
        return _error(501, f"{request.path} is not served by model_serve: run it against your "
                      "own Ollama (OLLAMA_HOST); model_serve serves what that Ollama holds")

    # --- inference ---------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._infer(request, "chat")

    async def generate(self, request: web.Request) -> web.StreamResponse:
        return await self._infer(request, "generate")

    async def embed(self, request: web.Request) -> web.StreamResponse:
        return await self._infer(request, "embed")

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._infer(request, "embeddings")

    async def _infer(self, request: web.Request, kind: str) -> web.StreamResponse:
        try:
            data = await self._json(request)
            peer = self._peer_model(data)
            if peer is not None:
                return await self._infer_on_peer(request, data, peer, kind)
            sent, route, served = await self._named(data)
            keep = shapes.parse_keep_alive(data.get("keep_alive"))
            if kind == "chat":
                empty = not data.get("messages")
                translated = None if empty else shapes.chat_request(data, served.name)
            elif kind == "generate":
                empty = not data.get("prompt") and not data.get("suffix")
                translated = None if empty else shapes.generate_request(data, served.name)
            else:
                empty = False
                translated = shapes.embed_request(data, served.name, kind == "embeddings")
        except OllamaError as exc:
            return _error(exc.status, exc.message)
        if keep is not None and not self._may_control(request):
            # keep_alive holds or unloads the model for every client: with ADMIN_KEYS set,
            # that is a control action, as the unload endpoints are.
            if keep == 0 and (translated is None or empty):
                return _error(403, "keep_alive 0 unloads the model for every client: it needs "
                              "a key from ADMIN_KEYS")
            self._say_keep_alive_ignored(served.name)
            keep = None
        self._set_keep_alive(route, keep)
        reply = Reply(sent, chat=kind == "chat")
        if translated is None or empty:
            # Ollama's clients load (`ollama run`) or unload (`ollama stop`) a model this way.
            if keep == 0:
                failed = await self.unload_when_idle(route)
                return failed or web.json_response(reply.final("unload"))
            failed = await self.load(route)
            return failed or web.json_response(reply.final("load"))
        if data.get("tools") and served.options.get("jinja") != "true":
            # llama-server takes tools only with a Jinja template (it would answer 500).
            return _error(400, f"{sent} does not support tools (model_serve serves it without "
                          "a Jinja chat template: set 'jinja: true' for it in "
                          "custom_models.yaml)")
        if translated.ignored:
            self._say_ignored(served.name, translated.ignored)
        if translated.text is not None:
            tokens = await self._tokenize(request, route, translated)
            if isinstance(tokens, web.StreamResponse):
                return _as_ollama_error(tokens)
            reply.context = [*translated.context, *tokens]
            translated = translated.with_tokens(tokens)

        async def answer(req: web.Request, upstream: ClientResponse,
                         seen: Callable[[bytes], None]) -> web.StreamResponse:
            return await self._answer(req, upstream, seen, translated, reply, kind)

        response = await self.front.forward(request, path_qs=translated.path,
                                            body=translated.encoded(), answer=answer)
        if keep == 0:
            await self.unload_when_idle(route)
        return _as_ollama_error(response)

    def _peer_model(self, data: dict[str, Any]) -> str | None:
        """The name, when it is a peer's model (PEERS) and not one of ours."""
        name = data.get("model") or data.get("name")
        if not isinstance(name, str) or self.find(name) is not None:
            return None
        return name if self.front.peers.serves(name) else None

    async def _infer_on_peer(self, request: web.Request, data: dict[str, Any], sent: str,
                             kind: str) -> web.StreamResponse:
        """Translated as for our own models, then sent on by the front to the peer in OpenAI's
        API (every kind of peer has it). Loading and keep_alive are the peer's business: an
        empty request (`ollama run`, `ollama stop`) is answered here, with nothing done."""
        if kind == "chat":
            translated = shapes.chat_request(data, sent) if data.get("messages") else None
        elif kind == "generate":
            translated = shapes.generate_request(data, sent) if data.get("prompt") or \
                data.get("suffix") else None
        else:
            translated = shapes.embed_request(data, sent, kind == "embeddings")
        reply = Reply(sent, chat=kind == "chat")
        if translated is None:
            keep = shapes.parse_keep_alive(data.get("keep_alive"))
            return web.json_response(reply.final("unload" if keep == 0 else "load"))
        if not translated.path.startswith("/v1/"):
            raise OllamaError(f"{sent} is a peer's model: raw, context and suffix reach this "
                              "server's own models only (a peer is asked in OpenAI's API)")

        async def answer(req: web.Request, upstream: ClientResponse,
                         seen: Callable[[bytes], None]) -> web.StreamResponse:
            return await self._answer(req, upstream, seen, translated, reply, kind)

        response = await self.front.forward(request, path_qs=translated.path,
                                            body=translated.encoded(), answer=answer)
        return _as_ollama_error(response)

    async def _answer(self, request: web.Request, upstream: ClientResponse,
                      seen: Callable[[bytes], None], translated: Translated, reply: Reply,
                      kind: str) -> web.StreamResponse:
        native = translated.path in ("/completion", "/infill")
        if upstream.status >= 400:
            return _error(upstream.status, shapes.error_message(await upstream.read()),
                          upstream.headers.get("Retry-After"))
        if not translated.stream:
            payload = await upstream.read()
            seen(payload)
            try:
                data = json.loads(payload)
            except ValueError:
                return _error(502, "the engine's answer was not JSON")
            if kind in ("embed", "embeddings"):
                return web.json_response(reply.embed(data, kind == "embeddings"))
            return web.json_response(reply.from_native(data) if native else
                                     reply.from_openai(data))
        response = web.StreamResponse(status=200, headers={"Content-Type": NDJSON})
        await response.prepare(request)
        translator = shapes.StreamTranslator(reply, native)
        chunks = upstream.content.iter_any()
        while True:
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                break
            except (client_errors.ClientPayloadError, client_errors.ClientConnectionError) as exc:
                # The model server ended mid-answer (killed, crashed): Ollama's clients read an
                # error line, as Ollama sends one, not a cut stream.
                log.warning("%s: the model server ended the answer early (%s)", reply.model,
                            exc)
                await response.write(json.dumps(shapes.error_body(shapes.CUT_SHORT)).encode()
                                     + b"\n")
                await response.write_eof()
                return response
            seen(chunk)
            for line in translator.feed(chunk):
                await response.write(line)
        for line in translator.finish():
            await response.write(line)
        await response.write_eof()
        return response

    async def _tokenize(self, request: web.Request, route: Route,
                        translated: Translated) -> list[int] | web.StreamResponse:
        """The prompt's tokens from the model itself (through the front, like the request
        that follows), so the reply's context holds them. llama-swap does not route
        /tokenize: there it goes to the model's /upstream, once admission has loaded it."""
        found: list[int] = []
        path = "/tokenize"
        if self.front.engine.name == "llama-swap":
            failed = await self.load(route)
            if failed is not None:
                return failed
            path = f"/upstream/{route.engine_id}/tokenize"

        async def answer(req: web.Request, upstream: ClientResponse,
                         seen: Callable[[bytes], None]) -> web.StreamResponse:
            payload = await upstream.read()
            if upstream.status >= 400:
                return _error(upstream.status, shapes.error_message(payload))
            try:
                found.extend(t for t in json.loads(payload).get("tokens", [])
                             if isinstance(t, int))
            except (ValueError, AttributeError):
                return _error(502, "the engine's /tokenize answer was not JSON")
            return web.Response()

        body = json.dumps({"model": route.served, "content": translated.text,
                           "add_special": not translated.context}).encode()
        response = await self.front.forward(request, path_qs=path, body=body, answer=answer)
        return response if response.status >= 400 else found

    def _say_ignored(self, served: str, ignored: list[str]) -> None:
        said = f"{served}:{','.join(ignored)}"
        if said not in self._ignored_said and len(self._ignored_said) < 100:
            self._ignored_said.add(said)
            log.info("%s: load-time options %s do not change a loaded model (set ctx_size "
                     "and the like in custom_models.yaml)", served, ", ".join(ignored))

    def _may_control(self, request: web.Request) -> bool:
        return self.front.gate.refusal(Access.CONTROL, request_key(request.headers)) is None

    def _say_keep_alive_ignored(self, served: str) -> None:
        said = f"{served}:keep_alive"
        if said not in self._ignored_said and len(self._ignored_said) < 100:
            self._ignored_said.add(said)
            log.info("%s: keep_alive ignored for a client key (with ADMIN_KEYS set it changes "
                     "the model for every client: it takes an admin key)", served)

    def _set_keep_alive(self, route: Route, keep: float | None) -> None:
        if keep is None or keep == 0:
            self.keep_alive.pop(route.served, None)  # back to the model's own TTL
        else:
            self.keep_alive[route.served] = keep

    async def load(self, route: Route) -> web.Response | None:
        """The model loaded through admission, as any request loads it."""
        front = self.front
        await front.wait_if_held(route)
        front.started(route)
        try:
            admitted = await front.admit(route)
        finally:
            front.ended(route)
        return _as_ollama_error(admitted) if isinstance(admitted, web.Response) else None

    async def unload_when_idle(self, route: Route) -> web.Response | None:
        """keep_alive 0: unloaded now, unless other requests for it are in flight (they are
        not cut short): then once they are done, if no request set another keep_alive."""
        if not self.front.usage(route.engine_id)[0]:
            unloaded = await self.unload(route)
            if unloaded is not False:
                return unloaded if isinstance(unloaded, web.Response) else None
        if route.served in self._unloads:
            return None  # one waiting unload per model, however many clients ask

        async def later() -> None:
            deadline = time.monotonic() + IDLE_WAIT
            while time.monotonic() < deadline and route.served not in self.keep_alive:
                if not self.front.usage(route.engine_id)[0] and \
                        await self.unload(route) is not False:
                    return
                await asyncio.sleep(0.1)

        task = asyncio.create_task(later())
        self._unloads[route.served] = task
        task.add_done_callback(lambda _t: self._unloads.pop(route.served, None))
        return None

    async def unload(self, route: Route) -> web.Response | bool:
        """True once out of memory (or not loaded); False when a request uses it. Made by
        admission, as the unloader's: the check that nothing uses it and the mark that holds
        new requests back are one step, so a request admitted meanwhile is never cut."""
        front = self.front
        try:
            for model in front.engine.resolve(route.engine_id, await front.engine_models()):
                if model.state in LOADED_STATES:
                    if not await front.admission.evict(model.name, 0.0):
                        return False
                    front.view.forget(model.name)
        except ModelServeError as exc:
            return _error(502, exc.message)
        return True

    # --- the user's own Ollama ----------------------------------------------------------------
    def _own_ollama(self) -> str | web.Response:
        settings = self.front.settings
        if points_at_model_serve(settings):
            return _error(502, f"OLLAMA_HOST ({settings.ollama_host}) points at model_serve "
                          f"itself: {SELF_HINT}")
        return server_url(settings.ollama_host)

    async def pull(self, request: web.Request) -> web.StreamResponse:
        return await self._manage(request, "POST", "/api/pull")

    async def delete(self, request: web.Request) -> web.StreamResponse:
        return await self._manage(request, "DELETE", "/api/delete")

    async def _manage(self, request: web.Request, method: str,
                      path: str) -> web.StreamResponse:
        """Sent to the user's own Ollama, then synced: what it pulled is served (and what it
        deleted is not) by the time the answer ends."""
        url = self._own_ollama()
        if isinstance(url, web.Response):
            return url
        try:
            data = await self._json(request)
        except OllamaError as exc:
            return _error(exc.status, exc.message)
        body = json.dumps(data).encode()
        stream = path == "/api/pull" and data.get("stream", True) is not False
        assert self.front.session is not None
        try:
            upstream = await self.front.session.request(
                method, url + path, data=body, headers={"Content-Type": "application/json"})
        except (client_errors.ClientError, OSError) as exc:
            return _error(502, f"no Ollama answers at {url} ({exc}): start it (`ollama "
                          "serve`, or the app) to pull and delete models; model_serve then "
                          "serves what it holds")
        async with upstream:
            if upstream.status >= 400 or not stream:
                payload = await upstream.read()
                if upstream.status < 400:
                    await self._sync()
                if upstream.status >= 400:
                    return _error(upstream.status, shapes.error_message(payload))
                return web.Response(body=payload, status=upstream.status,
                                    content_type=upstream.content_type)
            response = web.StreamResponse(headers={"Content-Type": NDJSON})
            await response.prepare(request)
            pending = b""
            async for chunk in upstream.content.iter_any():
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if b'"success"' in line:  # said once the model is served
                        await self._sync()
                    await response.write(line + b"\n")
            if pending:
                await response.write(pending)
            await response.write_eof()
            return response

    async def _sync(self) -> None:
        from model_serve.runtime.sync import run_sync

        try:
            await engine_call(run_sync, self.front.settings)
        except ModelServeError as exc:
            log.warning("sync after an Ollama pull or delete failed: %s", exc.message)
        await self.front.refresh_names()


def _as_ollama_error(response: web.StreamResponse) -> web.StreamResponse:
    """The front's own refusals (no room, a held model, a bad body) in Ollama's shape."""
    if isinstance(response, web.Response) and not response.prepared and \
            response.status >= 400 and isinstance(response.body, bytes):
        return _error(response.status, shapes.error_message(response.body),
                      response.headers.get("Retry-After"))
    return response
