"""Loads that failed, remembered: a model whose header parses but whose load fails (tensor
data cut short, an architecture this llama.cpp does not know, a context that cannot be
allocated) would otherwise be loaded again by every request, each through admission's one
load at a time, with every other model's loads queued behind it.

After a failed load the model is refused at once, with the cause read from the model
server's last lines in the log (or, when it ended without a word, killed or crashed, the
engine's line about its end), for a backoff that grows with each failure (BACKOFF_FIRST,
doubling, at most BACKOFF_MAX). The failure is forgotten when the file changes (inode, size,
mtime), at `model sync` and at any sync that changes the engine config, at a restart (the
front keeps it in memory), and when the user unloads or loads the model by hand (`model sync`
and `model unload` remove it from the file, which the front reads before each refusal). The
current failures are written to state/load-failures.json for `model stats` and `model list`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from model_serve.config.settings import Settings
from model_serve.engines.stop_notes import stop_noted
from model_serve.fileio import held_lock, write_if_changed

log = logging.getLogger("model_serve")

FAILURES_FILE = "load-failures.json"
FAILURES_LOCK = "load-failures.lock"
# Seconds a writer waits for the other one (the front and the CLI each hold it for a read and
# a write); past it the write goes on unlocked rather than stall the front's event loop.
LOCK_WAIT = 0.5
FAILING = "failing to load"  # the state `model stats` and `model list --served` show
BACKOFF_FIRST = 10.0  # seconds a model is refused after its first failed load
BACKOFF_MAX = 600.0
LOG_TAIL_BYTES = 256 * 1024  # of the log, read for the model server's last lines
# Seconds the log gets to show the model server's last lines: a busy machine writes them late;
# a load a reload cut (no such lines) waits this long once.
CAUSE_WAIT = 3.0
# A llama.cpp error line, as the engine's output lands in our log (the router prefixes the
# model server's port): "... [port] 0.00.061.370 E llama_model_load: error loading model: X".
ERROR_LINE_RE = re.compile(r"\d+\.\d+\.\d+\.\d+ E (?:[a-z]{2,4}\s+)?(?:[\w:]+?: )?(.*)$")
# How each engine says a model server ended during its load, for one that said nothing of its
# own (killed by the OOM killer, crashed): the router, and llama-swap's start that failed.
ROUTER_ENDED_RE = re.compile(r"instance name=(\S+) exited with status (-?\d+)")
SWAP_ENDED_RE = re.compile(r"starting (.+?) failed: (upstream command exited prematurely)")
ENDED = "its model server ended while loading"
ENDED_FIX = ("'model logs' shows its last lines (killed for memory? crashed?); with the "
             "llama-server engine 'model stats' says whether it crashes when started alone")
FIXES = (  # what the cause says -> what to do
    ("not within the file bounds", "the file is cut short or damaged: download it again "
     "('model pull' for an Ollama model, else replace the file)"),
    ("unknown model architecture", "this llama.cpp does not know the model's architecture: "
     "update llama.cpp (./install.sh, or brew upgrade llama.cpp), or remove the file"),
    ("failed to allocate", "its context does not fit: lower its ctx_size in "
     "custom_models.yaml"),
    ("failed to create context", "its context does not fit: lower its ctx_size in "
     "custom_models.yaml"),
    (ENDED, ENDED_FIX),
)


@dataclass
class LoadFailure:
    model: str  # the engine's id
    name: str  # the name it is served by
    file: str
    cause: str
    fix: str
    count: int  # failed loads in a row
    at: float  # wall clock of the last failure
    until: float  # wall clock: refused at once until then
    stamp: tuple[int, int, int] | None = None  # the file's (inode, size, mtime_ns) then

    def message(self, now: float | None = None) -> str:
        left = max(0, round(self.until - (now or time.time())))
        text = f"model {self.name} failed to load from {self.file}: {self.cause}"
        if self.fix:
            text += f". Fix: {self.fix}"
        times = "once" if self.count == 1 else f"{self.count} times in a row"
        return text + (f" (failed {times}; not tried again for {left}s, or until the file "
                       "changes or 'model sync' runs)")


class LoadFailures:
    def __init__(self, settings: Settings,
                 file_of: Callable[[str], tuple[str, Path] | None]) -> None:
        self.settings = settings
        self.file_of = file_of  # engine id -> its served name and GGUF file
        self.failures: dict[str, LoadFailure] = {}
        self.written: set[str] = set()  # the ids this front last wrote to the file
        forget_failures(settings)  # a new front tries every model: stats must not say otherwise

    def current(self, engine_id: str) -> LoadFailure | None:
        """The failure a request for `engine_id` is refused with now, if any."""
        failure = self.failures.get(engine_id)
        if failure is None or time.time() >= failure.until:
            return None
        removed = engine_id in self.written and engine_id not in _on_disk(self.settings)
        if removed or _stamp(Path(failure.file)) != failure.stamp:  # `model unload`; a new file
            self.forget(engine_id)
            return None
        return failure

    def failed(self, engine_id: str, since: float) -> LoadFailure | None:
        """After a load begun at `since` (wall clock) that did not end loaded: the failure,
        when the log says that load failed or its server ended (a load model_serve stopped on
        purpose, a reload's cut, is no failure)."""
        served = self.file_of(engine_id)
        if served is None:
            return None
        name, path = served
        deadline = time.monotonic() + CAUSE_WAIT
        while (said := load_error(self.settings.log_file, path, since, engine_id)) is None:
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)
        cause = printable(said)
        if cause.startswith(ENDED) and stop_noted(self.settings, engine_id, since):
            return None  # a reload (or an unload) ended it during the load
        last = self.failures.get(engine_id)
        stamp = _stamp(path)
        count = last.count + 1 if last is not None and last.stamp == stamp else 1
        # A server that ended without a word of its own may have been ended from outside (the
        # OOM killer, a kill): once is not the model's fault, and is tried again at once;
        # twice in a row is.
        steps = count - 2 if cause.startswith(ENDED) else count - 1
        now = time.time()
        until = now + min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** steps) if steps >= 0 else now
        failure = LoadFailure(engine_id, name, str(path), cause, fix_for(cause), count, now,
                              until, stamp)
        self.failures[engine_id] = failure
        self._write(engine_id)
        return failure if steps >= 0 else None

    def loaded(self, engine_id: str) -> None:
        """A load of it succeeded: its next failure is a first one again ("in a row"), not
        one more step of a backoff that would otherwise grow over months of rare failures."""
        self.forget(engine_id)

    def forget(self, engine_id: str | None = None) -> None:
        """Try the model (every model: None) again at its next request."""
        if engine_id is None:
            changed = bool(self.failures)
            self.failures.clear()
        else:
            changed = self.failures.pop(engine_id, None) is not None
        if changed:
            self._write()

    def _write(self, recorded: str | None = None) -> None:
        """Write what this front remembers, less what the CLI removed from the file since this
        front last wrote it (`model unload NAME`, `model sync`): writing the front's whole
        memory back would undo those. `recorded`: the failure just recorded, kept."""
        with _file_lock(self.settings):
            on_disk = _on_disk(self.settings)
            for engine_id in self.written - on_disk.keys() - {recorded}:
                self.failures.pop(engine_id, None)
            try:
                _save(self.settings, self.failures)
            except OSError as exc:  # a full disk: remembered in memory still, and said
                log.warning("could not write %s (%s): `model stats` will not show the models "
                            "failing to load", self.settings.state_dir / FAILURES_FILE, exc)
                self.written = set()
                return
            self.written = set(self.failures)


