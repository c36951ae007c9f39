"""The options a llama-server build takes, read from its --help: the engine check and both
engines' configs need them, so they live below all three."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any

from model_serve.errors import EngineError
from model_serve.fileio import write_if_changed

OPTION_RE = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")
# `--chat-template`'s help lists the built-in templates, up to its `(env: ...)` line.
TEMPLATES_RE = re.compile(r"list of built-in templates:\s*(.*?)\(env:", re.DOTALL)


def option_spellings(binary: Path, cache_dir: Path) -> dict[str, str]:
    """Option name (no dashes) -> how this llama-server build spells it ('-ngl', '--temp'),
    read from its --help and cached per binary. Presets take the names; command lines (the
    llama-swap engine) need the exact spellings."""
    return _help_facts(binary, cache_dir)["spellings"]


def builtin_templates(binary: Path, cache_dir: Path) -> list[str]:
    """The names `--chat-template` takes on this build (llama.cpp's built-in templates)."""
    return _help_facts(binary, cache_dir)["templates"]


def binary_stamp(binary: Path) -> str:
    """What a cache of a program's --help is valid for: this file, as big and as old."""
    stat = binary.stat()
    return f"{binary.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def _help_facts(binary: Path, cache_dir: Path) -> dict[str, Any]:
    import subprocess

    cache = cache_dir / "llama-server-options.json"
    stamp = binary_stamp(binary)
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
        if data.get("stamp") == stamp and isinstance(data.get("spellings"), dict) and \
                isinstance(data.get("templates"), list):
            return data
    except (OSError, ValueError, AttributeError):
        pass
    try:
        out = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EngineError(f"{binary} --help failed: {exc}",
                          "check that llama-server runs: try it by hand") from exc
    spellings: dict[str, str] = {}
    for flag in OPTION_RE.findall(out.stdout + out.stderr):
        name = flag.lstrip("-")
        if flag.startswith("--") or name not in spellings:
            spellings[name] = flag
    if len(spellings) < 50:
        raise EngineError(f"{binary} --help listed no options (exit {out.returncode}): "
                          f"{(out.stderr or out.stdout).strip()[:300]}",
                          "check that llama-server runs: try it by hand")
    listed = TEMPLATES_RE.search(out.stdout + out.stderr)
    templates = sorted({name for name in re.split(r"[\s,]+", listed.group(1)) if name}) \
        if listed else []
    facts = {"stamp": stamp, "spellings": spellings, "templates": templates}
    with contextlib.suppress(OSError):  # only a cache
        write_if_changed(cache, json.dumps(facts))
    return facts
