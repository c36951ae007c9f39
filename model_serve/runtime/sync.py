"""`model sync`: bridge -> catalog -> plan -> engine config -> reload only if it changed.

On any error the engine's last good config stays in place: the new one is built completely
in memory before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model_serve.config.custom_models import load_custom_models
from model_serve.config.models_dir import BRIDGE_DIR
from model_serve.config.settings import BUNDLED_BRIDGE, Settings
from model_serve.engines import Engine, select_engine
from model_serve.engines.base import LOADED_STATES
from model_serve.errors import ModelServeError
from model_serve.fileio import held_lock, write_if_changed
from model_serve.models.catalog import Catalog, ScanProblem, build_catalog, ensure_models_dir
from model_serve.models.plan import ServedModel, build_plan

log = logging.getLogger(__name__)


@dataclass
class BridgeResult:
    ran: bool
    summary: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    error: str = ""  # the bridge failed: Ollama's models are not refreshed, the rest still is


@dataclass
class SyncResult:
    engine: str
    config_path: Path
    plan: list[ServedModel]
    problems: list[ScanProblem]
    bridge: BridgeResult
    config_changed: bool
    reloaded: bool = False
    reload_error: str = ""


def run_bridge(settings: Settings, dry_run: bool = False) -> BridgeResult:
    """Link Ollama's models into MODELS_DIR/ollama with BRIDGE_SCRIPT (`dry_run`: only say
    what it would do, and which store it found)."""
    script = settings.bridge_script
    if not script.exists():
        raise ModelServeError(f"BRIDGE_SCRIPT {script} does not exist",
                              "fix BRIDGE_SCRIPT in .env or unset it to use the bundled bridge")
    # The bundled bridge runs on this interpreter: its `#!/usr/bin/env python3` would find
    # whatever python3 a bare PATH holds under launchd or cron, or none.
    program = [sys.executable, str(script)] if script == BUNDLED_BRIDGE else [str(script)]
    argv = [*program, "--dest", str(settings.models_dir / BRIDGE_DIR), "--json"]
    if settings.ollama_models is not None:
        argv += ["--store", str(settings.ollama_models)]
    if dry_run:
        argv.append("--dry-run")
    import subprocess

    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelServeError(f"the bridge {script} could not run: {exc}",
                              "check that BRIDGE_SCRIPT is executable") from exc
    warnings = [line for line in out.stderr.splitlines() if line.strip()]
    if out.returncode != 0:
        detail = warnings[-1] if warnings else f"exit code {out.returncode}"
        raise ModelServeError(f"the Ollama bridge failed: {detail}",
                              "fix the reported problem (OLLAMA_MODELS?) and run 'model sync'")
    try:
        summary = json.loads(out.stdout) if out.stdout.strip() else {}
    except ValueError:
        summary = {"output": out.stdout.strip()}  # a replacement script may print text
    return BridgeResult(True, summary, warnings)


def build_current_plan(settings: Settings,
                       engine: Engine | None = None) -> tuple[Catalog, list[ServedModel]]:
    ensure_models_dir(settings)
    catalog = build_catalog(settings.models_dir, settings.model_prefix, settings.state_dir)
    custom = load_custom_models(settings.custom_models_file)
    engine = engine or select_engine(settings)
    return catalog, build_plan(catalog, custom, settings, routes=engine.routed_names)


SYNC_LOCK_WAIT = 900.0  # seconds a sync waits for another one (a bridge run may take 300)


@contextlib.contextmanager
def sync_lock(settings: Settings, wait: float = SYNC_LOCK_WAIT) -> Iterator[None]:
    """One sync at a time per stack, across processes (`model sync`, the supervisor's syncs,
    the front's Ollama API) and threads: two at once would both read the config the other
    is replacing, drain and reload the engine twice, and one could return before the reload
    it depends on. flock: on Linux and macOS alike, and let go when its holder dies."""
    path = settings.state_dir / "sync.lock"
    with held_lock(path, wait, poll=0.1) as held:
        if not held:
            raise ModelServeError(f"another sync has held {path} for {wait:.0f}s",
                                  "see 'model logs'; try again later")
        yield


def run_sync(settings: Settings, *, bridge: bool = True, reload: bool = True,
             engine: Engine | None = None) -> SyncResult:
    with sync_lock(settings):
        return _run_sync(settings, bridge=bridge, reload=reload, engine=engine)


def _run_sync(settings: Settings, *, bridge: bool, reload: bool,
              engine: Engine | None) -> SyncResult:
    ensure_models_dir(settings)  # before the bridge, which would create any folder
    engine = engine or select_engine(settings)
    bridge_result = BridgeResult(False)
    if bridge:
        try:
            bridge_result = run_bridge(settings)
        except ModelServeError as exc:
            # Files already in MODELS_DIR are still served; the error is shown, not fatal.
            bridge_result = BridgeResult(False, error=str(exc))
            log.warning("%s", exc)
    catalog, plan = build_current_plan(settings, engine)
    running = reload and engine.healthy()
    previous = _read_config(engine.config_path) if running else None
    config_changed = engine.write_config(plan)
    result = SyncResult(engine.name, engine.config_path, plan, catalog.problems, bridge_result,
                        config_changed)
    if config_changed and running:
        try:
            new = _read_config(engine.config_path)
            with _requests_held(settings, engine, previous, new):
                _note_restarted(settings, engine, previous, new)
                engine.reload()
            result.reloaded = True
        except ModelServeError as exc:
            result.reload_error = exc.message
            if previous is not None:
                # The engine runs on the old config; a restart (crash, reboot) must find it too.
                write_if_changed(engine.config_path, previous, mode=0o600)
                result.reload_error += f"; the last good {engine.config_path.name} was put back"
            log.warning("engine reload failed: %s", result.reload_error)
    engine.config_taken()
    return result


def _note_restarted(settings: Settings, engine: Engine, previous: str | None,
                    new: str | None) -> None:
    """The servers this reload stops end on purpose (model_exits), a loading one too."""
    from model_serve.engines.stop_notes import note_stopping

    restarted = engine.restarted_by_reload(previous, new) \
        if previous is not None and new is not None else None
    try:
        running = [m.name for m in engine.models() if m.state in LOADED_STATES]
    except ModelServeError:
        running = []
    note_stopping(settings, [n for n in running if restarted is None or n in restarted])


DRAIN_SECONDS = 30.0  # how long a reload waits for the requests in flight on what it restarts


@contextlib.contextmanager
def _requests_held(settings: Settings, engine: Engine, previous: str | None,
                   new: str | None) -> Iterator[None]:
    """With the front: new requests for the models a reload restarts wait at the front, and
    the ones in flight finish first (up to DRAIN_SECONDS), so the change loses none. Released
    once the restarted models are down: their next request loads them with the new settings."""
    if not settings.front_enabled or previous is None or new is None:
        yield
        return
    restarted = engine.restarted_by_reload(previous, new)
    if restarted is not None and not restarted:
        yield
        return
    from model_serve import internal_key
    from model_serve.loopback import LoopbackError, call

    headers = internal_key.own_headers(settings)  # hold and release are the owner's to ask
    door = internal_key.front_socket(settings)  # clients filling the port cannot stop them
    restarting = [m for m in engine.models() if m.state in LOADED_STATES
                  and (restarted is None or m.name in restarted)]
    loaded = [m.name for m in restarting]
    try:
        held = call("POST", f"{settings.base_url}/api/model_serve/hold", headers,
                    DRAIN_SECONDS + 10,
                    json_body={"models": None if restarted is None else sorted(restarted),
                               "drain_seconds": DRAIN_SECONDS}, unix_socket=door)
        hold_id = held.json()["hold"]  # the release names it: it frees this hold only
    except (LoopbackError, ValueError, KeyError, TypeError) as exc:
        log.warning("the front did not hold requests during the reload: %s", exc)
        yield
        return
    try:
        _save_conversations(engine, loaded, previous)
        yield
        for name in loaded:
            engine.wait_unloaded(name, timeout=30)
        _until_ports_closed([m.port for m in restarting if m.port])
    finally:
        for _attempt in range(3):
            try:
                call("POST", f"{settings.base_url}/api/model_serve/release", headers, 10,
                     json_body={"hold": hold_id}, unix_socket=door)
                break
            except LoopbackError as exc:
                log.warning("releasing the held requests failed (%s); trying again", exc)


def _until_ports_closed(ports: list[int], timeout: float = 30.0) -> None:
    """The restarted models' old servers are gone: llama-swap lists the new config's models
    as stopped at once, while the old processes may still be exiting on ports the new ones
    will take, and a request released then can reach a dying server (HTTP 502)."""
    from model_serve.runtime.procs import port_in_use, wait_until

    wait_until(lambda: not any(port_in_use("127.0.0.1", port) for port in ports), timeout,
               interval=0.1)


def _save_conversations(engine: Engine, names: list[str], previous: str) -> None:
    """The reload restarts these models (their requests drained): save their conversations
    first, where the new config keeps their cache key (another key could not use them)."""
    before, after = engine.slot_folders(previous), engine.slot_folders()
    for name in names:
        if after.get(name) is not None and after.get(name) == before.get(name):
            try:
                engine.save_slots(name)
            except ModelServeError as exc:
                log.warning("conversations of %s not saved before the reload: %s", name,
                            exc.message)


def _read_config(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
