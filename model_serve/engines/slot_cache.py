"""A model's conversations on disk: the KV cache of each llama-server slot, saved before the
model leaves memory and restored when it comes back, so the next turn of a long conversation
does not compute its whole prompt again.

llama-server does the saving and restoring itself (`POST /slots/<id>?action=save|restore`,
into the folder its `--slot-save-path` names); this module decides what to keep and where:

- one folder per model and *cache key*: the model file (path, size, modification time, inode
  and change time: a file replaced in place, even with `cp -p`, is another file) and the
  settings that shape its cache (context, slots, options). A cache saved under another key
  could not be used, so folders of other keys are removed (those of an earlier version's
  keys too);
- each saved slot is a `.bin` written by llama-server under a temporary name and renamed when
  complete, and a `.json` beside it with its size and *hashes* of the text it holds (prompt and
  reply), never the text: enough to find the saved slot a new prompt continues (see
  BLOCK_CHARS). A slot file without its description, or one llama-server refuses, is never
  used;
- what users say to their models is theirs: every folder is 0700 and every file 0600,
  whatever the umask (llama-server's `.bin` too); `secure_saved` makes files left by earlier
  versions so at each start, and rewrites their descriptions that held the text;
- a disk budget (KV_CACHE_MAX_GB) over all models, counting every file of ours (unfinished
  saves and orphans too): the least recently used files go first, leftovers of a killed save
  once they are STALE_SECONDS old, and one prune at a time across processes (a lock file). A
  save is skipped when the disk has no room for it plus FREE_MARGIN;
- only what model_serve made is ever deleted: each model folder holds MARKER; one an earlier
  version made (our `<model>/<key>/` layout with our descriptions) is recognised and marked;
- the first reply after a restore tells (its `timings.cache_n`) whether the model really
  reused the restored cache. A reply that could not use it (`cache_prompt: false`, another
  `id_slot`) tells nothing; one that did not is a miss (a concurrent request may have taken
  the slot). After MISSES_TO_STOP misses in a row the folder records that, nothing more is
  saved for that model and key, and `model show` says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_serve.fileio import try_lock, write_if_changed
from model_serve.loopback import LoopbackError, call

if TYPE_CHECKING:
    from model_serve.models.plan import ServedModel

log = logging.getLogger("model_serve.slot_cache")

MIN_SHARED_CHARS = 64  # a restore is worth it only when the prompts share at least this much
# A description keeps no text: a hash of the text up to the end of each block of this many
# characters (each hash covers the whole beginning, salted per slot) and one of the whole text.
# The beginning a new prompt shares with a saved slot is then known to a block, or exactly when
# the prompt continues the whole saved text (the next turn of a chat). As large as
# MIN_SHARED_CHARS, so that minimum is one whole block; smaller blocks would make descriptions
# larger (a 32k-token conversation: about 2,000 hashes of 64 characters) and each hash would
# add fewer unknown characters to guess.
BLOCK_CHARS = 64
HASH_HEX = 16  # 64 bits of each hash: a false match between two prompts is out of reach
PRIVATE_FOLDER, PRIVATE_FILE = 0o700, 0o600
_KEY_NAME = re.compile(r"[0-9a-f]{16}")  # cache_key()'s folders: the only ones we touch
# Our files in a key folder: slots, descriptions, llama-server's unfinished saves, and
# write_if_changed's temporary files.
_OUR_SUFFIXES = (".bin", ".json", ".partial", ".tmp")
_SLOT_FILE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*\.bin")  # a name in the folder, no path
# Makes llama-server's GET /slots show each slot's last prompt and reply (else only counts):
# the text a saved slot is chosen by. It costs one copy of each reply.
SERVER_ENV = {"LLAMA_SERVER_SLOTS_DEBUG": "1"}
CHECK_FILE = "restore-check.json"
# In each model folder model_serve made: cleanups delete nothing under a folder without it.
MARKER = ".model_serve-conversations"
PRUNE_LOCK = ".prune.lock"  # at KV_CACHE_DIR's top: one prune at a time, across processes
PRUNE_LOCK_WAIT = 30.0  # seconds; a prune that cannot have the lock is skipped (said)
# An unfinished save (.partial) or an orphan (a slot without description, or the reverse)
# untouched this long is a killed save's leftover; a younger one may be a save under way.
STALE_SECONDS = 600
SAVE_TIMEOUT = 120.0  # seconds one slot's save may take
FREE_MARGIN = 512 * 2**20  # what a save leaves free on the disk, beyond the slot's own size
MIN_CHECKED_TOKENS = 32  # a restore sharing fewer tokens with its request tells too little
# Restores in a row whose reply took too little from the cache before saving stops: one alone
# can be a concurrent request that took slot 0 first.
MISSES_TO_STOP = 3


@dataclass
class SavedSlot:
    """A saved slot's description: what it holds is known by hashes only (see BLOCK_CHARS)."""

    file: str  # the .bin's name inside the model's folder
    salt: str  # random, per slot: equal texts in two files give unrelated hashes
    blocks: list[str]  # hash of the text up to the end of each whole block
    end: str  # hash of the whole text (its last prompt and reply)
    length: int  # of the text, in characters
    tokens: int
    bytes: int
    saved_at: float
    last_used: float
    hits: int = 0

    def __post_init__(self) -> None:  # a damaged description is skipped, never used
        # `file` is joined to the folder, and the prune deletes it: a name of this folder
        # only, as save_slots writes it (a crafted '../..' or '/...' would reach outside).
        if not isinstance(self.file, str) or not _SLOT_FILE.fullmatch(self.file):
            raise TypeError(f"not a slot file name: {self.file!r}")
        for number in (self.length, self.tokens, self.bytes, self.saved_at, self.last_used,
                       self.hits):  # compared and summed by the prune: numbers only
            if isinstance(number, bool) or not isinstance(number, int | float):
                raise TypeError(f"not a number: {number!r}")
        bytes.fromhex(self.salt)
        if not isinstance(self.blocks, list) or not all(isinstance(b, str) for b in self.blocks):
            raise TypeError("blocks must be a list of hashes")

    @classmethod
    def of_text(cls, file: str, text: str, tokens: int, size: int) -> SavedSlot:
        now = time.time()
        return cls(file, **_hashed(text), tokens=tokens, bytes=size, saved_at=now,
                   last_used=now)

    @classmethod
    def from_json(cls, data: Any) -> SavedSlot:
        """A description as read; one written before the text was hashed (it held the text)
        gets its hashes here, and loses the text when it is written again."""
        if isinstance(data, dict) and "text" in data:
            data = {**data, **_hashed(str(data["text"]))}
            del data["text"]
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        return cls(**data)

    def shared_with(self, prompt: str) -> int:
        """How many characters the beginning of `prompt` shares with the saved text: all of
        it when `prompt` continues the whole text, else a whole number of blocks."""
        if len(prompt) >= self.length and _hashes(self.salt, prompt[:self.length])[1] == self.end:
            return self.length
        running, shared = hashlib.sha256(bytes.fromhex(self.salt)), 0
        for expected in self.blocks:
            block = prompt[shared:shared + BLOCK_CHARS]
            if len(block) < BLOCK_CHARS:
                break
            running.update(block.encode())
            if running.hexdigest()[:HASH_HEX] != expected:
                break
            shared += BLOCK_CHARS
        return shared


