"""`model doctor`: every prerequisite checked, each with what to do about it."""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from model_serve.config.settings import Settings
from model_serve.errors import ModelServeError
from model_serve.machine_code import Machine


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""


def _engine(settings: Settings) -> Check:
    from model_serve.engines import select_engine

    engine = select_engine(settings)
    try:
        binary = engine.binary()
    except ModelServeError as exc:
        return Check("engine", "fail", exc.message, exc.hint)
    version = engine.version()
    number = getattr(engine, "version_number", lambda: None)()
    if engine.name == "llama-swap" and number is not None and number < 161:
        return Check("engine", "warn", f"llama-swap {number} at {binary} cannot unload one "
                     "model at a time (needs v161+), so the pressure unloader cannot work",
                     "brew upgrade llama-swap (or install a newer release)")
    return Check("engine", "ok", f"{engine.name} at {binary} ({version})")


def _engine_computes(settings: Settings) -> Check:
    """The same probe as ./install.sh and 'model check-engine', run afresh."""
    from model_serve.engines.engine_check import check_engine, failure_hint, option_words
    from model_serve.engines.llama_server import resolve_llama_server

    try:
        binary = resolve_llama_server(settings.llama_server_bin)
    except ModelServeError as exc:
        return Check("engine computes", "fail", exc.message, exc.hint)
    result = check_engine(settings, binary)
    if not result.ok:
        return Check("engine computes", "fail", result.summary(), failure_hint(result))
    if result.options:
        flags = " ".join(option_words(result.options))
        return Check("engine computes", "warn", result.summary(),
                     f"nothing to do: model_serve passes {flags}; a llama-server built without "
                     "native CPU extensions (CMAKE_ARGS='-DGGML_NATIVE=OFF' ./install.sh) would "
                     "not need it")
    return Check("engine computes", "ok", result.summary())


def _ollama(settings: Settings) -> Check:
    from model_serve.models.ollama import (
        SELF_HINT,
        ollama_binary,
        points_at_model_serve,
        server_url,
    )

    if points_at_model_serve(settings):
        return Check("ollama", "fail", f"OLLAMA_HOST={settings.ollama_host} points at "
                     "model_serve itself, not at your Ollama", SELF_HINT)

    try:
        binary = ollama_binary(settings)
    except ModelServeError as exc:
        return Check("ollama", "warn", exc.message + " (only needed for pull/rm/update)",
                     exc.hint)
    import requests

    try:
        version = requests.get(server_url(settings.ollama_host) + "/api/version", timeout=2)
        running = f", server {version.json().get('version', '?')} at {settings.ollama_host}"
    except (requests.RequestException, ValueError):
        return Check("ollama", "warn", f"{binary} found, but no server answers at "
                     f"{settings.ollama_host}", "start Ollama (macOS: open the app; Linux: "
                     "'ollama serve' or 'systemctl start ollama')")
    return Check("ollama", "ok", f"{binary}{running}")


def _store(settings: Settings) -> Check:
    from model_serve.runtime.sync import run_bridge

    if not settings.models_dir.is_dir():
        return Check("ollama store", "warn", "not checked (MODELS_DIR is missing)")
    try:  # the bridge's own dry run: the same store discovery a sync uses
        result = run_bridge(settings, dry_run=True)
    except ModelServeError as exc:
        return Check("ollama store", "fail", exc.message, exc.hint)
    store = result.summary.get("store") if isinstance(result.summary, dict) else None
    if not store:
        looked = next((w.split("; ", 1)[-1] for w in result.warnings if "looked in" in w), "")
        return Check("ollama store", "warn",
                     "no Ollama model store found" + (f" ({looked})" if looked else ""),
                     "pull a model with Ollama, or set OLLAMA_MODELS")
    unreadable = [w for w in result.warnings if "ermission" in w]
    if unreadable:
        return Check("ollama store", "fail", f"{store}: {unreadable[0]}",
                     _store_access_fix(Path(store)))
    from model_serve.models.ollama import manifest_path, server_models

    listed = server_models(settings) or []
    elsewhere = [n for n in listed if not manifest_path(Path(store), n).exists()]
    if elsewhere:
        return Check("ollama store", "warn", f"the Ollama server at {settings.ollama_host} lists "
                     f"{len(elsewhere)} model(s) that are not in {store} (e.g. {elsewhere[0]}): "
                     "it keeps its models in another folder",
                     "set OLLAMA_MODELS in .env to the folder that server uses")
    pending = len(result.summary.get("linked", [])) + len(result.summary.get("removed", []))
    detail = f"{store}" + (f" ({pending} change(s) waiting for 'model sync')" if pending else "")
    return Check("ollama store", "ok", detail)


def _store_access_fix(store: Path, platform: str = sys.platform) -> str:
    if platform == "darwin":  # Ollama.app keeps the store in the user's own ~/.ollama
        return f"give yourself read access: sudo chown -R \"$USER\" {shlex.quote(str(store))}"
    return ("add yourself to the 'ollama' group (sudo usermod -aG ollama $USER) and log in "
            "again")


