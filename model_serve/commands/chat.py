"""`model run NAME`: a terminal chat through the stack's own port, so the model's custom
settings (samplers, context, template) apply exactly as they do for API clients."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import click

from model_serve.config.settings import Settings
from model_serve.errors import ModelServeError
from model_serve.sse import sse_payloads


def resolve_served_name(settings: Settings, name: str) -> str:
    """The served name for a served name, its dash form, or an Ollama name."""
    from model_serve.models.plan import find_served
    from model_serve.runtime.sync import build_current_plan

    catalog, plan = build_current_plan(settings)
    return find_served(plan, catalog, name).name


class ReplyError(ModelServeError):
    """One turn of the conversation failed; the conversation itself goes on."""


def stream_reply(settings: Settings, model: str, messages: list[dict[str, str]]) -> Iterator[str]:
    """Yield the reply's text pieces as the server streams them."""
    import requests

    from model_serve import internal_key

    headers = internal_key.own_headers(settings)
    try:
        yield from _stream(settings, model, messages, headers)
    except requests.ConnectionError as exc:
        raise ReplyError(f"the stack at {settings.base_url} is not answering "
                         f"({type(exc).__name__})",
                         "'model status' says why; 'model start' starts it again") from exc
    except requests.RequestException as exc:
        raise ReplyError(f"the connection to the stack broke: {exc}", "try again") from exc


def _stream(settings: Settings, model: str, messages: list[dict[str, str]],
            headers: dict[str, str]) -> Iterator[str]:
    import requests

    with requests.post(f"{settings.base_url}/v1/chat/completions", headers=headers, stream=True,
                       json={"model": model, "messages": messages, "stream": True},
                       timeout=(5, 600)) as response:
        if response.status_code != 200:
            try:
                detail = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                detail = response.text[:300]
            raise ReplyError(f"the server answered HTTP {response.status_code}: {detail}",
                             "see 'model logs'")
        for chunk in sse_payloads(response.iter_lines(decode_unicode=True)):
            choices = (chunk.get("choices") if isinstance(chunk, dict) else None) or [{}]
            piece = (choices[0].get("delta") or {}).get("content")
            if piece:
                yield piece


def _with_spinner(pieces: Iterator[str]) -> Iterator[str]:
    """Show a visible wait until the first token (a cold model loads first)."""
    first = threading.Event()

    def spin() -> None:
        frames, n = "|/-\\", 0
        while not first.wait(0.15):
            click.echo(f"\r{frames[n % 4]} loading…", nl=False, err=True)
            n += 1
        click.echo("\r" + " " * 12 + "\r", nl=False, err=True)

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    try:
        for piece in pieces:
            if not first.is_set():
                first.set()
                spinner.join()
            yield piece
    finally:
        first.set()
        spinner.join()


def chat_loop(settings: Settings, name: str, system: str | None = None) -> None:
    from model_serve.engines import select_engine

    model = resolve_served_name(settings, name)
    select_engine(settings).require_running()
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    click.echo(f"chatting with {model} — /exit to quit, /clear to start over")
    while True:
        try:
            line = click.prompt(">>>", prompt_suffix=" ", default="", show_default=False)
        except (EOFError, click.Abort):
            click.echo()
            return
        text = line.strip()
        if text in ("/exit", "/quit", "/bye"):
            return
        if text == "/clear":
            history = history[:1] if system else []
            click.echo("(conversation cleared)")
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        reply: list[str] = []
        try:
            for piece in _with_spinner(stream_reply(settings, model, history)):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            click.echo("\n(interrupted)")
        except ReplyError as exc:  # say it, forget the turn, keep the conversation
            click.echo(f"\nerror: {exc.message}\n  fix: {exc.hint}", err=True)
            history.pop()
            continue
        click.echo()
        history.append({"role": "assistant", "content": "".join(reply)})