def _hashed(text: str) -> dict[str, Any]:
    """The fields that stand for `text` in a description."""
    salt = os.urandom(16).hex()
    blocks, end = _hashes(salt, text)
    return {"salt": salt, "blocks": blocks, "end": end, "length": len(text)}


def _hashes(salt: str, text: str) -> tuple[list[str], str]:
    """The salted hash of `text` up to the end of each whole block, and of all of it."""
    running = hashlib.sha256(bytes.fromhex(salt))
    whole = len(text) - len(text) % BLOCK_CHARS
    blocks = []
    for start in range(0, whole, BLOCK_CHARS):
        running.update(text[start:start + BLOCK_CHARS].encode())
        blocks.append(running.hexdigest()[:HASH_HEX])
    running.update(text[whole:].encode())
    return blocks, running.hexdigest()[:HASH_HEX]


@dataclass
class Restored:
    """A saved conversation put back into a freshly loaded model."""

    folder: Path
    tokens: int  # restored
    expected: int  # of them, the ones the request shares (its prompt's beginning)
    # False when the request could not use the restored slot whatever the model does
    # (reply_can_tell): its reply says nothing about the model.
    checkable: bool = True


@dataclass
class RestoreCheck:
    """What the first reply after a restore showed: did the model reuse the cache?"""

    reused: bool
    expected: int
    cache_n: int  # tokens that reply took from the cache (llama-server's timings.cache_n)
    checked_at: float
    # Checks in a row, this one included, that showed no reuse. A record of an earlier
    # version (one miss stopped saving) counts as one: it may have been a concurrent request.
    misses: int = -1

    def __post_init__(self) -> None:
        if self.misses < 0:
            self.misses = 0 if self.reused else 1

    @property
    def gave_up(self) -> bool:
        return self.misses >= MISSES_TO_STOP

    def describe(self) -> str:
        verdict = "reused" if self.reused else "NOT reused"
        text = (f"{verdict}: the first reply after a restore took {self.cache_n} of "
                f"{self.expected} shared tokens from the cache "
                f"({time.strftime('%Y-%m-%d %H:%M', time.localtime(self.checked_at))})")
        if self.gave_up:
            return f"{text}; {self.misses} restores in a row were not reused: no longer saved"
        if self.misses:
            return f"{text}; saving stops after {MISSES_TO_STOP} such restores in a row"
        return text


