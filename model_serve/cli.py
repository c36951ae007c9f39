"""The `model` command: each subcommand parses options, calls one library function and hands
the result to a renderer. Heavy modules are imported inside the commands that use them."""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import click

from model_serve.errors import EXIT_NOT_RUNNING, ModelServeError


def _settings():
    from model_serve.config.settings import load_settings

    return load_settings()


def _fail(exc: ModelServeError) -> NoReturn:
    if exc.exit_code == 0:
        click.echo(exc.message)
        sys.exit(0)
    click.echo(f"error: {exc.message}", err=True)
    if exc.hint:
        click.echo(f"  fix: {exc.hint}", err=True)
    sys.exit(exc.exit_code)


class ModelGroup(click.Group):
    """Turns every ModelServeError into one stderr message and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ModelServeError as exc:
            _fail(exc)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # keep the order commands were defined in


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


@click.group(cls=ModelGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="model-serve", prog_name="model")
def main() -> None:
    """Serve your local GGUF models (Ollama's included) on one OpenAI-compatible port."""


# --- running the stack -----------------------------------------------------------------------
@main.command()
def start() -> None:
    """Start the stack in the background and wait until the port answers."""
    from model_serve import render
    from model_serve.runtime import stack

    status = stack.start_background(_settings())
    render.started(status)


@main.command()
def stop() -> None:
    """Stop the stack and every model server it started."""
    from model_serve import render
    from model_serve.runtime import stack

    render.stopped(stack.stop_stack(_settings()))


@main.command()
def restart() -> None:
    """Stop the stack if it runs, then start it."""
    from model_serve import render
    from model_serve.runtime import stack

    settings = _settings()
    stack.stop_stack(settings)
    render.started(stack.start_background(settings))


@main.command()
@json_option
def status(as_json: bool) -> None:
    """Show whether the stack runs (exit code 0 running, 3 not running)."""
    from model_serve import render
    from model_serve.runtime import stack

    result = stack.stack_status(_settings())
    render.status(result, as_json)
    if not result.running:
        sys.exit(EXIT_NOT_RUNNING)


@main.command()
def serve() -> None:
    """Run the stack in the foreground (what the launchd/systemd service runs)."""
    from model_serve.runtime.supervisor import serve as run_serve

    sys.exit(run_serve(_settings(), to_stderr=sys.stderr.isatty()))


@main.command()
@click.option("-n", "--lines", default=50, show_default=True, help="How many lines to show.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines (Ctrl-C to quit).")
def logs(lines: int, follow: bool) -> None:
    """Show the stack's log (supervisor and engine output)."""
    from model_serve import render

    render.logs(_settings().log_file, lines, follow)


# --- models ----------------------------------------------------------------------------------
@main.command()
@click.option("--no-bridge", is_flag=True, help="Skip linking Ollama's models.")
@json_option
def sync(no_bridge: bool, as_json: bool) -> None:
    """Link Ollama's models, scan MODELS_DIR and write the engine config.

    A running engine is told to reload only when the config changed."""
    from model_serve import render
    from model_serve.runtime.load_failures import forget_failures
    from model_serve.runtime.sync import run_sync

    settings = _settings()
    result = run_sync(settings, bridge=not no_bridge)
    forget_failures(settings)  # the user may have mended a file: every model is tried again
    render.sync_result(result, as_json)
    if result.reload_error:
        sys.exit(1)  # the engine refused the new config: the user has something to fix


@main.command("list")
@click.argument("filter_text", required=False, default="")
@click.option("--served", is_flag=True, help="What the running engine serves, with its state.")
@json_option
def list_models(filter_text: str, served: bool, as_json: bool) -> None:
    """List models: Ollama's and every GGUF in MODELS_DIR, with their served names
    (FILTER: case-insensitive text in either name)."""
    from model_serve import render
    from model_serve.runtime.sync import build_current_plan

    settings = _settings()
    if served:
        from model_serve.engines import select_engine

        engine = select_engine(settings)
        engine.require_running()
        from model_serve.engines.base import LOADED_STATES
        from model_serve.runtime.load_failures import FAILING, load_failures

        live = [m for m in engine.models() if filter_text.lower() in
                " ".join([m.name, *m.aliases]).lower()]
        failures = load_failures(settings)
        for model in live:
            if model.name in failures and model.state not in LOADED_STATES:
                model.state = FAILING
        render.served_list(live, as_json, {name: f.message() for name, f in failures.items()})
        return
    catalog, plan = build_current_plan(settings)
    needle = filter_text.lower()
    chosen = [s for s in plan if needle in s.name.lower()
              or any(needle in n.lower() for n in s.model.ollama_names)]
    from model_serve.runtime.load_failures import load_failures

    failing = {f.name: f.message() for f in load_failures(settings).values()}
    from model_serve.models.names import identity
    from model_serve.runtime.peers import survey

    local = {identity(n) for s in plan for n in (s.name, *s.aliases)}
    peers = survey(settings.peers, lambda name: identity(name) in local)
    render.model_list(chosen, catalog.problems, as_json, failing, peers, needle)


@main.command()
@click.argument("name")
@json_option
def show(name: str, as_json: bool) -> None:
    """Show every generated setting of one model, and why each value was chosen."""
    from model_serve import render
    from model_serve.engines import select_engine, slot_cache
    from model_serve.models.plan import find_served
    from model_serve.runtime.sync import build_current_plan

    settings = _settings()
    engine = select_engine(settings)
    catalog, plan = build_current_plan(settings, engine)
    served = find_served(plan, catalog, name)
    engine_id = engine.model_id(served.name)
    check = slot_cache.check_of(slot_cache.folder_for(settings.kv_cache_dir, engine_id, served))
    render.show(served, as_json, check if served.keeps_conversations else None)


@main.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--name", help="Serve it under this name (MODEL_PREFIX is added if missing).")
def add(path: str, name: str | None) -> None:
    """Serve a GGUF file from anywhere (linked into MODELS_DIR/added, never copied)."""
    from pathlib import Path

    from model_serve import render
    from model_serve.commands.add import add_model
    from model_serve.runtime.sync import run_sync

    settings = _settings()
    found = add_model(settings, Path(path), name)
    result = run_sync(settings, bridge=False)
    served = [s for s in result.plan if s.path == found]
    render.added(found, served[0].name if served else None, result)


@main.command()
@click.argument("filter_text", required=False, default="")
@json_option
def names(filter_text: str, as_json: bool) -> None:
    """Show which served name each Ollama model (or file) has."""
    from model_serve import render
    from model_serve.runtime.sync import build_current_plan

    _catalog, plan = build_current_plan(_settings())
    rows = []
    for served in plan:
        sources = served.model.ollama_names or [str(served.model.path)]
        rows += [(source, served.name) for source in sources]
    needle = filter_text.lower()
    render.name_table([r for r in rows if needle in r[0].lower() or needle in r[1].lower()],
                      as_json)


@main.command()
@click.argument("name")
def pull(name: str) -> None:
    """Pull a model with Ollama (library name, user/name or hf.co/user/repo:quant), sync, and
    print the name to use in API calls."""
    from model_serve import render
    from model_serve.models import ollama
    from model_serve.runtime.sync import run_sync

    settings = _settings()
    ollama.pull(settings, name)
    result = run_sync(settings)
    wanted = ollama.normalize(name).lower()
    served = [s for s in result.plan if wanted in (n.lower() for n in s.model.ollama_names)]
    if not served:
        ollama.check_pulled_into(settings, name, result.bridge.summary.get("store"))
    render.pulled(name, served, result)


@main.command()
@click.argument("name", required=False)
@click.option("--filter", "filter_text", help="Remove every Ollama model whose name contains "
              "this text (case-insensitive).")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def rm(name: str | None, filter_text: str | None, yes: bool) -> None:
    """Remove Ollama models (unloading them first), then sync so their names go."""
    from model_serve import render
    from model_serve.commands.unload import unload_models
    from model_serve.engines import select_engine
    from model_serve.models import ollama
    from model_serve.runtime.forget import forget_model
    from model_serve.runtime.sync import build_current_plan, run_sync

    settings = _settings()
    catalog, _plan = build_current_plan(settings)
    targets = ollama.removal_targets(catalog, name, filter_text)
    render.removal_list(targets)
    if not yes and not click.confirm(f"Remove {len(targets)} model(s)?", default=False):
        click.echo("nothing removed")
        return
    engine = select_engine(settings)
    listed = engine.models() if engine.healthy() else []
    removing = {t.name for t in targets}
    for model in catalog.models:
        # Unload only what loses its last Ollama name (another tag may still use the blob).
        last_name = model.ollama_names and set(model.ollama_names) <= removing
        # Its conversations go with it: the loaded ones erased first, so the unload saves none.
        forgotten = forget_model(settings, engine, model.name, listed) if last_name else None
        if last_name and unload_models(engine, engine.resolve(model.name, listed)).unloaded:
            click.echo(f"unloaded {model.name}")
        if forgotten is not None and (forgotten.saved or any(forgotten.erased.values())):
            render.forgotten(forgotten, as_json=False)
    failures: list[ModelServeError] = []
    for target in targets:
        try:
            ollama.remove(settings, target.name)
        except ModelServeError as exc:  # the others still go, and the sync still runs
            failures.append(exc)
            continue
        click.echo(f"removed {target.name}")
    render.sync_result(run_sync(settings), as_json=False)
    _report_failures(failures)


@main.command()
@click.argument("name", required=False)
def update(name: str | None) -> None:
    """Pull again every Ollama model (or NAME), then sync; says which ones changed."""
    from model_serve import render
    from model_serve.models import ollama
    from model_serve.runtime.sync import build_current_plan, run_sync

    settings = _settings()
    catalog, _plan = build_current_plan(settings)
    names = [m.name for m in (ollama.resolve(catalog, name) if name
                              else ollama.ollama_models(catalog))]
    if not names:
        click.echo("no Ollama models to update" + (f" named '{name}'" if name else ""))
        return
    before = ollama.blobs_by_name(catalog)
    failures: list[ModelServeError] = []
    failed: list[str] = []
    for each in names:
        click.echo(f"==> {each}")
        try:
            ollama.pull(settings, each)
        except ModelServeError as exc:  # the others are still pulled, and the sync still runs
            failures.append(exc)
            failed.append(each)
    result = run_sync(settings)
    after = ollama.blobs_by_name(build_current_plan(settings)[0])
    changed = [n for n in names if before.get(n) != after.get(n)]
    render.updated([n for n in names if n not in failed], changed, result)
    _report_failures(failures)


def _report_failures(failures: list[ModelServeError]) -> None:
    """After a loop that went on past failures: each one, then exit 1."""
    for exc in failures:
        click.echo(f"error: {exc.message}", err=True)
    if failures:
        click.echo(f"  fix: {failures[0].hint}", err=True)
        sys.exit(1)


@main.command()
@click.argument("name")
@click.option("--system", help="A system prompt for the conversation.")
def run(name: str, system: str | None) -> None:
    """Chat with a model in the terminal, through the stack's port (so its settings apply).

    NAME is the served name or the Ollama name. Type /exit to quit, /clear to forget."""
    from model_serve.commands.chat import chat_loop

    chat_loop(_settings(), name, system)


@main.command()
@json_option
def doctor(as_json: bool) -> None:
    """Check every prerequisite and say what to fix (exit code 1 if something is wrong)."""
    from model_serve import render
    from model_serve.commands.doctor import run_checks

    checks = run_checks(_settings())
    render.doctor(checks, as_json)
    if any(c.status == "fail" for c in checks):
        sys.exit(1)


@main.command("check-engine")
@json_option
def check_engine(as_json: bool) -> None:
    """Prove that llama-server computes on this CPU: one real token from a real model.

    When the defaults crash (AMX on some Xeon VMs) and --no-repack computes, every model
    server gets --no-repack from then on. Exit code 1 when nothing computes."""
    from model_serve import render
    from model_serve.engines.engine_check import check_engine as run_check
    from model_serve.engines.llama_server import resolve_llama_server

    settings = _settings()
    result = run_check(settings, resolve_llama_server(settings.llama_server_bin))
    render.engine_check(result, as_json)
    if not result.ok:
        sys.exit(1)


@main.command()
@json_option
@click.option("-w", "--watch", is_flag=True, help="Refresh every 2 seconds (Ctrl-C to quit).")
def stats(as_json: bool, watch: bool) -> None:
    """Per-model state, memory, idle time, TTL left and tokens served."""
    import time

    from model_serve import render
    from model_serve.runtime.stats import collect_stats

    settings = _settings()
    while True:
        report = collect_stats(settings)
        if watch and not as_json:
            click.clear()
        render.stats(report, as_json)
        if not watch:
            return
        try:
            time.sleep(2)
        except KeyboardInterrupt:
            return


@main.command()
@click.argument("name", required=False)
@click.option("--all", "forget_all", is_flag=True, help="Forget the conversations of every "
              "model.")
@json_option
def forget(name: str | None, forget_all: bool, as_json: bool) -> None:
    """Delete a model's saved conversations (KV_CACHE_DIR), and erase those it holds in
    memory while loaded, so its next unload does not save them again."""
    from model_serve import render
    from model_serve.runtime.forget import forget as forget_named

    render.forgotten(forget_named(_settings(), name, forget_all), as_json)


@main.command()
@click.argument("name", required=False)
@click.option("--all", "unload_all", is_flag=True, help="Unload every loaded model.")
def unload(name: str | None, unload_all: bool) -> None:
    """Unload a loaded model now (it loads again on its next request)."""
    from model_serve import render
    from model_serve.commands.unload import unload as unload_named

    result = unload_named(_settings(), name, unload_all)
    render.unloaded(result.unloaded, result.not_loaded)


# --- RPC workers -----------------------------------------------------------------------------
@main.group()
def worker() -> None:
    """Lend this machine to a model served elsewhere (llama.cpp RPC; trusted networks only)."""


@worker.command("start")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; another machine's model server needs one it can "
                   "reach (llama.cpp RPC has no authentication: a network you trust only).")
