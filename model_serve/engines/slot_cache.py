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
- a disk budget (KV_CACHE_MAX_GB) over all models: the least recently used files go first.
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
from typing import Any

from model_serve.fileio import write_if_changed
from model_serve.loopback import LoopbackError, call

log = logging.getLogger("model_serve.slot_cache")

MIN_SHARED_CHARS = 64  # a restore is worth it only when the prompts share at least this much
# Makes llama-server's GET /slots show each slot's last prompt and reply (else only counts):
# the text a saved slot is chosen by. It costs one copy of each reply.
SERVER_ENV = {"LLAMA_SERVER_SLOTS_DEBUG": "1"}


@dataclass
class SavedSlot:
    file: str  # the .bin's name inside the model's folder
    text: str  # what the slot held: its last prompt and reply
    tokens: int
    bytes: int
    saved_at: float
    last_used: float
    hits: int = 0


def cache_key(model_path: Path, settings_shaping_cache: dict[str, Any]) -> str:
    """Changes when the model file or anything that shapes its KV cache changes."""
    try:
        stat = model_path.stat()
        identity = [str(model_path.resolve()), stat.st_size, int(stat.st_mtime)]
    except OSError:
        identity = [str(model_path)]
    blob = json.dumps([identity, settings_shaping_cache], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_folder(root: Path, engine_id: str, key: str) -> Path:
    """`root/<model>/<key>`: the folder llama-server saves this model's slots into."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in engine_id)
    return root / safe / key


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
    try:
        slots = call("GET", base_url + "/slots", headers, timeout=10).json()
    except (LoopbackError, ValueError) as exc:
        log.warning("cannot read the slots of %s: %s", base_url, exc)
        return []
    bos = _bos_text(base_url, headers)
    saved = []
    for slot in slots if isinstance(slots, list) else []:
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


def best_for(folder: Path, prompt: str) -> SavedSlot | None:
    """The saved slot sharing the longest beginning with `prompt` (at least MIN_SHARED_CHARS)."""
    best, best_shared = None, MIN_SHARED_CHARS - 1
    for slot in saved_slots(folder):
        shared = shared_prefix(slot.text, prompt)
        if shared > best_shared:
            best, best_shared = slot, shared
    return best


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
