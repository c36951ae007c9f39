"""Everything the CLI prints: one renderer per result, as text or as JSON."""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from model_serve.commands.doctor import Check
    from model_serve.engines.base import EngineModel
    from model_serve.engines.engine_check import EngineCheck
    from model_serve.engines.slot_cache import RestoreCheck
    from model_serve.models.catalog import ScanProblem
    from model_serve.models.ollama import OllamaModel
    from model_serve.models.plan import ServedModel
    from model_serve.runtime.forget import ForgetResult
    from model_serve.runtime.peers import Survey
    from model_serve.runtime.rpc_worker import WorkerStatus
    from model_serve.runtime.stack import StackStatus, StopReport
    from model_serve.runtime.stats import StatsReport
    from model_serve.runtime.sync import SyncResult


def table_lines(rows: list[Sequence[str]], right: Collection[int] = ()) -> list[str]:
    """Rows (a header first, if any) in columns two spaces apart; columns whose index is in
    `right` are right-aligned (numbers). Trailing blanks are dropped."""
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(width) if i in right else cell.ljust(width)
                      for i, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip()
            for row in rows]


def _echo_table(rows: list[Sequence[str]], right: Collection[int] = ()) -> None:
    for line in table_lines(rows, right):
        click.echo(line)


def _json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60}s"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


def started(status: StackStatus) -> None:
    click.echo(f"model_serve is running: engine {status.engine}, pid {status.pid}"
               + (f", under its login service ({status.via_service})"
                  if status.via_service else ""))
    click.echo(f"  API:  http://127.0.0.1:{status.port}/v1")
    click.echo(f"  log:  {status.log_file}   (model logs -f)")
    from model_serve.runtime.state import Phase

    sync = status.children.get("sync")
    if sync is not None and sync.phase == Phase.BACKOFF and sync.last_error:
        click.echo(f"warning: {sync.last_error}", err=True)
    if status.served_models == 0:
        click.echo("no models yet. Get a first one:")
        click.echo("  model pull gemma3              with Ollama installed")
        click.echo("  model add PATH/TO/model.gguf   any GGUF file you have")
        click.echo("  or the README's 'A first model without Ollama' (a 253 MB model from PyPI)")


def engine_check(check: EngineCheck, as_json: bool) -> None:
    from model_serve.engines.engine_check import failure_hint, option_words

    if as_json:
        _json({"ok": check.ok, "summary": check.summary(), **check.to_json(),
               "options": check.options})
        return
    click.echo(f"llama-server: {check.binary}")
    click.echo(f"model:        {check.model}")
    for run in check.runs:
        flags = " ".join(option_words(run.options)) or "defaults"
        outcome = f"one token in {run.seconds:.1f}s" if run.ok else run.cause
        click.echo(f"  [{'ok  ' if run.ok else 'FAIL'}] {flags}: {outcome}")
    click.echo(check.summary())
    failure = check.first_failure
    if not check.ok and failure is not None:
        if failure.output_tail:
            click.echo("its last output:\n" + failure.output_tail)
        click.echo(f"  fix: {failure_hint(check)}")


def stopped(report: StopReport) -> None:
    if not report.was_running and not report.orphans:
        click.echo("model_serve is not running")
        return
    parts = ["model_serve stopped" if report.was_running else "cleaned up after a crashed stack"]
    if report.orphans:
        parts.append(f"{report.orphans} leftover process(es) ended")
    if report.killed:
        parts.append(f"{report.killed} had to be killed")
    click.echo("; ".join(parts))


def status(result: StackStatus, as_json: bool) -> None:
    if as_json:
        _json(result.to_json())
        return
    if not result.running:
        if result.stale:
            click.echo(f"model_serve is not running (its supervisor, pid {result.pid}, died; "
                       "'model start' cleans up and starts again)")
        else:
            click.echo("model_serve is not running")
        return
    click.echo(f"model_serve is running (pid {result.pid}, up {human_duration(result.uptime)})")
    click.echo(f"  API:      http://127.0.0.1:{result.port}/v1"
               f"  ({'answering' if result.healthy else 'NOT answering'})")
    from model_serve.runtime.state import Phase

    for name, child in result.children.items():
        label = name
        if name == "engine":
            version = f", {result.engine_version}" if result.engine_version else ""
            label = f"engine ({result.engine}{version})"
        line = f"  {label + ':':9} {child.phase}"
        if child.restarts:
            line += f", {child.restarts} restart(s)"
        if child.last_error and child.phase != Phase.RUNNING:
            line += f" - {child.last_error}"
        click.echo(line)
    click.echo(f"  config:   {result.config_path}")
    click.echo(f"  log:      {result.log_file}")
    click.echo(f"  page:     {result.dashboard or 'none (FRONT=off: the engine has the port)'}")
    if result.peers is not None:
        _peers(result.peers)