def load_failures(settings: Settings) -> dict[str, LoadFailure]:
    """The failures the running front remembers now (for `model stats` and `model list`)."""
    now = time.time()
    return {name: item for name, item in _on_disk(settings).items() if item.until > now}


def forget_failures(settings: Settings, engine_ids: list[str] | None = None) -> list[str]:
    """`model unload NAME` (these models), `model sync` (every one): the front tries them
    again at their next request (it reads the file before each refusal). Returns those that
    were failing."""
    with _file_lock(settings):
        failing = _on_disk(settings)
        gone = [name for name in (list(failing) if engine_ids is None else engine_ids)
                if failing.pop(name, None) is not None]
        if gone:
            _save(settings, failing)
    return gone


def _file_lock(settings: Settings) -> contextlib.AbstractContextManager[bool]:
    """The front and the CLI read, change and write the file: one at a time."""
    return held_lock(settings.state_dir / FAILURES_LOCK, LOCK_WAIT, poll=0.01, mode=0o600)


def _save(settings: Settings, failures: dict[str, LoadFailure]) -> None:
    """Owner-only: each cause is a line of the model servers' log."""
    write_if_changed(settings.state_dir / FAILURES_FILE,
                     json.dumps({n: asdict(f) for n, f in failures.items()}, indent=1),
                     mode=0o600)


def _on_disk(settings: Settings) -> dict[str, LoadFailure]:
    try:
        data = json.loads((settings.state_dir / FAILURES_FILE).read_text(encoding="utf-8"))
        return {name: LoadFailure(**item) for name, item in data.items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def load_error(log_file: Path, path: Path, since: float = 0.0,
               engine_id: str | None = None) -> str | None:
    """The cause of the last failed load of `path`, from the model server's error lines in
    the log; else, for `engine_id`, the engine's line saying its server ended; None when the
    log shows neither logged after `since`."""
    try:
        with open(log_file, "rb") as handle:
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - LOG_TAIL_BYTES))
            lines = handle.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    quoted = f"'{path}'"
    end = next((i for i in range(len(lines) - 1, -1, -1)
                if quoted in lines[i] and "failed to" in lines[i]), None)
    if end is None or _logged_at(lines[end]) < since - 1:  # the log's clock has ms
        return _ended(lines, engine_id, since) if engine_id else None
    start = next((i for i in range(end - 1, -1, -1)
                  if quoted in lines[i] and "loading model" in lines[i]), max(0, end - 200))
    errors = [m.group(1).strip() for line in lines[start:end + 1]
              if (m := ERROR_LINE_RE.search(line))]
    said = next((e.split("error loading model: ", 1)[1] for e in errors
                 if "error loading model: " in e), None)
    return said or (errors[0] if errors else lines[end].split(" E ", 1)[-1].strip())


def _ended(lines: list[str], engine_id: str, since: float) -> str | None:
    """The engine's word that `engine_id`'s server ended, logged after `since`, as a cause."""
    for line in reversed(lines):
        router, swap = ROUTER_ENDED_RE.search(line), SWAP_ENDED_RE.search(line)
        said = (f"exit status {router.group(2)}" if router and router.group(2) != "0"
                and router.group(1) == engine_id else
                f"llama-swap: {swap.group(2)}" if swap and swap.group(1) == engine_id else None)
        if said is not None:
            if _logged_at(line) < since - 1:
                return None
            return f"{ENDED} ({said}), with no error of its own in the log"
    return None


def printable(text: str) -> str:
    """`text` with each control character shown as an escape: a cause quotes the file (its
    architecture's name, say), and `model stats` prints it to a terminal, which would obey
    escape sequences a hostile GGUF planted there."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def fix_for(cause: str) -> str:
    return next((fix for said, fix in FIXES if said in cause), "")


def _logged_at(line: str) -> float:
    try:
        return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return 0.0


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return (info.st_ino, info.st_size, info.st_mtime_ns)
