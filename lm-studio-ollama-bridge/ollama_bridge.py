"""Link the GGUF models of an Ollama store into a models folder, safely and idempotently.

Stdlib only, so it runs before any virtualenv exists. The flow is:
find the store -> scan its manifests -> name the wanted links -> reconcile them with the
links recorded by the previous run -> print what happened (text or JSON).

Library functions return data; only `main` and the renderers print.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import stat
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

RECORD_NAME = ".ollama-bridge.json"
RECORD_VERSION = 1

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"

MEDIA_PREFIX = "application/vnd.ollama.image."
MEDIA_MODEL = MEDIA_PREFIX + "model"
MEDIA_PROJECTOR = MEDIA_PREFIX + "projector"
MEDIA_PARAMS = MEDIA_PREFIX + "params"
MEDIA_ADAPTER = MEDIA_PREFIX + "adapter"

# Ollama's own check; anything else could smuggle a path into `blobs/`.
DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})")
MANIFEST_DEPTH = 4  # <host>/<namespace>/<model>/<tag>

# Caps that keep a hostile or corrupt store from making us read huge files into memory.
MAX_MANIFEST_BYTES = 4 << 20
MAX_JSON_BLOB_BYTES = 1 << 20
MAX_GGUF_KVS = 100_000
MAX_GGUF_STRING = 1 << 20
MAX_GGUF_ITEMS = 1 << 22  # keys and array elements walked in one header
MAX_GGUF_DEPTH = 4  # arrays of arrays: real files nest one deep at most
log = logging.getLogger("ollama_bridge")

UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]")
UNKNOWN_VALUES = {"", "unknown"}

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class BridgeError(Exception):
    """A problem that stops the run; `code` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