def _peers(peers: list[dict[str, Any]]) -> None:
    """Each peer as the front sees it: up with its models, or down with the reason (a peer's
    own words may be in it: shown escaped)."""
    up = sum(1 for p in peers if p.get("up"))
    click.echo(f"  peers:    {len(peers)} ({up} up)")
    for peer in peers:
        models = f"{peer.get('models', 0)} model(s)"
        if peer.get("up"):
            state = f"up, {models}"
        elif not peer.get("checked"):
            state = "not checked yet"
        else:
            state = f"DOWN ({models} listed, unavailable): {peer.get('problem', '')}"
        click.echo(shown_on_terminal(f"    {peer.get('name')}  {peer.get('url')}  {state}"))


def logs(path: Path, lines: int, follow: bool) -> None:
    from model_serve.runtime import stack

    if not path.exists():
        click.echo(f"no log yet at {path} (the stack has not run)")
        return
    text = stack.tail(path, lines)
    if text:
        click.echo(shown_on_terminal(text))
    if not follow:
        return
    try:
        for line in stack.follow(path):
            click.echo(shown_on_terminal(line), nl=False)
    except KeyboardInterrupt:
        pass


def shown_on_terminal(text: str) -> str:
    """`text` with each control character but line breaks and tabs shown as an escape. The
    log quotes files (a GGUF's architecture name) and requests (a grammar the engine could
    not parse): escape sequences a hostile file or client put there would be obeyed by the
    owner's terminal (set the clipboard, rewrite what the screen shows)."""
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def _problems(problems: list[ScanProblem]) -> None:
    for problem in problems:
        click.echo(f"warning: {problem.path}: {problem.reason}", err=True)


def sync_result(result: SyncResult, as_json: bool) -> None:
    if as_json:
        _json({
            "engine": result.engine, "config_path": str(result.config_path),
            "config_changed": result.config_changed, "reloaded": result.reloaded,
            "reload_error": result.reload_error, "models": [s.name for s in result.plan],
            "problems": [{"path": str(p.path), "reason": p.reason} for p in result.problems],
            "bridge": result.bridge.summary, "bridge_error": result.bridge.error or None,
        })
        return
    for warning in result.bridge.warnings:
        click.echo(f"bridge: {warning}", err=True)
    if result.bridge.error:
        click.echo(f"warning: {result.bridge.error}", err=True)
    summary = result.bridge.summary
    if result.bridge.ran and isinstance(summary, dict) and "linked" in summary:
        click.echo(f"Ollama bridge: {len(summary.get('linked', []))} linked, "
                   f"{len(summary.get('unchanged', []))} unchanged, "
                   f"{len(summary.get('removed', []))} removed, "
                   f"{len(summary.get('skipped', []))} skipped")
    _problems(result.problems)
    click.echo(f"{len(result.plan)} model(s) for {result.engine}: {result.config_path} "
               + ("written" if result.config_changed else "unchanged"))
    if result.reloaded:
        click.echo("the running engine reloaded its config")
    if result.reload_error:
        click.echo(f"warning: the engine did not reload: {result.reload_error}", err=True)


def _kind(served: ServedModel) -> str:
    from model_serve.models.kinds import label

    return label(served.kind, served.embeddings, served.reranking)


def _served_json(served: ServedModel) -> dict[str, Any]:
    model, template = served.model, served.chat_template
    return {
        "name": served.name, "aliases": served.aliases, "path": str(model.path),
        "size_bytes": model.size_bytes, "ollama_names": model.ollama_names,
        "source": model.source, "architecture": model.info.architecture,
        "kind": _kind(served), "kind_reason": served.kind_reason,
        "chat_template": template.template if template else None,
        "chat_template_reason": template.reason if template else None,
        "size_label": model.info.size_label, "quant": model.info.file_type,
        "trained_context": model.info.context_length, "ctx_size": served.ctx_size,
        "ctx_reason": served.ctx_reason, "ttl": served.ttl, "parallel": served.parallel,
        "workers": served.workers, "options": served.options,
        "mmproj": str(model.mmproj) if model.mmproj else None,
        "estimated_bytes": served.estimated_bytes, "custom_settings": served.custom_line or None,
        "incompatible": model.info.incompatibility or None,
        "keeps_conversations": served.keeps_conversations,
        "conversations": served.conversations_reason,
    }


