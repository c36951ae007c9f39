"""Atomic, change-only writes for every file the stack generates.

Durable too: the file's data is synced before the rename, and the folder after it (the rename
lives in the folder; without that sync a power cut can bring back the old file, or none).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("model_serve")
_unlockable: set[str] = set()


def write_if_changed(path: Path, content: str, mode: int | None = None,
                     through_drive_cache: bool = True) -> bool:
    """Write `content` to `path` atomically; return False (and leave the content) if unchanged.
    `mode`: exactly these permissions, whatever the umask (0o600 for what holds prompts or
    keys; an unchanged file gets them too); None: those of any new file (0o666 less the
    umask). `through_drive_cache` False: a status file rewritten every few seconds and made
    anew from memory (sync_file)."""
    try:
        if path.read_text(encoding="utf-8") == content:
            if mode is not None and (path.stat().st_mode & 0o777) != mode:
                os.chmod(path, mode)
            return False
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.urandom(4).hex()}.tmp"
    # Created private when a mode is asked for, so it is never wider while being written.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(content)
            handle.flush()
            if mode is not None:
                os.fchmod(handle.fileno(), mode)
            sync_file(handle.fileno(), through_drive_cache)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)
    return True


def write_bytes_atomically(path: Path, data: bytes) -> None:
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            sync_file(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def replace_symlink(link: Path, target: str | Path) -> None:
    """Make `link` point at `target` atomically: a reader sees the old link or the new one,
    never none (a link beside it, then a rename over it)."""
    tmp = link.parent / f".{link.name}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    sync_folder(link.parent)


def sync_file(fd: int, through_drive_cache: bool = True) -> None:
    """Put the file's data on the disk itself. macOS's fsync stops at the drive's own cache,
    which a power cut empties: there F_FULLFSYNC asks the drive to write it through (where a
    filesystem refuses it, some network mounts, fsync is what is left). It empties the whole
    drive's cache, every program's writes, so a file rewritten every few seconds and made anew
    from memory after a crash (the unloader's activity.json) asks for fsync alone: still never
    a file cut short behind the rename, on the drive's own schedule."""
    import fcntl

    full_sync = getattr(fcntl, "F_FULLFSYNC", None) if through_drive_cache else None
    if full_sync is not None:
        try:
            fcntl.fcntl(fd, full_sync)
            return
        except OSError:
            pass
    os.fsync(fd)


def sync_folder(folder: Path) -> None:
    """Make the names in `folder` (a rename, a new link) survive a crash. Where a system or
    file system cannot sync a folder, the write itself has still happened."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def try_lock(handle: IO[Any]) -> bool:
    """Take an exclusive flock on `handle` without waiting; False while another holds it. A
    filesystem without locks (some NFS, SMB and FUSE mounts) fails otherwise: that counts as
    taken (said once per file), or every caller would wait out its whole timeout for a lock
    nobody holds."""
    import fcntl

    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if handle.name not in _unlockable:
            _unlockable.add(handle.name)
            log.warning("%s cannot be locked on its filesystem (%s): going on without the "
                        "lock", handle.name, exc.strerror or exc)
    return True


@contextlib.contextmanager
def held_lock(path: Path, wait: float, poll: float = 0.05,
              mode: int | None = None) -> Iterator[bool]:
    """Hold an exclusive flock on the file `path` (created, with `mode` if given) for the
    block; yields False when another process held it for `wait` seconds (the caller decides
    whether to go on unlocked or give up). The kernel lets go when the holder dies."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        if mode is not None:
            with contextlib.suppress(OSError):
                os.fchmod(handle.fileno(), mode)
        deadline = time.monotonic() + wait
        while not try_lock(handle):
            if time.monotonic() >= deadline:
                yield False
                return
            time.sleep(poll)
        try:
            yield True
        finally:
            with contextlib.suppress(OSError):  # a filesystem without locks
                fcntl.flock(handle, fcntl.LOCK_UN)