def cache_key(model_path: Path, settings_shaping_cache: dict[str, Any]) -> str:
    """Changes when the model file or anything that shapes its KV cache changes."""
    try:
        stat = model_path.stat()
        # Size and mtime alone survive `cp -p` over the file; its change time does not, and
        # the inode differs for a file renamed into place.
        identity = [str(model_path.resolve()), stat.st_size, int(stat.st_mtime), stat.st_ino,
                    stat.st_ctime_ns]
    except OSError:
        identity = [str(model_path)]
    blob = json.dumps([identity, settings_shaping_cache], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def folder_for(root: Path, engine_id: str, served: ServedModel) -> Path:
    """`root/<model>/<key>`: the folder llama-server saves this model's slots into. A new key
    (another file, context, slots or option) is a new, empty folder."""
    key = cache_key(served.path, {"ctx": served.ctx_size, "parallel": served.parallel,
                                  "options": served.options})
    return root / model_folder_name(engine_id) / key


def model_folder_name(engine_id: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in engine_id)


def make_folder(folder: Path) -> Path:
    """Create `root/<model>/<key>` (llama-server saves only into a folder that exists), the
    root and each level under it 0700 whatever the umask: they hold conversations."""
    root = folder.parent.parent
    attempts = 3
    while True:
        try:
            root.parent.mkdir(parents=True, exist_ok=True)
            made_model = not folder.parent.exists()
            for level in (root, folder.parent, folder):
                level.mkdir(mode=PRIVATE_FOLDER, exist_ok=True)
                os.chmod(level, PRIVATE_FOLDER)  # one an earlier version made 0755
            if made_model or _only_key_folders(folder.parent):
                _mark(folder.parent)
            else:
                _adopted(folder.parent)
            return folder
        except FileNotFoundError:
            # Another command's sync ended on a config without this key and removed the
            # empty folder in between: make it again.
            attempts -= 1
            if not attempts:
                raise


def reply_can_tell(body: dict[str, Any]) -> bool:
    """Whether the reply to `body` can show that a restore into slot 0 was reused: not when
    the request asks for no cache, or for another slot than the one restored into."""
    if body.get("cache_prompt") is False:
        return False
    slot = body.get("id_slot", body.get("slot_id"))
    return slot is None or slot in (0, -1)


def record_check(folder: Path, restored: Restored, cache_n: int) -> RestoreCheck | None:
    """Judge a restore by the first reply after it. A model that did not reuse the cache
    MISSES_TO_STOP times in a row gets no more saves under this key, and its saved files go
    (they cannot help)."""
    if restored.expected < MIN_CHECKED_TOKENS or not restored.checkable:
        return None
    reused = cache_n >= restored.expected // 2
    before = check_of(folder)
    misses = 0 if reused else (before.misses if before else 0) + 1
    check = RestoreCheck(reused, restored.expected, cache_n, time.time(), misses)
    write_if_changed(folder / CHECK_FILE, json.dumps(asdict(check)), mode=PRIVATE_FILE)
    if check.gave_up:
        log.warning("%s: a restored conversation was %s; its conversations are no longer "
                    "saved", folder.parent.name, check.describe())
        for slot in saved_slots(folder):
            remove(folder, slot)
    elif not reused:
        log.info("%s: a restored conversation was %s", folder.parent.name, check.describe())
    return check


def check_of(folder: Path) -> RestoreCheck | None:
    try:
        return RestoreCheck(**json.loads((folder / CHECK_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def saving_helps(folder: Path) -> bool:
    check = check_of(folder)
    return check is None or not check.gave_up


def remove_other_keys(root: Path, keep: set[Path]) -> None:
    """Remove the folders of saved caches whose key the config in effect no longer names
    (another file or other settings: they could never be used)."""
    with _pruning(root) as locked:
        if not locked:
            return
        for model, folder in _our_folders(root):
            if folder not in keep:
                _remove_files(folder, keep_check=False)
                _remove_if_empty(folder)
                _remove_model_if_empty(model)
                log.info("removed saved caches of %s made with other settings or another "
                         "file", model.name)


def remove_saved(root: Path, models: set[str] | None = None) -> tuple[int, int]:
    """Delete the saved conversations of the models whose folders (model_folder_name) are
    in `models`, or of all: every key's slots, descriptions and unfinished saves. What a
    restore showed (CHECK_FILE) stays: it tells about the model, not a conversation.
    Returns (conversations, bytes) removed."""
    count = size = 0
    with _pruning(root, wait=PRUNE_LOCK_WAIT * 4):  # asked by the user: done, lock or not
        for model, folder in _our_folders(root):
            if models is None or model.name in models:
                removed = _remove_files(folder, keep_check=True)
                count += sum(1 for name, _size in removed if name.endswith(".bin"))
                size += sum(each for _name, each in removed)
                _remove_if_empty(folder)  # made again before a load or a save needs it
                _remove_model_if_empty(model)
    return count, size


def secure_saved(root: Path) -> int:
    """At start: what earlier versions saved readable by others becomes the user's alone
    (folders 0700, files 0600), and descriptions that held the text get its hashes instead.
    Only our own folders (`<model>/<key>`) and files are touched; no link is followed, so
    nothing outside `root` is either. Returns how many descriptions were rewritten."""
    if not root.is_dir():
        return 0
    rewritten = 0
    _chmod(root, PRIVATE_FOLDER)
    for model, folder in _our_folders(root):
        _chmod(model, PRIVATE_FOLDER)
        _chmod(folder, PRIVATE_FOLDER)
        for path in _our_files(folder):
            _chmod(path, PRIVATE_FILE)
            if path.suffix == ".json" and path.name != CHECK_FILE:
                rewritten += _rewrite_old_description(path)
    if rewritten:
        log.info("saved conversations: %d description(s) that held the text now hold its "
                 "hashes", rewritten)
    return rewritten


def _rewrite_old_description(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or "text" not in data:
            return False
        slot = SavedSlot.from_json(data)
    except (OSError, ValueError, TypeError) as exc:
        log.warning("skipped %s: %s", path, exc)
        return False
    write_if_changed(path, json.dumps(asdict(slot)), mode=PRIVATE_FILE)
    return True


def _chmod(path: Path, mode: int) -> None:
    try:
        os.chmod(path, mode)
    except OSError as exc:  # not ours (another owner): said, and the rest still done
        log.warning("could not make %s private: %s", path, exc)


def _subfolders(folder: Path) -> list[Path]:
    try:
        with os.scandir(folder) as entries:
            return [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _our_folders(root: Path) -> Iterator[tuple[Path, Path]]:
    """(model folder, key folder) of every cache folder under `root` in a model folder of
    ours (MARKER), links not followed: KV_CACHE_DIR may hold other things, never touched."""
    for model in _subfolders(root):
        if not _adopted(model):
            continue
        for folder in _subfolders(model):
            if _KEY_NAME.fullmatch(folder.name):
                yield model, folder


def _mark(model: Path) -> None:
    if not (model / MARKER).is_file():
        write_if_changed(model / MARKER, "Saved conversations of one model, made by "
                         "model_serve (KV_CACHE_DIR). Its cleanups touch only folders with "
                         "this file.\n", mode=PRIVATE_FILE)


def _adopted(model: Path) -> bool:
    """Whether `model` is a model folder of ours: marked, or made by a version before the
    marker (key folders holding our descriptions), which is marked now, once."""
    if (model / MARKER).is_file():
        return True
    for folder in _subfolders(model):
        if _KEY_NAME.fullmatch(folder.name) and _holds_our_description(folder):
            log.info("saved conversations: %s was made by an earlier version; marked as "
                     "model_serve's", model)
            _mark(model)
            return True
    return False


def _holds_our_description(folder: Path) -> bool:
    for path in _our_files(folder):
        if path.suffix != ".json":
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if path.name == CHECK_FILE:
                RestoreCheck(**data)
            else:
                SavedSlot.from_json(data)
            return True
        except (OSError, ValueError, TypeError):
            continue
    return False


def _only_key_folders(model: Path) -> bool:
    """Nothing but key folders (empty or of our files): the layout only model_serve makes."""
    try:
        with os.scandir(model) as entries:
            for entry in entries:
                if entry.name == MARKER:
                    continue
                if not (entry.is_dir(follow_symlinks=False)
                        and _KEY_NAME.fullmatch(entry.name)):
                    return False
                with os.scandir(entry.path) as inside:
                    if any(not (e.is_file(follow_symlinks=False)
                                and e.name.endswith(_OUR_SUFFIXES)) for e in inside):
                        return False
    except OSError:
        return False
    return True


def _remove_model_if_empty(model: Path) -> None:
    """A model folder left with its marker alone goes, marker included."""
    try:
        with os.scandir(model) as entries:
            if any(e.name != MARKER for e in entries):
                return
        (model / MARKER).unlink(missing_ok=True)
    except OSError:
        return
    _remove_if_empty(model)


@contextlib.contextmanager
def _pruning(root: Path, wait: float | None = None) -> Iterator[bool]:
    """Held while files are deleted: two prunes at once (the unloader's, the front's, a
    sync's) would count the same files twice and remove more than the budget asks. Yields
    False when another process held it for `wait` seconds."""
    import fcntl

    try:
        handle = open(root / PRUNE_LOCK, "a")  # noqa: SIM115 - held across the yield
    except OSError:  # no root yet (nothing to prune), or not writable: prune unlocked
        yield True
        return
    with handle:
        with contextlib.suppress(OSError):
            os.fchmod(handle.fileno(), PRIVATE_FILE)
        wait = PRUNE_LOCK_WAIT if wait is None else wait
        deadline = time.monotonic() + wait
        while not try_lock(handle):
            if time.monotonic() >= deadline:
                log.warning("saved conversations: another process has been pruning %s "
                            "for %.0fs; this prune is skipped", root, wait)
                yield False
                return
            time.sleep(0.05)
        try:
            yield True
        finally:
            with contextlib.suppress(OSError):  # a filesystem without locks
                fcntl.flock(handle, fcntl.LOCK_UN)


def _our_files(folder: Path) -> list[Path]:
    try:
        with os.scandir(folder) as entries:
            return [Path(e.path) for e in entries
                    if e.is_file(follow_symlinks=False) and e.name.endswith(_OUR_SUFFIXES)]
    except OSError:
        return []


def _remove_files(folder: Path, keep_check: bool) -> list[tuple[str, int]]:
    removed = []
    for path in _our_files(folder):
        if keep_check and path.name == CHECK_FILE:
            continue
        try:
            size = path.lstat().st_size
            path.unlink()
        except OSError:
            continue
        removed.append((path.name, size))
    return removed


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty: something else is kept there
        folder.rmdir()


def saved_slots(folder: Path) -> list[SavedSlot]:
    slots = []
    for description in folder.glob("*.json"):
        if description.name == CHECK_FILE:
            continue
        try:
            slot = SavedSlot.from_json(json.loads(description.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("skipped %s: %s", description, exc)
            continue
        if (folder / slot.file).is_file():
            slots.append(slot)
    return slots


def _describe(folder: Path, slot: SavedSlot) -> None:
    write_if_changed(folder / f"{Path(slot.file).stem}.json", json.dumps(asdict(slot)),
                     mode=PRIVATE_FILE)


def save_slots(base_url: str, headers: dict[str, str], folder: Path,
               deadline: float | None = None) -> list[SavedSlot]:
    """Save every slot of the model server at `base_url` that holds tokens; with a
    `deadline` (time.monotonic()), those it leaves time for."""
    if not saving_helps(folder):
        return []
    slots = _slots(base_url, headers)
    if slots is None:
        return []
    if not folder.is_dir():  # `model forget` removed it while the model was loaded
        make_folder(folder)
    bos = _bos_text(base_url, headers)
    known = saved_slots(folder)
    saved = []
    for slot in slots:
        if not slot.get("n_prompt_tokens") or slot.get("is_processing"):
            continue
        # The slot's prompt is shown with its special tokens; requests come without the BOS.
        text = str(slot.get("prompt") or "")
        text = text[len(bos):] if bos and text.startswith(bos) else text
        text += str(slot.get("generated") or "")
        left = SAVE_TIMEOUT if deadline is None else deadline - time.monotonic()
        if left <= 0:
            log.warning("slot %s of %s not saved: no time left", slot.get("id"), base_url)
            continue
        fits, why = room_for(folder, known, int(slot.get("n_prompt_tokens") or 0))
        if not fits:
            log.warning("slot %s of %s not saved: %s", slot.get("id"), base_url, why)
            continue
        if not text:
            log.warning("slot %s of %s shows no text (started without %s): not saved",
                        slot.get("id"), base_url, ", ".join(SERVER_ENV))
            continue
        # The same conversation saved again (restored, not continued) replaces its file. A
        # new one gets a random name: a hash of its text would be a fingerprint of it.
        same = next((s for s in known if s.length == len(text)
                     and s.shared_with(text) == s.length), None)
        final = same.file if same else f"{uuid.uuid4().hex[:16]}.bin"
        partial = f"{Path(final).stem}.{uuid.uuid4().hex[:8]}.partial"
        answer = call("POST", f"{base_url}/slots/{slot['id']}?action=save", headers,
                      timeout=min(left, SAVE_TIMEOUT), json_body={"filename": partial})
        if answer.status_code != 200:
            log.warning("saving slot %s of %s failed: HTTP %s %s", slot["id"], base_url,
                        answer.status_code, answer.text[:200])
            (folder / partial).unlink(missing_ok=True)
            continue
        # llama-server wrote it under its own umask; the slot holds the conversation's tokens.
        os.chmod(folder / partial, PRIVATE_FILE)
        os.replace(folder / partial, folder / final)  # complete, or not there at all
        result = answer.json()
        entry = SavedSlot.of_text(final, text, int(result.get("n_saved", 0)),
                                  int(result.get("n_written", (folder / final).stat().st_size)))
        entry.hits = same.hits if same else 0
        _describe(folder, entry)
        known.append(entry)
        saved.append(entry)
    return saved


def erase_slots(base_url: str, headers: dict[str, str]) -> int:
    """Empty every slot of the model server at `base_url` (`model forget`): an unload then
    has nothing to save. How many held a conversation; a server started without a slot
    folder (nothing of it is ever saved) refuses, and counts none."""
    erased = 0
    for slot in _slots(base_url, headers) or []:
        try:
            # Waits for a request the slot is serving, then empties it.
            answer = call("POST", f"{base_url}/slots/{slot.get('id')}?action=erase", headers,
                          timeout=300)
            if answer.status_code == 200:
                erased += int(bool(answer.json().get("n_erased")))
        except (LoopbackError, ValueError, AttributeError) as exc:
            log.warning("erasing slot %s of %s failed: %s", slot.get("id"), base_url, exc)
    return erased


def _bos_text(base_url: str, headers: dict[str, str]) -> str:
    try:
        return str(call("GET", base_url + "/props", headers, timeout=10).json()
                   .get("bos_token") or "")
    except (LoopbackError, ValueError, AttributeError):
        return ""


def best_for(folder: Path, prompt: str) -> tuple[SavedSlot, int] | None:
    """The saved slot sharing the longest beginning with `prompt` (at least MIN_SHARED_CHARS),
    and how many characters it shares."""
    best, best_shared = None, MIN_SHARED_CHARS - 1
    for slot in saved_slots(folder):
        shared = slot.shared_with(prompt)
        if shared > best_shared:
            best, best_shared = slot, shared
    return (best, best_shared) if best is not None else None


def restore_best(base_url: str, headers: dict[str, str], folder: Path,
                 prompt: str) -> Restored | None:
    """Restore the saved conversation `prompt` continues into slot 0; llama-server gives a
    request the slot whose cache shares most with it, so the request gets this one. A model
    with several slots gets the most recently used other conversations in the others."""
    found = best_for(folder, prompt)
    if found is None:
        return None
    slot, shared = found
    tokens = restore(base_url, headers, folder, slot, 0)
    if not tokens:
        return None
    others = sorted((s for s in saved_slots(folder) if s.file != slot.file),
                    key=lambda s: s.last_used, reverse=True)
    for slot_id, other in zip(range(1, _slot_count(base_url, headers)), others, strict=False):
        restore(base_url, headers, folder, other, slot_id)
    return Restored(folder, tokens, tokens * shared // max(slot.length, 1))


def _slot_count(base_url: str, headers: dict[str, str]) -> int:
    slots = _slots(base_url, headers)
    return len(slots) if slots else 1


def _slots(base_url: str, headers: dict[str, str]) -> list[dict[str, Any]] | None:
    """The model server's slots (GET /slots); None when it cannot tell."""
    try:
        slots = call("GET", base_url + "/slots", headers, timeout=10).json()
    except (LoopbackError, ValueError) as exc:
        log.warning("cannot read the slots of %s: %s", base_url, exc)
        return None
    return slots if isinstance(slots, list) else None


def restore(base_url: str, headers: dict[str, str], folder: Path, slot: SavedSlot,
            slot_id: int = 0) -> int:
    """Load a saved slot into slot `slot_id`; the number of tokens restored (0: refused, and
    the file is removed: it would be refused again)."""
    try:
        answer = call("POST", f"{base_url}/slots/{slot_id}?action=restore", headers,
                      timeout=120, json_body={"filename": slot.file})
    except LoopbackError as exc:
        log.warning("restoring %s failed: %s", slot.file, exc)
        return 0
    if answer.status_code != 200:
        log.warning("llama-server refused the saved cache %s (HTTP %s: %s); removed", slot.file,
                    answer.status_code, answer.text[:200])
        remove(folder, slot)
        return 0
    slot.last_used, slot.hits = time.time(), slot.hits + 1
    _describe(folder, slot)
    return int(answer.json().get("n_restored", 0))


def rendered_prompt(base_url: str, headers: dict[str, str],
                    body: dict[str, Any]) -> str | None:
    """The text a request puts before the model: a completion's prompt, or a chat's messages
    through the model's own template (its /apply-template)."""
    if isinstance(body.get("prompt"), str):
        return body["prompt"]
    if not isinstance(body.get("messages"), list):
        return None
    try:
        answer = call("POST", base_url + "/apply-template", headers, timeout=30,
                      json_body={"messages": body["messages"]})
        return str(answer.json().get("prompt") or "") if answer.status_code == 200 else None
    except (LoopbackError, ValueError, AttributeError):
        return None


def remove(folder: Path, slot: SavedSlot) -> None:
    (folder / slot.file).unlink(missing_ok=True)
    (folder / f"{Path(slot.file).stem}.json").unlink(missing_ok=True)


def keep_within(root: Path, max_bytes: int) -> list[str]:
    """Bring what is saved under `root` within `max_bytes`: leftovers of killed saves go
    first, then the least recently used slots. Every file of ours counts, saves under way
    included. The names of the files removed."""
    with _pruning(root) as locked:
        if not locked:
            return []
        removed = remove_leftovers(root)
        everything = [(slot, folder) for _model, folder in _our_folders(root)
                      for slot in saved_slots(folder)]
        total = used_bytes(root)
        for slot, folder in sorted(everything, key=lambda pair: pair[0].last_used):
            if total <= max_bytes:
                break
            total -= _size(folder / slot.file) + _size(folder / f"{Path(slot.file).stem}.json")
            remove(folder, slot)
            removed.append(slot.file)
        if total > max_bytes:
            log.warning("saved conversations take %.1f MiB, above KV_CACHE_MAX_GB, with "
                        "nothing more to remove (saves under way)", total / 2**20)
        return removed


def used_bytes(root: Path) -> int:
    """Disk space every file of ours under `root` takes: slots, descriptions, unfinished
    saves and orphans."""
    return sum(_size(path) for _model, folder in _our_folders(root)
               for path in _our_files(folder))


def remove_leftovers(root: Path, now: float | None = None) -> list[str]:
    """Remove what killed saves left (unfinished saves, slots without their description,
    descriptions without their slot) once STALE_SECONDS old: younger ones may be a save
    under way. The names removed."""
    now = time.time() if now is None else now
    removed = []
    for _model, folder in _our_folders(root):
        files = {path.name: path for path in _our_files(folder)}
        for name, path in files.items():
            stem = Path(name).stem
            orphan = (name.endswith((".partial", ".tmp"))
                      or (name.endswith(".bin") and f"{stem}.json" not in files)
                      or (name.endswith(".json") and name != CHECK_FILE
                          and not _describes_a_slot(path, files)))
            try:
                if orphan and now - path.lstat().st_mtime >= STALE_SECONDS:
                    path.unlink()
                    removed.append(name)
            except OSError:
                continue
    if removed:
        log.info("saved conversations: removed %d leftover(s) of unfinished saves",
                 len(removed))
    return removed


def _describes_a_slot(description: Path, files: dict[str, Path]) -> bool:
    try:
        slot = SavedSlot.from_json(json.loads(description.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return False
    return slot.file in files


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except OSError:
        return 0


def room_for(folder: Path, slots: list[SavedSlot], tokens: int) -> tuple[bool, str]:
    """Whether the disk holding `folder` has room for a slot of `tokens` tokens (sized as the
    largest per token of the slots already saved there) and FREE_MARGIN; why not, if not."""
    per_token = max((s.bytes / s.tokens for s in slots if s.tokens > 0), default=0.0)
    expected = int(per_token * tokens)
    try:
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        return False, f"cannot read the free space of {folder}: {exc}"
    if free >= expected + FREE_MARGIN:
        return True, ""
    return False, (f"{free / 2**20:.0f} MiB free on the disk of {folder}; a save needs about "
                   f"{expected / 2**20:.0f} MiB and leaves {FREE_MARGIN / 2**20:.0f} MiB")