def _models_dir(settings: Settings) -> Check:
    from model_serve.config.settings import LM_STUDIO_MODELS, SETTINGS_BY_NAME

    path = settings.models_dir
    default = settings.sources.get("MODELS_DIR") == "the defaults"
    if not path.is_dir() and default:
        return Check("MODELS_DIR", "ok", f"{path} (created on first use)")
    if not path.is_dir():
        return Check("MODELS_DIR", "fail", f"{path} does not exist",
                     f"mkdir -p {path}  (or set MODELS_DIR in .env)")
    if not os.access(path, os.W_OK):
        return Check("MODELS_DIR", "fail", f"{path} is not writable (the bridge links into it)",
                     "fix its permissions or set MODELS_DIR")
    current = settings.user_home / LM_STUDIO_MODELS.removeprefix("~/")
    original = settings.user_home / SETTINGS_BY_NAME["MODELS_DIR"].default.removeprefix("~/")
    other = original if path == current else current
    if default and other.is_dir() and other != path:
        return Check("MODELS_DIR", "ok", f"{path}; LM Studio's {other} exists too",
                     f"set MODELS_DIR={other} in .env to serve that one instead")
    return Check("MODELS_DIR", "ok", str(path))


def _catalog(settings: Settings) -> Check:
    from model_serve.runtime.sync import build_current_plan

    try:
        catalog, plan = build_current_plan(settings)
    except ModelServeError as exc:
        return Check("models and custom_models.yaml", "fail", exc.message, exc.hint)
    broken = [p for p in catalog.problems if "broken link" in p.reason]
    other = [p for p in catalog.problems if "broken link" not in p.reason]
    incompatible = [m.name for m in catalog.models if m.info.incompatibility]
    notes = [f"{len(plan)} model(s) servable"]
    if broken:
        notes.append(f"{len(broken)} broken link(s), e.g. {broken[0].path}")
    if other:
        notes.append(f"{len(other)} unreadable file(s), e.g. {other[0].path}: {other[0].reason}")
    if incompatible:
        notes.append(f"{len(incompatible)} Ollama-only file(s): {', '.join(incompatible[:3])}")
    status = "warn" if broken or other or incompatible else "ok"
    fix = ("remove the broken links (they are not ours to delete) and run 'model sync'"
           if broken else "")
    return Check("models and custom_models.yaml", status, "; ".join(notes), fix)


def _exposure(settings: Settings) -> Check:
    loopback = settings.host in ("127.0.0.1", "localhost", "::1") or \
        settings.host.startswith("127.")
    if loopback:
        return Check("exposure", "ok", f"the API listens on {settings.host} only")
    if not settings.api_keys:
        return Check("exposure", "warn", f"LISTEN_HOST={settings.host} lets other machines "
                     "reach every model, and API_KEYS is empty: anyone who can reach this "
                     "machine can use it", "set API_KEYS in .env, or LISTEN_HOST=127.0.0.1")
    return Check("exposure", "ok", f"the API listens on {settings.host}; clients need one of "
                 f"{len(settings.api_keys)} API key(s)")


def _keys_files(settings: Settings) -> Check:
    from model_serve.config.settings import keys_files_open_to_others

    warnings = keys_files_open_to_others(settings)
    if warnings:
        return Check("keys files", "warn", "; ".join(said for _path, said in warnings),
                     "chmod 600 " + " ".join(str(path) for path, _said in warnings))
    return Check("keys files", "ok", "the keys files, if any, are readable by their owner only")


def _port(settings: Settings) -> Check:
    from model_serve.runtime import procs
    from model_serve.runtime.stack import stack_status

    status = stack_status(settings)
    if status.running:
        return Check("port", "ok", f"{settings.port} is served by this stack (pid {status.pid})")
    if procs.port_in_use(settings.host, settings.port):
        return Check("port", "fail", f"{settings.port} is in use by "
                     f"{procs.who_listens(settings.port)}",
                     "stop it or set LLAMA_SWAP_PORT in .env")
    return Check("port", "ok", f"{settings.port} is free (the stack is not running)")


def _service(settings: Settings) -> Check:
    home = Path.home()
    if sys.platform == "darwin":
        agents = list((home / "Library" / "LaunchAgents").glob("com.model-serve*.plist"))
        found = agents[0] if agents else None
    else:
        units = list((home / ".config" / "systemd" / "user").glob("model-serve*.service"))
        found = units[0] if units else None
    if found:
        return Check("service", "ok", f"installed: {found}")
    return Check("service", "warn", "no login service installed (the stack will not start "
                 "by itself after a reboot)", "./setup_service.sh install  (or ./setup_cron.sh "
                 "start where there is no launchd/systemd)")


