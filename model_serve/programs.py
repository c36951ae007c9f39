"""Finding the programs the stack runs (llama-server, llama-swap, ollama) as a shell would,
and where a Mac keeps them when the shell's PATH does not say."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# On a Mac, Homebrew's folders are on PATH only when the shell's profile runs `brew shellenv`
# (never under launchd or cron); Apple Silicon's first.
HOMEBREW_BINS = (Path("/opt/homebrew/bin"), Path("/usr/local/bin"))


def find_on_path(program: str, platform: str = sys.platform,
                 homebrew: tuple[Path, ...] = HOMEBREW_BINS, path: str | None = None
                 ) -> Path | None:
    """`program` on PATH (or `path`), else (macOS) in Homebrew's folders."""
    import shutil  # here: it loads the compression modules, which `model status` never needs

    found = shutil.which(program, path=path)
    if not found and platform == "darwin":
        found = shutil.which(program, path=os.pathsep.join(map(str, homebrew)))
    return Path(found) if found else None