def model_list(plan: list[ServedModel], problems: list[ScanProblem], as_json: bool,
               failing: dict[str, str] | None = None, peers: list[Survey] | None = None,
               needle: str = "") -> None:
    """`failing`: served name -> why its loads fail now (runtime/load_failures.py); `peers`:
    the PEERS' models, shown as theirs (only those whose name holds `needle`)."""
    failing = failing or {}
    peers = peers or []
    if as_json:
        _json([{**_served_json(s), "load_failure": failing.get(s.name)} for s in plan]
              + [{"name": m.name, "peer": p.peer.name, "peer_url": p.peer.url,
                  "peer_name": m.remote, "state": m.state}
                 for p in peers for m in p.models if needle in m.name.lower()])
        return
    _problems(problems)
    _peer_list(peers, needle)
    if not plan:
        click.echo("no models found (put GGUF files under MODELS_DIR, or pull with Ollama and "
                   "run 'model sync')")
        return
    rows = [("NAME", "KIND", "SIZE", "QUANT", "CTX", "OLLAMA NAME / FILE")]
    for served in plan:
        source = ", ".join(served.model.ollama_names) or str(served.model.path)
        flag = "  [cannot load: Ollama-only format]" if served.model.info.incompatibility else ""
        flag += "  [failing to load]" if served.name in failing else ""
        rows.append((served.name, _kind(served), human_bytes(served.model.size_bytes),
                     served.model.info.file_type or "-", str(served.ctx_size), source + flag))
    _echo_table(rows, right={2, 4})
    for served in plan:
        if served.name in failing:
            click.echo(f"{served.name}: {failing[served.name]}")


def _peer_list(peers: list[Survey], needle: str) -> None:
    """The peers' models first: the local table below may end the output with its notes."""
    rows: list[Sequence[str]] = []
    for survey in peers:
        if survey.problem:
            click.echo(f"peer {survey.peer.name} ({survey.peer.url}) is not answering: "
                       f"{survey.problem}")
        rows += [(m.name, f"peer {m.peer} ({survey.peer.url})", m.state)
                 for m in survey.models if needle in m.name.lower()]
    if rows:
        _echo_table([("PEER'S MODEL", "SERVED BY", "STATE"), *rows])
        click.echo("")


def served_list(models: list[EngineModel], as_json: bool,
                failures: dict[str, str] | None = None) -> None:
    """`failures`: engine id -> why its loads fail (runtime/load_failures.py)."""
    failures = failures or {}

    def other_names(m: EngineModel) -> list[str]:
        return [n for n in dict.fromkeys([m.name, *m.aliases]) if n != m.served_name]

    if as_json:
        _json([{"name": m.served_name, "engine_id": m.name, "state": m.state,
                "aliases": other_names(m), "load_failure": failures.get(m.name)}
               for m in models])
        return
    if not models:
        click.echo("the engine serves no models")
        return
    _echo_table([("NAME", "STATE", "ALSO ANSWERS TO")]
                + [(m.served_name, m.state, ", ".join(other_names(m))) for m in models])
    for m in models:
        if m.name in failures:
            click.echo(f"{m.served_name}: {failures[m.name]}")


def pulled(name: str, served: list[ServedModel], result: SyncResult) -> None:
    sync_result(result, as_json=False)
    if not served:
        click.echo(f"warning: {name} was pulled but gives no servable GGUF model (a "
                   "safetensors or cloud model?); Ollama itself can run it", err=True)
        return
    for model in served:
        if model.model.info.incompatibility:
            click.echo(f"warning: {model.name}: {model.model.info.incompatibility}", err=True)
        click.echo(f"use it as: {model.name}")


def removal_list(targets: list[OllamaModel]) -> None:
    click.echo("to remove:")
    for target in targets:
        click.echo(f"  {target.name}  ({target.served}, {human_bytes(target.size_bytes)})")


def updated(names: list[str], changed: list[str], result: SyncResult) -> None:
    sync_result(result, as_json=False)
    for name in names:
        click.echo(f"{name}: {'updated' if name in changed else 'already up to date'}")


def doctor(checks: list[Check], as_json: bool) -> None:
    if as_json:
        _json([{"name": c.name, "status": c.status, "detail": c.detail, "fix": c.fix}
               for c in checks])
        return
    marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
    for check in checks:
        click.echo(f"[{marks[check.status]}] {check.name}: {check.detail}")
        if check.fix and check.status != "ok":
            click.echo(f"       fix: {check.fix}")


def show(served: ServedModel, as_json: bool, check: RestoreCheck | None = None) -> None:
    """`check`: what the first reply after a restore of this model showed, if one came."""
    data = _served_json(served)
    if check is not None:
        data["keeps_conversations"] = served.keeps_conversations and not check.gave_up
        data["conversations"] = (f"{served.conversations_reason}; {check.describe()}"
                                 if not check.gave_up else
                                 f"not saved any more: a restored cache was {check.describe()}")
    if as_json:
        _json(data)
        return
    for key, value in data.items():
        if key == "options":
            click.echo("options:")
            for option, option_value in value.items():
                click.echo(f"  --{option} {option_value}")
            continue
        if key in ("size_bytes", "estimated_bytes"):
            value = f"{human_bytes(value)} ({value} bytes)"
        elif isinstance(value, list):
            value = ", ".join(value)
        elif isinstance(value, bool):
            value = "yes" if value else "no"
        click.echo(f"{key}: {value if value not in (None, [], '') else '-'}")