class SkipManifest(Exception):
    """This manifest cannot be linked; `warning` False means it is simply not a GGUF model.

    `unreadable` means a read failed (permissions, I/O): the model may well still exist.
    """

    def __init__(self, reason: str, *, warning: bool = True, unreadable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.warning = warning
        self.unreadable = unreadable


@dataclass
class Skip:
    manifest: str  # the file (or folder) concerned
    reason: str
    warning: bool = True  # False: an expected skip (not a GGUF model), reported as info
    name: str | None = None  # the Ollama name, when the path gives one
    unreadable: bool = False  # a read failed: links made from this path are kept


@dataclass
class Entry:
    """One linkable manifest: the identity of the model and the blobs to link."""

    host: str
    namespace: str
    model: str
    tag: str
    manifest: str
    manifest_sha256: str
    model_target: str
    model_digest: str
    model_type: str
    file_type: str
    model_family: str
    params: dict[str, Any]
    projector_target: str | None = None
    projector_digest: str | None = None
    has_adapter: bool = False

    @property
    def ollama_name(self) -> str:
        return f"{display_base(self.host, self.namespace, self.model)}:{self.tag}"


@dataclass
class Result:
    store: str | None
    dry_run: bool
    linked: list[tuple[str, str]] = field(default_factory=list)  # (path, target)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    record_written: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.linked or self.removed or self.record_written)


# --------------------------------------------------------------------------- store discovery


def candidate_stores(env: dict[str, str]) -> list[Path]:
    """Where Ollama keeps models, in the order Ollama and its installers use them."""
    candidates = []
    if env.get("OLLAMA_MODELS"):
        candidates.append(Path(os.path.expanduser(env["OLLAMA_MODELS"])))
    home = env.get("HOME") or os.path.expanduser("~")
    candidates.append(Path(home) / ".ollama" / "models")
    candidates.append(Path("/usr/share/ollama/.ollama/models"))
    candidates.append(Path("/var/lib/ollama"))
    return candidates


def is_fresh_store(folder: Path) -> bool:
    """A store Ollama made but never pulled into: manifests/ only appears with the first pull,
    so an empty folder, or one holding only blobs/, is a store with no models yet."""
    try:
        names = {entry.name for entry in os.scandir(folder)}
    except OSError:
        return False
    return names <= {"blobs"}


def find_store(explicit: str | None, env: dict[str, str]) -> tuple[Path | None, list[Path]]:
    """Return (store or None, the places looked at). A bad explicit store is a usage error."""
    if explicit is not None:
        store = Path(os.path.abspath(os.path.expanduser(explicit)))
        if not store.is_dir():
            raise BridgeError(f"--store {store}: no such folder")
        if not (store / "manifests").is_dir() and not is_fresh_store(store):
            raise BridgeError(f"--store {store}: not an Ollama store (no manifests/ folder in it)")
        return store, [store]
    candidates = candidate_stores(env)
    for candidate in candidates:
        if (candidate / "manifests").is_dir():
            return Path(os.path.abspath(candidate)), candidates
    fresh = next((c for c in candidates if c.is_dir() and is_fresh_store(c)), None)
    return (Path(os.path.abspath(fresh)) if fresh else None), candidates


# --------------------------------------------------------------------------- names


def display_base(host: str, namespace: str, model: str) -> str:
    """Ollama's shortest display form, without the tag."""
    if host == DEFAULT_HOST and namespace == DEFAULT_NAMESPACE:
        return model
    if host == DEFAULT_HOST:
        return f"{namespace}/{model}"
    return f"{host}/{namespace}/{model}"


def sanitize(part: str) -> str:
    """Keep a name part portable: ASCII letters, digits, '.', '_' and '-' only."""
    cleaned = UNSAFE_CHARS.sub("_", part)
    # The scan drops dot names already; this keeps the function safe on its own, since a
    # part made only of dots would mean "this folder" or "the parent".
    return "_" * len(cleaned) if set(cleaned) == {"."} else cleaned


def folder_name(entry: Entry) -> str:
    base = display_base(entry.host, entry.namespace, entry.model)
    return "--".join(sanitize(part) for part in base.split("/"))


def model_file_name(entry: Entry) -> str:
    parts = [entry.model, entry.tag, entry.model_type, entry.file_type]
    kept = [sanitize(p) for p in parts if p.strip().lower() not in UNKNOWN_VALUES]
    return "-".join(kept) + ".gguf"


def projector_file_name(entry: Entry) -> str:
    return f"mmproj-{sanitize(entry.model)}-{sanitize(entry.tag)}.gguf"


# --------------------------------------------------------------------------- blobs and GGUF


def is_within(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


@functools.lru_cache(maxsize=64)
def real_folder(path: str) -> str:
    """The store's and its blobs folder's real paths, resolved once per run, not per blob."""
    return os.path.realpath(path)


def blob_path(store: Path, digest: Any) -> str:
    """Validated absolute path of the blob for `digest` (link target form, not resolved).

    Accepts the current `sha256-<hex>` and the legacy `sha256:<hex>` file names. The blob
    must resolve to a regular file inside `<store>/blobs`.
    """
    match = DIGEST_RE.fullmatch(digest) if isinstance(digest, str) else None
    if match is None:
        raise SkipManifest(f"invalid digest {digest!r}")
    hex_digest = match.group(1)
    blobs = store / "blobs"
    real_blobs = real_folder(str(blobs))
    for name in (f"sha256-{hex_digest}", f"sha256:{hex_digest}"):
        candidate = blobs / name
        try:
            is_link = stat.S_ISLNK(os.lstat(candidate).st_mode)
        except OSError:
            continue  # absent
        try:
            # A plain file is where its folder is; only a link needs the full walk.
            resolved = (os.path.realpath(candidate, strict=True) if is_link
                        else os.path.join(real_blobs, name))
            mode = os.stat(resolved).st_mode
        except OSError as exc:  # a symlink loop lands here
            raise SkipManifest(f"blob {name} cannot be resolved: {exc.strerror}") from exc
        if not is_within(resolved, real_blobs):
            raise SkipManifest(f"blob {name} resolves outside the store ({resolved})")
        if not stat.S_ISREG(mode):
            raise SkipManifest(f"blob {name} is not a regular file")
        return str(candidate)
    raise SkipManifest(f"blob sha256-{hex_digest[:12]}… is missing from {blobs}")


def open_regular(path: str | Path) -> IO[bytes]:
    """`path` opened for reading if it is a regular file (a link to one included). A FIFO
    would block the open and every read, so the kind is checked before opening, the open
    cannot block (O_NONBLOCK, in case the file was swapped in between), and what was opened
    is checked again."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(f"{path} is not a regular file")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return os.fdopen(fd, "rb")


def read_capped(path: str, limit: int, what: str) -> bytes:
    try:
        with open_regular(path) as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        reason = exc.strerror or "not a regular file"
        raise SkipManifest(f"cannot read {what} {path}: {reason}", unreadable=True) from exc
    if len(data) > limit:
        raise SkipManifest(f"{what} {path} is larger than {limit} bytes")
    return data


def read_json_blob(path: str, what: str) -> dict[str, Any]:
    data = read_capped(path, MAX_JSON_BLOB_BYTES, what)
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SkipManifest(f"{what} {path} is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise SkipManifest(f"{what} {path} is nested too deeply to be read") from exc
    if not isinstance(value, dict):
        raise SkipManifest(f"{what} {path} is not a JSON object")
    return value


def check_gguf(path: str) -> None:
    try:
        with open_regular(path) as handle:
            magic = handle.read(4)
    except OSError as exc:
        reason = exc.strerror or "not a regular file"
        raise SkipManifest(f"cannot read blob {path}: {reason}", unreadable=True) from exc
    if magic != b"GGUF":
        raise SkipManifest(f"blob {os.path.basename(path)} is not a GGUF file")


_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _GGUFReader:
    """Just enough of a GGUF v2/v3 reader to pick a few keys; arrays are skipped by seeking.
    Every count is checked against the file's size, arrays nest at most MAX_GGUF_DEPTH deep
    and at most MAX_GGUF_ITEMS are walked: a hostile header costs no more than a real one."""

    def __init__(self, handle: Any, size: int) -> None:
        self.handle = handle
        self.size = size
        self.items = 0

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        data = self.handle.read(size)
        if len(data) != size:
            raise ValueError("truncated GGUF header")
        return struct.unpack(fmt, data)[0]

    def need(self, count: int) -> None:
        """`count` more bytes must be in the file; one more item walked."""
        self.items += 1
        if self.items > MAX_GGUF_ITEMS:
            raise ValueError("GGUF header has too many entries")
        if count > self.size - self.handle.tell():
            raise ValueError("GGUF header runs past the end of the file")

    def string(self) -> str:
        length = self.unpack("<Q")
        if length > MAX_GGUF_STRING:
            raise ValueError("GGUF string too long")
        data = self.handle.read(length)
        if len(data) != length:
            raise ValueError("truncated GGUF header")
        return data.decode("utf-8", "replace")

    def skip_string(self) -> None:
        length = self.unpack("<Q")
        self.need(length)
        self.handle.seek(length, os.SEEK_CUR)

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[vtype])
        if vtype == _STRING:
            return self.string()
        self.skip(vtype)
        return None

    def skip(self, vtype: int, depth: int = 0) -> None:
        if vtype in _SCALAR_FORMATS:
            self.handle.seek(struct.calcsize(_SCALAR_FORMATS[vtype]), os.SEEK_CUR)
        elif vtype == _STRING:
            self.skip_string()
        elif vtype == _ARRAY:
            if depth >= MAX_GGUF_DEPTH:
                raise ValueError("GGUF arrays nested too deeply")
            elem_type, count = self.unpack("<I"), self.unpack("<Q")
            if elem_type in _SCALAR_FORMATS:
                size = count * struct.calcsize(_SCALAR_FORMATS[elem_type])
                self.need(size)
                self.handle.seek(size, os.SEEK_CUR)
            else:
                self.need(count * (8 if elem_type == _STRING else 12))  # each one's smallest
                for _ in range(count):
                    self.skip(elem_type, depth + 1)
        else:
            raise ValueError(f"unknown GGUF value type {vtype}")


def read_gguf_keys(path: str, wanted: set[str]) -> dict[str, Any]:
    """Read the `wanted` metadata keys from a GGUF header; stops as soon as all are found."""
    found: dict[str, Any] = {}
    with open_regular(path) as handle:
        reader = _GGUFReader(handle, os.fstat(handle.fileno()).st_size)
        if handle.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        if reader.unpack("<I") not in (2, 3):
            raise ValueError("unsupported GGUF version or byte order")
        reader.unpack("<Q")  # tensor count
        kv_count = reader.unpack("<Q")
        for _ in range(min(kv_count, MAX_GGUF_KVS)):
            key = reader.string()
            vtype = reader.unpack("<I")
            if key in wanted:
                found[key] = reader.value(vtype)
                if len(found) == len(wanted):
                    break
            else:
                reader.skip(vtype)
    return found


def is_projector_gguf(path: str) -> bool:
    """True for mmproj/CLIP files, which Ollama sometimes stores as a second model layer."""
    try:
        keys = read_gguf_keys(path, {"general.type", "general.architecture"})
    except (OSError, ValueError, OverflowError, struct.error, RecursionError, MemoryError):
        return False
    return keys.get("general.type") in ("mmproj", "projector") or (
        keys.get("general.architecture") == "clip"
    )


# --------------------------------------------------------------------------- scanning


def iter_manifest_files(store: Path, skips: list[Skip]) -> Iterator[tuple[tuple[str, ...], str]]:
    """Yield ((host, namespace, model, tag), path) for files exactly 4 levels below manifests/.

    Walks no deeper than that, so symlinked folder loops cannot trap the scan.
    """
    root = store / "manifests"
    if not root.is_dir():  # a fresh store: no pull yet
        return

    def walk(folder: Path, parts: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], str]]:
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda e: e.name)
        except OSError as exc:
            skips.append(Skip(str(folder), f"cannot read folder: {exc.strerror}",
                              unreadable=True))
            return
        for item in entries:
            if item.name.startswith("."):  # .DS_Store and editor droppings
                continue
            here = (*parts, item.name)
            try:
                is_dir = item.is_dir()
            except OSError:
                is_dir = False
            if len(here) < MANIFEST_DEPTH and is_dir:
                yield from walk(Path(item.path), here)
            elif len(here) == MANIFEST_DEPTH and not is_dir:
                yield here, item.path
            else:
                skips.append(Skip(item.path, "not a manifest: Ollama keeps manifests exactly "
                                             "4 levels below manifests/"))

    yield from walk(root, ())


def load_entry(store: Path, parts: tuple[str, ...], path: str) -> Entry:
    """Parse one manifest and check every blob it points at; raise SkipManifest if unusable."""
    for part in parts:
        try:
            part.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise SkipManifest("name is not valid UTF-8") from exc
    real = os.path.realpath(path)
    if not is_within(real, real_folder(str(store))):
        raise SkipManifest(f"manifest resolves outside the store ({real})")
    raw = read_capped(path, MAX_MANIFEST_BYTES, "manifest")
    try:
        manifest = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SkipManifest(f"manifest is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise SkipManifest("manifest is nested too deeply to be read") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("layers", []), list):
        raise SkipManifest("manifest is not an Ollama manifest object")
    layers = [layer for layer in manifest.get("layers", []) if isinstance(layer, dict)]
    config_layer = manifest.get("config")
    if not isinstance(config_layer, dict):
        raise SkipManifest("manifest has no config layer")
    config = read_json_blob(blob_path(store, config_layer.get("digest")), "config blob")

    fmt = config.get("model_format") or "gguf"
    model_layers = [layer for layer in layers if layer.get("mediaType") == MEDIA_MODEL]
    if fmt != "gguf":
        raise SkipManifest(f"not a GGUF model (model_format {fmt})", warning=False)
    if not model_layers:
        kind = "cloud model" if config.get("remote_host") else "no GGUF model layer"
        raise SkipManifest(f"not a local GGUF model ({kind})", warning=False)

    model_target, projector_target, projector_digest = pick_blobs(store, layers, model_layers)
    host, namespace, model, tag = parts
    return Entry(
        host=host, namespace=namespace, model=model, tag=tag,
        manifest=path, manifest_sha256=hashlib.sha256(raw).hexdigest(),
        model_target=model_target[0], model_digest=model_target[1],
        model_type=text_field(config, "model_type"),
        file_type=text_field(config, "file_type"),
        model_family=text_field(config, "model_family"),
        params=load_params(store, layers),
        projector_target=projector_target, projector_digest=projector_digest,
        has_adapter=any(layer.get("mediaType") == MEDIA_ADAPTER for layer in layers),
    )


def text_field(config: dict[str, Any], key: str) -> str:
    value = config.get(key)
    return value if isinstance(value, str) else ""


def pick_blobs(
    store: Path, layers: list[dict[str, Any]], model_layers: list[dict[str, Any]]
) -> tuple[tuple[str, str], str | None, str | None]:
    """Choose the weights blob and the projector blob (if any) of a manifest.

    Several model layers happen when an mmproj was imported with FROM; their headers tell
    the projector apart. The first remaining model layer is the weights.
    """
    checked = []
    for layer in model_layers:
        target = blob_path(store, layer.get("digest"))
        check_gguf(target)
        checked.append((target, layer["digest"]))
    weights, projectors = checked, []
    if len(checked) > 1:
        projectors = [blob for blob in checked if is_projector_gguf(blob[0])]
        weights = [blob for blob in checked if blob not in projectors] or checked[:1]
        projectors = [blob for blob in projectors if blob != weights[0]]
    for layer in layers:
        if layer.get("mediaType") == MEDIA_PROJECTOR:
            target = blob_path(store, layer.get("digest"))
            check_gguf(target)
            projectors.append((target, layer["digest"]))
    if projectors:
        return weights[0], projectors[0][0], projectors[0][1]
    return weights[0], None, None


def load_params(store: Path, layers: list[dict[str, Any]]) -> dict[str, Any]:
    for layer in layers:
        if layer.get("mediaType") == MEDIA_PARAMS:
            return read_json_blob(blob_path(store, layer.get("digest")), "params blob")
    return {}


def scan_store(store: Path) -> tuple[list[Entry], list[Skip], list[str]]:
    """Every linkable manifest in the store, plus the skipped ones and warnings."""
    entries: list[Entry] = []
    skips: list[Skip] = []
    warnings: list[str] = []
    for parts, path in iter_manifest_files(store, skips):
        name = f"{display_base(*parts[:3])}:{parts[3]}"
        try:
            entry = load_entry(store, parts, path)
        except SkipManifest as skip:
            skips.append(Skip(path, skip.reason, skip.warning, name, skip.unreadable))
            continue
        except Exception as exc:  # noqa: BLE001 - one manifest's trouble must not stop the rest
            log.debug("reading %s failed", path, exc_info=True)
            # Counted as unreadable: the links made from it before are kept, not removed.
            skips.append(Skip(path, f"cannot be read ({type(exc).__name__}: {str(exc)[:200]})",
                              True, name, unreadable=True))
            continue
        entries.append(entry)
        if entry.has_adapter:
            warnings.append(f"{path}: {name} has a LoRA adapter layer; "
                            "the link serves the base weights without it")
    return entries, skips, warnings


# --------------------------------------------------------------------------- planning


@dataclass
class Planned:
    entry: Entry
    model_path: str  # relative to DEST: "<folder>/<file>"
    projector_path: str | None


def plan_paths(entries: list[Entry]) -> list[Planned]:
    """Give every entry a unique link path, unique even on case-insensitive filesystems."""
    taken: set[str] = set()

    def claim(folder: str, file_name: str, entry: Entry) -> str:
        stem = file_name[: -len(".gguf")]
        for suffix_len in (0, 8, 16, 64):
            suffix = f"-{entry.manifest_sha256[:suffix_len]}" if suffix_len else ""
            path = f"{folder}/{stem}{suffix}.gguf"
            if path.lower() not in taken:
                taken.add(path.lower())
                return path
        raise AssertionError("a full manifest digest cannot collide")  # two identical files

    planned = []
    for entry in sorted(entries, key=lambda e: e.manifest):
        folder = folder_name(entry)
        model_path = claim(folder, model_file_name(entry), entry)
        projector_path = None
        if entry.projector_target:
            projector_path = claim(folder, projector_file_name(entry), entry)
        planned.append(Planned(entry, model_path, projector_path))
    return planned


def identity(entry: Entry) -> dict[str, Any]:
    return {
        "ollama_name": entry.ollama_name, "host": entry.host, "namespace": entry.namespace,
        "model": entry.model, "tag": entry.tag,
    }


def model_record(plan: Planned, projector_path: str | None) -> dict[str, Any]:
    entry = plan.entry
    return {
        "path": plan.model_path, "target": entry.model_target, "role": "model",
        **identity(entry), "digest": entry.model_digest,
        "model_type": entry.model_type, "file_type": entry.file_type,
        "model_family": entry.model_family, "projector": projector_path,
        "params": entry.params, "manifest": entry.manifest,
    }


def projector_record(plan: Planned) -> dict[str, Any]:
    entry = plan.entry
    return {
        "path": plan.projector_path, "target": entry.projector_target, "role": "projector",
        "model_link": plan.model_path, **identity(entry), "digest": entry.projector_digest,
        "model_type": entry.model_type, "file_type": entry.file_type,
        "model_family": entry.model_family, "manifest": entry.manifest,
    }


# --------------------------------------------------------------------------- the record


def valid_rel_path(value: Any) -> bool:
    """Only '<folder>/<file>' paths, as the bridge writes them, can name something to remove."""
    if not isinstance(value, str) or "\\" in value or "\0" in value:
        return False
    parts = value.split("/")
    return len(parts) == 2 and all(p and p not in (".", "..") for p in parts)


def load_record(dest: Path, warnings: list[str]) -> tuple[str | None, list[dict[str, Any]], str]:
    """(store, links, raw text) of the previous run; unusable entries are dropped, not trusted."""
    path = dest / RECORD_NAME
    try:
        with open_regular(path) as handle:
            text = handle.read(MAX_MANIFEST_BYTES * 16).decode("utf-8")
    except FileNotFoundError:
        return None, [], ""
    except (OSError, UnicodeDecodeError) as exc:
        warnings.append(f"{path}: cannot read the record ({exc}); starting a new one")
        return None, [], ""
    try:
        record = json.loads(text)
    except (ValueError, RecursionError) as exc:
        warnings.append(f"{path}: the record is not valid JSON ({exc}); starting a new one")
        return None, [], text
    if not isinstance(record, dict) or not isinstance(record.get("links"), list):
        warnings.append(f"{path}: the record has an unknown shape; starting a new one")
        return None, [], text
    store = record.get("store") if isinstance(record.get("store"), str) else None
    links = [
        link for link in record["links"]
        if isinstance(link, dict) and valid_rel_path(link.get("path"))
        and isinstance(link.get("target"), str)
    ]
    return store, links, text


def render_record(store: Path | None, links: list[dict[str, Any]]) -> str:
    record = {
        "version": RECORD_VERSION,
        "store": str(store) if store else None,
        "links": sorted(links, key=lambda link: link["path"]),
    }
    # ASCII escapes: a hostile blob can carry lone surrogates that UTF-8 cannot encode.
    return json.dumps(record, indent=2, ensure_ascii=True) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """Temp file in the same folder + rename, so readers see the old or the new record."""
    tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------- reconciling


def symlink_atomically(target: str, path: Path) -> None:
    """Make the link under a temporary name, then rename it over `path`.

    A server reading the folder sees the old link or the new one, never a missing file.
    """
    tmp = path.with_name(f".ollama-bridge.{os.urandom(4).hex()}.tmp")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_link(path: Path) -> str | None:
    """The target of the symlink at `path`; None when there is no symlink there."""
    try:
        return os.readlink(path)
    except OSError:
        return None


def is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def usable_folder(dest: Path, rel_path: str) -> bool:
    """The link's folder is absent or a real folder (a symlinked folder could lead out of DEST)."""
    folder = dest / rel_path.split("/")[0]
    return not os.path.lexists(folder) or is_real_dir(folder)


def link_state(dest: Path, rel_path: str, target: str, previous: dict[str, Any] | None) -> str:
    """'unchanged', 'link' (create or replace our own link) or 'taken' (not ours: leave it)."""
    if not usable_folder(dest, rel_path):
        return "taken"
    path = dest / rel_path
    if not os.path.lexists(path):
        return "link"
    current = read_link(path)
    if current == target:
        return "unchanged"  # also adopts an identical link whose record was lost
    if current is not None and previous is not None and previous["target"] == current:
        return "link"
    return "taken"


def owned_link(dest: Path, link: dict[str, Any], old_store: str | None) -> bool:
    """True when a recorded link is still the bridge's own symlink into the recorded store."""
    if old_store is None or not os.path.isabs(link["target"]):
        return False
    blobs = os.path.join(os.path.normpath(old_store), "blobs")
    target = os.path.normpath(link["target"])
    if os.path.dirname(target) != blobs:
        return False
    if not is_real_dir(dest / link["path"].split("/")[0]):
        return False
    return read_link(dest / link["path"]) == link["target"]


class Reconciler:
    """Brings DEST in line with the wanted links; in dry-run mode it only reports."""

    def __init__(self, dest: Path, store: Path | None, result: Result) -> None:
        self.dest = dest
        self.store = store
        self.result = result
        self.dry_run = result.dry_run
        self.old_store, old_links, self.old_text = load_record(dest, result.warnings)
        self.previous = {link["path"]: link for link in old_links}
        self.kept: list[dict[str, Any]] = []
        # What could not be read may still exist: its links stay until a run can look.
        self.unreadable = [s.manifest for s in result.skipped if s.unreadable]

    def run(self, planned: list[Planned]) -> None:
        for plan in planned:
            self.place(plan)
        self.remove_stale()
        self.save_record()
        self.result.linked.sort()
        self.result.unchanged.sort()

    def place(self, plan: Planned) -> None:
        entry = plan.entry
        if not self.ensure(plan.model_path, entry.model_target, entry.manifest, entry):
            return
        projector_path = plan.projector_path
        if projector_path and not self.ensure(
            projector_path, entry.projector_target or "", entry.manifest, entry
        ):
            projector_path = None
        self.kept.append(model_record(plan, projector_path))
        if projector_path:
            self.kept.append(projector_record(plan))

    def ensure(self, rel_path: str, target: str, manifest: str, entry: Entry) -> bool:
        """Make one link exist; False when it could not be (the reason is recorded as a skip)."""
        state = link_state(self.dest, rel_path, target, self.previous.get(rel_path))
        if state == "unchanged":
            self.result.unchanged.append(rel_path)
            return True
        if state == "taken":
            self.skip(manifest, f"{rel_path} is taken by something the bridge did not make; "
                                "left alone", entry)
            return False
        if not self.dry_run:
            try:
                (self.dest / rel_path).parent.mkdir(parents=True, exist_ok=True)
                symlink_atomically(target, self.dest / rel_path)
            except OSError as exc:
                self.skip(manifest, f"cannot link {rel_path}: {exc.strerror}", entry)
                return False
        self.result.linked.append((rel_path, target))
        return True

    def skip(self, manifest: str, reason: str, entry: Entry) -> None:
        self.result.skipped.append(Skip(manifest, reason, True, entry.ollama_name))

    def remove_stale(self) -> None:
        wanted = {link["path"] for link in self.kept}
        emptied: set[Path] = set()
        for rel_path, link in sorted(self.previous.items()):
            if rel_path in wanted:
                continue
            if not owned_link(self.dest, link, self.old_store):
                continue  # replaced or moved by someone else: forget it, never delete it
            if self.from_unreadable(link):
                self.kept.append(link)
                self.result.unchanged.append(rel_path)
                continue
            if not self.dry_run:
                try:
                    os.unlink(self.dest / rel_path)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    self.result.warnings.append(f"{self.dest / rel_path}: cannot remove: "
                                                f"{exc.strerror}")
                    self.kept.append(link)  # still ours; try again next run
                    continue
            self.result.removed.append(rel_path)
            emptied.add((self.dest / rel_path).parent)
        for folder in sorted(emptied):
            self.remove_if_empty(folder)

    def from_unreadable(self, link: dict[str, Any]) -> bool:
        manifest = link.get("manifest")
        if not isinstance(manifest, str) or not os.path.isabs(manifest):
            return False
        return any(is_within(os.path.normpath(manifest), os.path.normpath(path))
                   for path in self.unreadable)

    def remove_if_empty(self, folder: Path) -> None:
        """Drop a folder that held only the bridge's links; rmdir refuses anything else."""
        if self.dry_run or folder == self.dest or not is_real_dir(folder):
            return
        with contextlib.suppress(OSError):
            folder.rmdir()

    def save_record(self) -> None:
        text = render_record(self.store, self.kept)
        if text == self.old_text:
            return
        if self.store is None and not self.old_text:
            return  # no store and never ran here: leave DEST untouched
        self.result.record_written = True
        if self.dry_run:
            return
        try:
            self.dest.mkdir(parents=True, exist_ok=True)
            write_atomically(self.dest / RECORD_NAME, text)
        except OSError as exc:
            raise BridgeError(f"cannot write {self.dest / RECORD_NAME}: {exc.strerror}",
                              EXIT_FAILED) from exc


# --------------------------------------------------------------------------- the run


def check_dest(dest: Path, store: Path | None) -> None:
    if os.path.lexists(dest) and not dest.is_dir():
        raise BridgeError(f"--dest {dest}: exists and is not a folder")
    if store is not None:
        real_dest, real_store = os.path.realpath(dest), os.path.realpath(store)
        if is_within(real_dest, real_store):
            raise BridgeError(f"--dest {dest}: is inside the Ollama store {store}; "
                              "the bridge never writes into the store")


def run(dest_arg: str, store_arg: str | None, dry_run: bool, env: dict[str, str]) -> Result:
    """Find the store, scan it and reconcile DEST; returns what was (or would be) done."""
    store, looked = find_store(store_arg, env)
    dest = Path(os.path.abspath(os.path.expanduser(dest_arg)))
    check_dest(dest, store)
    result = Result(store=str(store) if store else None, dry_run=dry_run)
    entries: list[Entry] = []
    if store is None:
        result.notes.append("no Ollama store found; looked in: "
                            + ", ".join(str(path) for path in looked))
    else:
        entries, skips, warnings = scan_store(store)
        result.skipped.extend(skips)
        result.warnings.extend(warnings)
        if not dry_run and not os.path.lexists(dest):
            try:
                dest.mkdir(parents=True)
            except OSError as exc:
                raise BridgeError(f"cannot create --dest {dest}: {exc.strerror}",
                                  EXIT_FAILED) from exc
    Reconciler(dest, store, result).run(plan_paths(entries))
    return result


# --------------------------------------------------------------------------- output


def short_target(target: str) -> str:
    name = os.path.basename(target)
    return name[:19] + "…" if len(name) > 19 else name


def render_text(result: Result, quiet: bool) -> None:
    for skip in result.skipped:
        if skip.warning:
            print(f"ollama-bridge: warning: {skip.manifest}: {skip.reason}", file=sys.stderr)
    for warning in result.warnings:
        print(f"ollama-bridge: warning: {warning}", file=sys.stderr)
    if quiet:
        return
    would = "would " if result.dry_run else ""
    for note in result.notes:
        print(note)
    for path, target in result.linked:
        print(f"{would}link  {path} -> {short_target(target)}")
    for path in result.removed:
        print(f"{would}remove  {path}")
    for skip in result.skipped:
        if not skip.warning:
            print(f"skip  {skip.name or skip.manifest}: {skip.reason}")
    summary = (f"{len(result.linked)} linked, {len(result.unchanged)} unchanged, "
               f"{len(result.removed)} removed, {len(result.skipped)} skipped")
    if result.dry_run:
        summary += " (dry run: nothing changed)"
    elif not result.changed:
        summary += ": nothing to do"
    print(summary)


def render_json(result: Result) -> None:
    for skip in result.skipped:
        if skip.warning:
            print(f"ollama-bridge: warning: {skip.manifest}: {skip.reason}", file=sys.stderr)
    for line in result.warnings + result.notes:
        print(f"ollama-bridge: {line}", file=sys.stderr)
    payload = {
        "linked": [path for path, _ in result.linked],
        "unchanged": result.unchanged,
        "removed": result.removed,
        "skipped": [{"manifest": s.manifest, "reason": s.reason} for s in result.skipped],
        "store": result.store,
        "dry_run": result.dry_run,
    }
    print(json.dumps(payload, indent=2, ensure_ascii=True))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ollama-bridge",
        description="Link the GGUF models of an Ollama store into a models folder "
                    "(symlinks to the blobs; nothing is copied, the store is never written).",
    )
    parser.add_argument("--dest", required=True,
                        help="folder that receives the links, e.g. MODELS_DIR/ollama")
    parser.add_argument("--store",
                        help="Ollama store (the folder holding manifests/ and blobs/); default: "
                             "$OLLAMA_MODELS, ~/.ollama/models, /usr/share/ollama/.ollama/models, "
                             "/var/lib/ollama")
    parser.add_argument("--dry-run", action="store_true", help="report, change nothing")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quiet", action="store_true", help="print only warnings")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for stream in (sys.stdout, sys.stderr):
        # Names come from disk; never crash on a terminal that cannot show them.
        stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    try:
        result = run(args.dest, args.store, args.dry_run, dict(os.environ))
    except BridgeError as exc:
        print(f"ollama-bridge: error: {exc}", file=sys.stderr)
        return exc.code
    if args.json:
        render_json(result)
    else:
        render_text(result, args.quiet)
    return EXIT_OK
