"""A model's conversations on disk: the KV cache of each llama-server slot, saved before the
model leaves memory and restored when it comes back, so the next turn of a long conversation
does not compute its whole prompt again.

llama-server does the saving and restoring itself (`POST /slots/<id>?action=save|restore`,
into the folder its `--slot-save-path` names); this module decides what to keep and where:

- one folder per model and *cache key*: the model file (path, size, modification time) and
  the settings that shape its cache (context, slots, options). A cache saved under another key
  could not be used, so folders of other keys are removed;
- each saved slot is a `.bin` written by llama-server under a temporary name and renamed when
  complete, and a `.json` beside it with the text it holds (prompt and reply) and its size;
  a slot file without its description, or one llama-server refuses, is never used;
- a disk budget (KV_CACHE_MAX_GB) over all models: the least recently used files go first;
- the first reply after a restore tells (its `timings.cache_n`) whether the model really
  reused the restored cache. Where it did not, the folder records that, nothing more is saved
  for that model and key, and `model show` says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_serve.fileio import write_if_changed
from model_serve.loopback import LoopbackError, call

if TYPE_CHECKING:
    from model_serve.models.plan import ServedModel

log = logging.getLogger("model_serve.slot_cache")

MIN_SHARED_CHARS = 64  # a restore is worth it only when the prompts share at least this much
# Makes llama-server's GET /slots show each slot's last prompt and reply (else only counts):
# the text a saved slot is chosen by. It costs one copy of each reply.
SERVER_ENV = {"LLAMA_SERVER_SLOTS_DEBUG": "1"}
CHECK_FILE = "restore-check.json"
MIN_CHECKED_TOKENS = 32  # a restore sharing fewer tokens with its request tells too little


@dataclass
class SavedSlot:
    file: str  # the .bin's name inside the model's folder
    text: str  # what the slot held: its last prompt and reply
    tokens: int
    bytes: int
    saved_at: float
    last_used: float
    hits: int = 0


@dataclass
class Restored:
    """A saved conversation put back into a freshly loaded model."""

    folder: Path
    tokens: int  # restored
    expected: int  # of them, the ones the request shares (its prompt's beginning)


@dataclass
class RestoreCheck:
    """What the first reply after a restore showed: did the model reuse the cache?"""

    reused: bool
    expected: int
    cache_n: int  # tokens that reply took from the cache (llama-server's timings.cache_n)
    checked_at: float

    def describe(self) -> str:
        verdict = "reused" if self.reused else "NOT reused"
        return (f"{verdict}: the first reply after a restore took {self.cache_n} of "
                f"{self.expected} shared tokens from the cache "
                f"({time.strftime('%Y-%m-%d %H:%M', time.localtime(self.checked_at))})")


def cache_key(model_path: Path, settings_shaping_cache: dict[str, Any]) -> str:
    """Changes when the model file or anything that shapes its KV cache changes."""
    try:
        stat = model_path.stat()
        identity = [str(model_path.resolve()), stat.st_size, int(stat.st_mtime)]
    except OSError:
        identity = [str(model_path)]
    blob = json.dumps([identity, settings_shaping_cache], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def folder_for(root: Path, engine_id: str, served: ServedModel) -> Path:
    """`root/<model>/<key>`: the folder llama-server saves this model's slots into. A new key
    (another file, context, slots or option) is a new, empty folder."""
    key = cache_key(served.path, {"ctx": served.ctx_size, "parallel": served.parallel,
                                  "options": served.options})
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in engine_id)
    return root / safe / key


def record_check(folder: Path, restored: Restored, cache_n: int) -> RestoreCheck | None:
    """Judge a restore by the first reply after it. A model that did not reuse the cache
    gets no more saves under this key, and its saved files go (they cannot help)."""
    if restored.expected < MIN_CHECKED_TOKENS:
        return None
    check = RestoreCheck(cache_n >= restored.expected // 2, restored.expected, cache_n,
                         time.time())
    write_if_changed(folder / CHECK_FILE, json.dumps(asdict(check)))
    if not check.reused:
        log.warning("%s: a restored conversation was %s; its conversations are no longer "
                    "saved", folder.parent.name, check.describe())
        for slot in saved_slots(folder):
            remove(folder, slot)
    return check


def check_of(folder: Path) -> RestoreCheck | None:
    try:
        return RestoreCheck(**json.loads((folder / CHECK_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def saving_helps(folder: Path) -> bool:
    check = check_of(folder)
    return check is None or check.reused


def remove_other_keys(root: Path, keep: set[Path]) -> None:
    """Remove the folders of saved caches whose key the config in effect no longer names
    (another file or other settings: they could never be used)."""
    for folder in root.glob("*/*"):
        if folder.is_dir() and folder not in keep:
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed saved caches of %s made with other settings or another file",
                     folder.parent.name)


def saved_slots(folder: Path) -> list[SavedSlot]:
    slots = []
    for description in folder.glob("*.json"):
        try:
            slot = SavedSlot(**json.loads(description.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("skipped %s: %s", description, exc)
            continue
        if (folder / slot.file).is_file():
            slots.append(slot)
    return slots


def _describe(folder: Path, slot: SavedSlot) -> None:
    write_if_changed(folder / f"{Path(slot.file).stem}.json", json.dumps(asdict(slot)))


def save_slots(base_url: str, headers: dict[str, str], folder: Path) -> list[SavedSlot]:
    """Save every slot of the model server at `base_url` that holds tokens."""
    if not saving_helps(folder):
        return []
    slots = _slots(base_url, headers)
    if slots is None:
        return []
    bos = _bos_text(base_url, headers)
    saved = []
    for slot in slots:
        if not slot.get("n_prompt_tokens") or slot.get("is_processing"):
            continue
        # The slot's prompt is shown with its special tokens; requests come without the BOS.
        text = str(slot.get("prompt") or "")
        text = text[len(bos):] if bos and text.startswith(bos) else text
        text += str(slot.get("generated") or "")
        if not text:
            log.warning("slot %s of %s shows no text (started without %s): not saved",
                        slot.get("id"), base_url, ", ".join(SERVER_ENV))
            continue
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        final, partial = f"{digest}.bin", f"{digest}.{uuid.uuid4().hex[:8]}.partial"
        answer = call("POST", f"{base_url}/slots/{slot['id']}?action=save", headers,
                      timeout=120, json_body={"filename": partial})
        if answer.status_code != 200:
            log.warning("saving slot %s of %s failed: HTTP %s %s", slot["id"], base_url,
                        answer.status_code, answer.text[:200])
            (folder / partial).unlink(missing_ok=True)
            continue
        os.replace(folder / partial, folder / final)  # complete, or not there at all
        result = answer.json()
        now = time.time()
        entry = SavedSlot(final, text, int(result.get("n_saved", 0)),
                          int(result.get("n_written", (folder / final).stat().st_size)), now,
                          now)
        _describe(folder, entry)
        saved.append(entry)
    return saved


def _bos_text(base_url: str, headers: dict[str, str]) -> str:
    try:
        return str(call("GET", base_url + "/props", headers, timeout=10).json()
                   .get("bos_token") or "")
    except (LoopbackError, ValueError, AttributeError):
        return ""


def shared_prefix(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


def best_for(folder: Path, prompt: str) -> tuple[SavedSlot, int] | None:
    """The saved slot sharing the longest beginning with `prompt` (at least MIN_SHARED_CHARS),
    and how many characters it shares."""
    best, best_shared = None, MIN_SHARED_CHARS - 1
    for slot in saved_slots(folder):
        shared = shared_prefix(slot.text, prompt)
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
    return Restored(folder, tokens, tokens * shared // max(len(slot.text), 1))


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
    """Remove the least recently used saved slots until all of them fit `max_bytes`."""
    everything = [(slot, folder) for folder in root.glob("*/*") if folder.is_dir()
                  for slot in saved_slots(folder)]
    total = sum((folder / slot.file).stat().st_size for slot, folder in everything)
    removed = []
    for slot, folder in sorted(everything, key=lambda pair: pair[0].last_used):
        if total <= max_bytes:
            break
        total -= (folder / slot.file).stat().st_size
        remove(folder, slot)
        removed.append(slot.file)
    return removed