def added(path: Path, name: str | None, result: SyncResult) -> None:
    click.echo(f"added {path}")
    if name:
        click.echo(f"served as {name}")
    sync_result(result, as_json=False)


def name_table(rows: list[tuple[str, str]], as_json: bool) -> None:
    if as_json:
        _json([{"source": source, "name": name} for source, name in rows])
        return
    if not rows:
        click.echo("no models found")
        return
    _echo_table([(source, "->", name) for source, name in rows])


def _cell(value: float | None, fmt) -> str:
    return "-" if value is None else fmt(value)


def stats(report: StatsReport, as_json: bool) -> None:
    if as_json:
        _json(report.to_json())
        return
    rows = [("MODEL", "CTX", "SLOTS", "STATE", "MEMORY", "IDLE", "TTL LEFT", "TOKENS IN/OUT")]
    for m in report.models:
        state = m.state + (f" ({m.in_flight} busy)" if m.in_flight else "")
        rows.append((m.name, _cell(m.ctx_size, str), _cell(m.slots, str), state,
                     _cell(m.rss_bytes, human_bytes), _cell(m.idle_seconds, human_duration),
                     _cell(m.ttl_left, human_duration) if m.ttl else "never",
                     f"{m.prompt_tokens}/{m.predicted_tokens}"))
    _echo_table(rows)
    for m in report.models:
        if m.load_failure:
            click.echo(f"{m.name}: {m.load_failure}")
        elif m.last_exit:
            click.echo(f"{m.name}: its server last ended when not asked to: {m.last_exit}")
        if m.workers:
            click.echo(f"{m.name}: served over RPC, its layers on {', '.join(m.workers)} "
                       "(MEMORY is this machine's share)")
        if m.saved_conversations:
            click.echo(f"{m.name}: {m.saved_conversations} saved conversation(s), "
                       f"{human_bytes(m.saved_bytes)} on disk, restored {m.restores} time(s)")
    loaded = sum(1 for m in report.models if m.rss_bytes)
    click.echo(f"TOTAL: {loaded} model process(es), {human_bytes(report.total_rss)} resident")
    click.echo(f"System Memory: {report.memory.describe()}")


def unloaded(names: list[str], not_loaded: list[str] | None = None) -> None:
    if names:
        click.echo("unloaded: " + ", ".join(names))
    for name in not_loaded or []:
        click.echo(f"{name} was not loaded")
    if not names and not not_loaded:
        click.echo("no model was loaded")


def forgotten(result: ForgetResult, as_json: bool) -> None:
    if as_json:
        _json({"models": result.models, "saved_removed": result.saved,
               "saved_bytes_removed": result.saved_bytes, "slots_erased": result.erased})
        return
    whose = ", ".join(result.models) or "every model"
    if result.saved:
        click.echo(f"{whose}: {result.saved} saved conversation(s) deleted "
                   f"({human_bytes(result.saved_bytes)})")
    else:
        click.echo(f"{whose}: no saved conversations")
    for name, erased in result.erased.items():
        click.echo(f"{name}: {erased} conversation(s) in memory erased")


def workers(found: list[WorkerStatus], as_json: bool) -> None:
    if as_json:
        _json([status.to_json() for status in found])
        return
    if not found:
        click.echo("no RPC worker on this machine (start one with 'model worker start')")
        return
    for status in found:
        data = status.to_json()
        state = "listening" if status.listening else \
            "starting its server again" if status.running else "stopped"
        click.echo(f"worker {data['address']}: {state}, pid {data['pid'] or '-'}, up "
                   f"{human_duration(data['uptime_seconds'])}, {data['restarts']} restart(s)"
                   + (f", last: {data['last_exit']}" if data["last_exit"] else ""))
        for device in data["devices"]:
            click.echo(f"  {device['name']}: {device['description']} "
                       f"({human_bytes(device['free_bytes'])} free of "
                       f"{human_bytes(device['total_bytes'])})")
        if data["cache"] and data["cache"] != "n/a":
            click.echo(f"  cache: {data['cache']}")
        if not status.running:  # its supervisor was killed: the record is all that is left
            click.echo(f"  its supervisor is gone; 'model worker start --port {data['port']}' "
                       f"starts it again, 'model worker stop --port {data['port']}' forgets it")
        click.echo(f"  log: {data['log_file']}")


def workers_stopped(stopped: list[WorkerStatus]) -> None:
    if not stopped:
        click.echo("no RPC worker was running")
    for status in stopped:
        click.echo(f"stopped the worker on {status.record.address}")
