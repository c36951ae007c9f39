"""What the engine has in memory, and where each model listens, for the front's request path:
kept current by following the engine's own event feed, so no request waits for a lookup.

A thread follows `Engine.events` (the router's /models/sse, llama-swap's /api/events) and, on
every change of a model's state, reads the engine's whole list again (`Engine.models`) and
hands it to the event loop. Events come in order, so a model's unload is seen before another
model can load and take its port. While the feed is down the view is empty: the front then
asks the engine itself.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from model_serve.engines.base import REQUEST_ENDED, REQUEST_STARTED, Engine, EngineModel
from model_serve.errors import ModelServeError

log = logging.getLogger("model_serve.front")

RECONNECT = 1.0  # seconds between attempts while the engine's feed is down


class EngineView:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.models: dict[str, EngineModel] = {}  # engine id -> as the engine last listed it
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()

    def state(self, engine_id: str) -> str:
        model = self.models.get(engine_id)
        return model.state if model else "unloaded"

    def port(self, engine_id: str) -> int | None:
        model = self.models.get(engine_id)
        return model.port if model and model.state == "loaded" else None

    def update(self, models: list[EngineModel]) -> None:
        """Take a fresh list (from the feed's thread, or from the front after its own read)."""
        self.models = {m.name: m for m in models}

    def forget(self, engine_id: str) -> None:
        self.models.pop(engine_id, None)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        threading.Thread(target=self._follow, name="engine-view", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _post(self, models: list[EngineModel] | None) -> None:
        assert self._loop is not None
        if models is None:
            self._loop.call_soon_threadsafe(self._clear)
        else:
            self._loop.call_soon_threadsafe(self.update, models)

    def _clear(self) -> None:
        self.models = {}

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                self._post(self.engine.models())
                for _model, status in self.engine.events(self._stop):
                    if status not in (REQUEST_STARTED, REQUEST_ENDED):
                        self._post(self.engine.models())
            except (ModelServeError, OSError, ValueError) as exc:  # loopback errors are OSErrors
                log.debug("engine feed: %s", exc)
            self._post(None)
            self._stop.wait(RECONNECT)
