"""The `model` command: each subcommand parses options, calls one library function and hands
the result to a renderer. Heavy modules are imported inside the commands that use them."""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import click

from model_serve.errors import EXIT_NOT_RUNNING, ModelServeError, NotRunningError


def _settings():
    from model_serve.settings import load_settings

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
    from model_serve import render, stack

    status = stack.start_background(_settings())
    render.started(status)


@main.command()
def stop() -> None:
    """Stop the stack and every model server it started."""
    from model_serve import render, stack

    render.stopped(stack.stop_stack(_settings()))


@main.command()
def restart() -> None:
    """Stop the stack if it runs, then start it."""
    from model_serve import render, stack

    settings = _settings()
    stack.stop_stack(settings)
    render.started(stack.start_background(settings))


@main.command()
@json_option
def status(as_json: bool) -> None:
    """Show whether the stack runs (exit code 0 running, 3 not running)."""
    from model_serve import render, stack

    result = stack.stack_status(_settings())
    render.status(result, as_json)
    if not result.running:
        sys.exit(EXIT_NOT_RUNNING)


@main.command()
def serve() -> None:
    """Run the stack in the foreground (what the launchd/systemd service runs)."""
    from model_serve.supervisor import serve as run_serve

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
    from model_serve.sync import run_sync

    render.sync_result(run_sync(_settings(), bridge=not no_bridge), as_json)


@main.command("list")
@click.argument("filter_text", required=False, default="")
@json_option
def list_models(filter_text: str, as_json: bool) -> None:
    """List the models that can be served (FILTER: case-insensitive text)."""
    from model_serve import render
    from model_serve.sync import build_current_plan

    catalog, plan = build_current_plan(_settings())
    needle = filter_text.lower()
    chosen = [s for s in plan if needle in s.name.lower()
              or any(needle in n.lower() for n in s.model.ollama_names)]
    render.model_list(chosen, catalog.problems, as_json)


@main.command()
@click.argument("name")
@json_option
def show(name: str, as_json: bool) -> None:
    """Show every generated setting of one model, and why each value was chosen."""
    from model_serve import render
    from model_serve.errors import ConfigError
    from model_serve.sync import build_current_plan

    _catalog, plan = build_current_plan(_settings())
    lowered = name.lower()
    for served in plan:
        names = [served.name, served.name.replace(":", "-"), *served.aliases,
                 *served.model.ollama_names]
        if lowered in (n.lower() for n in names) or lowered == served.model.key.lower():
            render.show(served, as_json)
            return
    raise ConfigError(f"no model named '{name}'", "run 'model list' to see the names")


@main.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--name", help="Serve it under this name (MODEL_PREFIX is added if missing).")
def add(path: str, name: str | None) -> None:
    """Serve a GGUF file from anywhere (linked into MODELS_DIR/added, never copied)."""
    from pathlib import Path

    from model_serve import render
    from model_serve.add import add_model
    from model_serve.sync import run_sync

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
    from model_serve.sync import build_current_plan

    _catalog, plan = build_current_plan(_settings())
    rows = []
    for served in plan:
        sources = served.model.ollama_names or [str(served.model.path)]
        rows += [(source, served.name) for source in sources]
    needle = filter_text.lower()
    render.name_table([r for r in rows if needle in r[0].lower() or needle in r[1].lower()],
                      as_json)


def _later(command: str, advice: str) -> None:
    raise NotRunningError(f"'model {command}' is not available in this version yet", advice)


@main.command()
@click.argument("name")
def pull(name: str) -> None:
    """Pull a model with Ollama, then sync (coming soon)."""
    _later("pull", f"run 'ollama pull {name}', then 'model sync'")


@main.command()
@click.argument("name", required=False)
def rm(name: str | None) -> None:
    """Remove a model through Ollama, then sync (coming soon)."""
    _later("rm", "run 'ollama rm NAME', then 'model sync'")


@main.command()
@click.argument("name")
def run(name: str) -> None:
    """Chat with a model in the terminal through the stack's port (coming soon)."""
    _later("run", "use any OpenAI-compatible client against the URL 'model status' prints")


@main.command()
@json_option
@click.option("-w", "--watch", is_flag=True, help="Refresh every 2 seconds (Ctrl-C to quit).")
def stats(as_json: bool, watch: bool) -> None:
    """Per-model state, memory, idle time, TTL left and tokens served."""
    import time

    from model_serve import render
    from model_serve.stats import collect_stats

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
@click.option("--all", "unload_all", is_flag=True, help="Unload every loaded model.")
def unload(name: str | None, unload_all: bool) -> None:
    """Unload a loaded model now (it loads again on its next request)."""
    from model_serve import render
    from model_serve.engines import select_engine
    from model_serve.engines.base import LOADED_STATES
    from model_serve.errors import ConfigError

    engine = select_engine(_settings())
    if not engine.healthy():
        raise NotRunningError("the stack is not running", "start it with 'model start'")
    if unload_all:
        names = [m.name for m in engine.models() if m.state in LOADED_STATES]
    elif name:
        names = [name]
    else:
        raise ConfigError("name a model or pass --all",
                          "model unload ls/NAME  |  model unload --all")
    for model_name in names:
        engine.unload(model_name)
    render.unloaded(names)


if __name__ == "__main__":
    main()
