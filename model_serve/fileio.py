"""Atomic, change-only writes for every file the stack generates."""

from __future__ import annotations

import os
from pathlib import Path


def write_if_changed(path: Path, content: str, mode: int = 0o644) -> bool:
    """Write `content` to `path` atomically; return False (and touch nothing) if unchanged."""
    try:
        if path.read_text(encoding="utf-8") == content:
            return False
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    import tempfile  # here: it loads random and shutil, which most commands never need

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def write_bytes_atomically(path: Path, data: bytes) -> None:
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_symlink(link: Path, target: str | Path) -> None:
    """Make `link` point at `target` atomically: a reader sees the old link or the new one,
    never none (a link beside it, then a rename over it)."""
    tmp = link.parent / f".{link.name}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)