@click.option("--port", default=50052, show_default=True, type=int, help="Port to listen on.")
@click.option("--threads", type=int, help="CPU threads for the CPU device (the server's "
              "default: 1).")
@click.option("--device", help="Devices to lend, comma separated (default: all).")
@click.option("--cache", is_flag=True, help="Keep received tensors in llama.cpp's local file "
              "cache: the next load of the same model sends less.")
@json_option
def worker_start(host: str, port: int, threads: int | None, device: str | None, cache: bool,
                 as_json: bool) -> None:
    """Start an RPC worker in the background, restarted if it dies."""
    from model_serve import render
    from model_serve.runtime import rpc_worker

    host = rpc_worker.check_host(host)
    click.echo(rpc_worker.start_warning(host, port), err=True)
    status = rpc_worker.start_worker(_settings(), host, port, threads, device, cache)
    render.workers([status], as_json)


@worker.command("stop")
@click.option("--port", type=int, help="The worker's port (default: every worker).")
def worker_stop(port: int | None) -> None:
    """Stop the RPC worker on a port, or every one."""
    from model_serve import render
    from model_serve.runtime import rpc_worker

    render.workers_stopped(rpc_worker.stop_workers(_settings(), port))


@worker.command("status")
@click.option("--port", type=int, help="Only the worker on this port.")
@json_option
def worker_status(port: int | None, as_json: bool) -> None:
    """Show the RPC workers of this machine (exit code 0 one runs, 3 none)."""
    from model_serve import render
    from model_serve.runtime import rpc_worker

    found = [s for s in rpc_worker.all_workers(_settings())
             if port is None or s.record.port == port]
    render.workers(found, as_json)
    if not any(s.running for s in found):
        sys.exit(EXIT_NOT_RUNNING)


if __name__ == "__main__":
    main()
