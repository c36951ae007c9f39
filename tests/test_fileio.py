"""Generated files survive a crash: each write syncs the file's data before its rename and the
folder after it (where the rename is recorded). The syncs are seen by wrapping os.fsync, which
still syncs; each call is recorded by the inode it synced."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from model_serve.errors import ModelServeError
from model_serve.fileio import replace_symlink, write_bytes_atomically, write_if_changed
from tests.conftest import Env


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """(inode, is a folder) of every fsync, in order."""
    calls: list[tuple[int, bool]] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        calls.append((info.st_ino, stat.S_ISDIR(info.st_mode)))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


WRITES: dict[str, Callable[[Path], None]] = {
    "write_if_changed": lambda path: write_if_changed(path, "new content\n"),
    "write_if_changed with a mode": lambda path: write_if_changed(path, "key\n", mode=0o600),
    "write_bytes_atomically": lambda path: write_bytes_atomically(path, b"GGUF..."),
}


@pytest.mark.parametrize("write", WRITES)
def test_a_write_syncs_the_file_then_its_folder(write: str, tmp_path: Path,
                                                synced: list[tuple[int, bool]]) -> None:
    path = tmp_path / "state" / "file"
    path.parent.mkdir()
    path.write_text("old content\n")
    WRITES[write](path)
    folder = path.parent.stat().st_ino
    assert (path.stat().st_ino, False) in synced, "the new file's data was not synced"
    assert synced[-1] == (folder, True), "the folder was not synced after the rename"
    assert path.read_bytes() != b"old content\n"


def test_a_replaced_link_syncs_its_folder(tmp_path: Path,
                                          synced: list[tuple[int, bool]]) -> None:
    link = tmp_path / "models" / "a.gguf"
    link.parent.mkdir()
    link.symlink_to(tmp_path / "old.gguf")
    replace_symlink(link, tmp_path / "new.gguf")
    assert os.readlink(link) == str(tmp_path / "new.gguf")
    assert synced == [(link.parent.stat().st_ino, True)]


def test_an_unchanged_file_is_not_written_or_synced(tmp_path: Path,
                                                    synced: list[tuple[int, bool]]) -> None:
    path = tmp_path / "file"
    write_if_changed(path, "same\n")
    synced.clear()
    assert write_if_changed(path, "same\n") is False
    assert synced == []


def test_a_filesystem_without_locks_does_not_stall_syncs_or_prunes(
        env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Some NFS, SMB and FUSE mounts refuse flock (ENOLCK, ENOTSUP): a sync, a prune and a
    start go on without the lock at once, instead of waiting out their timeouts for a lock
    nobody holds (a sync failed after 15 minutes, every prune was skipped, a start said
    'another supervisor holds it'). A lock another process holds still makes them wait."""
    import errno
    import fcntl

    from model_serve.config.settings import load_settings
    from model_serve.engines import slot_cache
    from model_serve.runtime.stack import supervisor_lock
    from model_serve.runtime.sync import sync_lock

    real_flock = fcntl.flock

    def no_locks(handle: object, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    settings = load_settings(dict(env))
    started = time.monotonic()
    with sync_lock(settings, wait=3):
        pass
    with slot_cache._pruning(tmp_path, wait=3) as locked, supervisor_lock(settings):
        assert locked
    assert time.monotonic() - started < 2

    monkeypatch.setattr(fcntl, "flock", real_flock)
    with open(settings.state_dir / "sync.lock", "a") as other:
        real_flock(other, fcntl.LOCK_EX)  # another open file description: held
        with pytest.raises(ModelServeError, match="another sync"), \
                sync_lock(settings, wait=0.3):
            pass


@pytest.mark.parametrize("refused", [False, True], ids=["apfs", "a mount without it"])
def test_on_macos_the_data_is_written_through_the_drive_cache(
        refused: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        synced: list[tuple[int, bool]]) -> None:
    """Where fcntl has F_FULLFSYNC (macOS: its fsync stops at the drive's cache), a file's data
    is synced with it; where the filesystem refuses it, with fsync. Here Linux's fcntl gets
    macOS's constant (51), and the kernel's fsync stands in for what the Mac's drive does."""
    import fcntl

    full: list[int] = []
    real = fcntl.fcntl

    def mac_fcntl(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd != 51:
            return real(fd, cmd, arg)
        if refused:
            raise OSError(45, "Operation not supported")
        full.append(os.fstat(fd).st_ino)
        os.fdatasync(fd)
        return 0

    monkeypatch.setattr(fcntl, "F_FULLFSYNC", 51, raising=False)
    monkeypatch.setattr(fcntl, "fcntl", mac_fcntl)
    path = tmp_path / "engine.yaml"
    write_if_changed(path, "models: {}\n")
    inode = path.stat().st_ino
    if refused:
        assert full == [] and (inode, False) in synced
    else:
        assert full == [inode] and (inode, False) not in synced
    assert (tmp_path.stat().st_ino, True) in synced  # the folder: fsync, as before


def test_on_macos_the_activity_record_does_not_flush_the_drive(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        synced: list[tuple[int, bool]]) -> None:
    """F_FULLFSYNC empties the whole drive's cache (every program's writes): the unloader's
    activity.json, rewritten at each poll (5 s, 1 s with FRONT=off) while models work and made
    anew from memory, is synced with fsync alone; an engine config still goes through the
    drive's cache. Linux's fcntl gets macOS's constant (51) here."""
    import fcntl

    from model_serve.runtime.activity import ActivityTracker, ModelActivity

    full: list[int] = []
    real = fcntl.fcntl

    def mac_fcntl(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd != 51:
            return real(fd, cmd, arg)
        full.append(os.fstat(fd).st_ino)
        os.fdatasync(fd)
        return 0

    monkeypatch.setattr(fcntl, "F_FULLFSYNC", 51, raising=False)
    monkeypatch.setattr(fcntl, "fcntl", mac_fcntl)
    tracker = ActivityTracker(engine=None)  # type: ignore[arg-type]  # save() asks no engine
    tracker.models = {"a": ModelActivity("a", "loaded", 5801, time.time(), time.time())}
    path = tmp_path / "activity.json"
    tracker.save(path)
    assert full == [] and (path.stat().st_ino, False) in synced
    config = tmp_path / "engine.yaml"
    write_if_changed(config, "models: {}\n")
    assert full == [config.stat().st_ino]