def _threads(settings: Settings) -> Check:
    cores = os.cpu_count() or 1
    if settings.model_threads:
        return Check("threads", "ok", f"{settings.model_threads} per model server "
                     f"(MODEL_THREADS; {cores} cores)")
    if sys.platform != "darwin" and cores <= 4:
        # Two servers each spinning one thread per core stall each other, far beyond 2x:
        # on 2 cores two 32-token replies at once took 72 s instead of 1.2 s.
        return Check("threads", "warn", f"each model server starts one thread per core; with "
                     f"{cores} cores, two models generating at once can stall each other",
                     "set MODEL_THREADS=1 in .env (one model alone then runs slower, "
                     "about half speed on 2 cores)")
    return Check("threads", "ok", f"llama-server's choice, one per core ({cores} cores)")


def _privacy(settings: Settings) -> Check:
    from model_serve.service.privacy import privacy_fix, privacy_warnings

    warnings = privacy_warnings(settings)
    if warnings:
        more = f" (and {len(warnings) - 1} more)" if len(warnings) > 1 else ""
        return Check("privacy", "warn", warnings[0] + more,
                     privacy_fix())
    return Check("privacy", "ok", "no folder of the stack is in one macOS protects from "
                 "launchd and cron")


def _peers(settings: Settings) -> Check:
    """Each peer asked for its models now, with our key for it."""
    from model_serve.runtime.peers import survey

    if not settings.peers:
        return Check("peers", "ok", "none (PEERS is empty)")
    answers = survey(settings.peers, lambda _name: False)
    down = [a for a in answers if a.problem]
    said = "; ".join(f"{a.peer.name} ({a.peer.url}): " +
                     (a.problem if a.problem else f"{len(a.models)} model(s)") for a in answers)
    if down:
        return Check("peers", "warn", said, "start the peer, or fix its URL in PEERS (a peer "
                     "that is another model_serve needs LISTEN_HOST, API_KEYS and "
                     "ALLOWED_HOSTS set for other machines)")
    return Check("peers", "ok", said)


def _rpc_workers(settings: Settings) -> Check:
    """Each RPC worker of the models with rpc: asked for ggml-rpc's HELLO now."""
    import asyncio

    from model_serve.runtime import rpc_reach
    from model_serve.runtime.sync import build_current_plan

    try:
        _catalog, plan = build_current_plan(settings)
    except ModelServeError:
        return Check("rpc workers", "ok", "not checked: see the custom_models.yaml check")
    workers = sorted({w for served in plan for w in served.workers})
    if not workers:
        return Check("rpc workers", "ok", "none (no model has rpc: in custom_models.yaml)")
    problems = dict(asyncio.run(rpc_reach.unreachable(workers)))
    # A loaded model holds its workers: busy is then what a worker should be.
    down = {w: why for w, why in problems.items() if why != rpc_reach.BUSY}
    said = "; ".join(f"{w}: " + ("in use by a model server" if problems.get(w) else "answers")
                     if w not in down else f"{w}: {down[w]}" for w in workers)
    if down:
        hosts = ", ".join(dict.fromkeys(w.rpartition(":")[0] for w in down))
        return Check("rpc workers", "warn", said,
                     f"run 'model worker status' on {hosts}, or fix rpc: in custom_models.yaml")
    return Check("rpc workers", "ok", said)


CHECKS: tuple[Callable[[Settings], Check], ...] = (
    _engine, _engine_computes, _models_dir, _catalog, _port, _exposure, _ollama, _store,
    _service, _threads, _peers, _keys_files, _rpc_workers,
)
def _gpu_limit(settings: Settings, machine: Machine | None = None) -> Check:
    """What Metal lets the GPU wire, which admission keeps the loaded models under; a
    llama-server that names no Metal device runs every model on the CPU."""
    from model_serve.engines.metal import GIB, read_gpu_limit

    limit = read_gpu_limit(settings.llama_server_bin, settings.cache_dir, machine)
    if limit is None:
        return Check("gpu limit", "ok", "not Apple Silicon: no Metal working-set limit to keep")
    detail = (f"{limit.bytes / GIB:.1f} of {limit.ram / GIB:.0f} GiB may be wired by the GPU "
              f"({limit.source}); the loaded models together stay under it")
    if limit.guessed:
        return Check("gpu limit", "warn", f"{detail}; but 'llama-server --list-devices' named "
                     "no Metal device: a build without Metal runs models on the CPU only, "
                     "many times slower", "install Homebrew's build: brew install llama.cpp "
                     "(or point LLAMA_SERVER_BIN at a build with Metal)")
    return Check("gpu limit", "ok", detail + " (raise it: sudo sysctl iogpu.wired_limit_mb=N)")


MACOS_CHECKS: tuple[Callable[[Settings], Check], ...] = (_privacy, _gpu_limit)


def run_checks(settings: Settings) -> list[Check]:
    results = []
    for check in CHECKS + (MACOS_CHECKS if sys.platform == "darwin" else ()):
        try:
            results.append(check(settings))
        except Exception as exc:  # noqa: BLE001 - a broken check must not hide the others
            results.append(Check(check.__name__.strip("_"), "fail", f"check crashed: {exc}"))
    return results
