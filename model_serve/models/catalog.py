"""The catalog: every servable GGUF under MODELS_DIR, with a stable, unique served name.

Sources: the Ollama bridge's links (named from Ollama's manifest), LM Studio's
`publisher/repo/file.gguf` layout, `model add` links, and any other GGUF below MODELS_DIR.
Split files count as one model; projector (mmproj) files are attached to a model, not served.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import stat as stat_module
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_serve.config.custom_models import name_problem
from model_serve.errors import ConfigError, ModelServeError
from model_serve.fileio import write_if_changed
from model_serve.models.gguf import file_kind, open_regular
from model_serve.models.model_info import InfoCache, ModelInfo
from model_serve.models.names import dash_form, identity

if TYPE_CHECKING:
    from model_serve.config.settings import Settings

BRIDGE_RECORD = ".ollama-bridge.json"
log = logging.getLogger(__name__)
NAMES_FILE = "names.json"
SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<part>\d{5})-of-(?P<total>\d{5})\.gguf$", re.IGNORECASE)
_UNSAFE = re.compile(r"[^a-z0-9._-]+")
# The bridge's record fields the names are made of: text, or they are left out.
_RECORD_TEXT = ("path", "model", "model_type", "file_type", "tag", "namespace", "ollama_name",
                "projector")


@dataclass
class CatalogModel:
    """One servable model."""

    name: str  # served name, with MODEL_PREFIX: ls/gemma3:27.4b-q8_0
    key: str  # the name without the prefix; custom_models.yaml keys use this
    path: Path  # the GGUF to load (first shard of a split model)
    size_bytes: int  # on-disk size of all shards
    info: ModelInfo
    source: str  # "ollama" or "file"
    ollama_names: list[str] = field(default_factory=list)
    mmproj: Path | None = None
    params: dict[str, Any] = field(default_factory=dict)  # Ollama's PARAMETER defaults

    @property
    def dash_name(self) -> str:
        return dash_form(self.name)


@dataclass
class ScanProblem:
    path: Path
    reason: str


@dataclass
class Catalog:
    models: list[CatalogModel]
    problems: list[ScanProblem]

    def find(self, name: str) -> CatalogModel | None:
        """Look a model up by served name, dash form, unprefixed key or Ollama name."""
        lowered = name.lower()
        for model in self.models:
            names = {model.name, model.dash_name, model.key, dash_form(model.key)}
            names.update(model.ollama_names)
            if lowered in {n.lower() for n in names}:
                return model
        return None


def slug(text: str) -> str:
    """Lower-case, [a-z0-9._-] only, no leading/trailing/double separators."""
    text = _UNSAFE.sub("-", text.lower())
    return re.sub(r"-{2,}", "-", text).strip("-._")


@dataclass
class _Candidate:
    path: Path  # link or file as found under MODELS_DIR
    real: Path
    info: ModelInfo
    size_bytes: int
    record: dict[str, Any] | None = None  # the bridge's record entry for Ollama links
    mmproj: Path | None = None


def _read_bridge_record(models_dir: Path,
                        problems: list[ScanProblem]) -> dict[str, dict[str, Any]]:
    """The bridge's record of its links. One it cannot read is a warning: the links are then
    named as plain files until the bridge writes the record again."""
    record_path = models_dir / "ollama" / BRIDGE_RECORD
    try:
        with open_regular(record_path) as handle:
            data = json.loads(handle.read(64 << 20))
    except ModelServeError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            return {}
        problems.append(ScanProblem(record_path, f"{exc.message}; run 'model sync' again (the "
                                    "bridge rewrites it)"))
        return {}
    except (OSError, ValueError, RecursionError) as exc:
        problems.append(ScanProblem(record_path, f"cannot be read ({type(exc).__name__}); run "
                                    "'model sync' again (the bridge rewrites it)"))
        return {}
    links = data.get("links", []) if isinstance(data, dict) else []
    records = {}
    for entry in links if isinstance(links, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            continue
        clean = {k: v for k, v in entry.items() if k not in _RECORD_TEXT or isinstance(v, str)}
        if not isinstance(clean.get("params"), dict):
            clean.pop("params", None)
        records[str((models_dir / "ollama" / entry["path"]).absolute())] = clean
    return records


class RealPaths:
    """os.path.realpath for many files in few folders: each folder is resolved once, and a
    file costs one readlink (the Ollama bridge's links each point into one blobs folder)."""

    def __init__(self) -> None:
        self._folders: dict[str, str] = {}

    def folder(self, path: str) -> str:
        real = self._folders.get(path)
        if real is None:
            real = self._folders[path] = os.path.realpath(path)
        return real

    def file(self, path: str) -> str:
        for _ in range(40):  # the kernel's own limit on chained links
            parent, name = os.path.split(path)
            here = os.path.join(self.folder(parent), name)
            try:
                target = os.readlink(here)
            except OSError:  # not a link (or gone: the caller's stat says so)
                return here
            path = os.path.join(os.path.dirname(here), target)
        return os.path.realpath(path)


def _walk_gguf(models_dir: Path, problems: list[ScanProblem],
               real_paths: RealPaths) -> list[Path]:
    """Every *.gguf below models_dir, following directory links once (loops are cut)."""
    found: list[Path] = []
    seen_dirs: set[str] = set()

    def on_error(exc: OSError) -> None:
        where = Path(exc.filename or models_dir)
        problems.append(ScanProblem(where, f"unreadable: {exc.strerror}"))

    for root, dirs, files in os.walk(models_dir, followlinks=True, onerror=on_error):
        real = real_paths.folder(root)
        if real in seen_dirs:
            dirs[:] = []
            continue
        seen_dirs.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.lower().endswith(".gguf") and not name.startswith("."):
                found.append(Path(root) / name)
    return found


def _is_projector_file(path: Path, info: ModelInfo | None) -> bool:
    return path.name.lower().startswith("mmproj") or (info is not None and info.is_projector)


def _path_problem(path: Path) -> str:
    """Why a file's path cannot go into an engine config as it is, or ''."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "its path is not valid UTF-8, which engine configs cannot carry; rename it"
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        return ("its path holds a line break or another control character, which engine "
                "configs cannot carry; rename it")
    return ""


def _stat_file(path: Path, real: str) -> tuple[os.stat_result | None, str]:
    """The file's stat, or why it is no model file. Never opens it: a FIFO would block."""
    try:
        stat = os.stat(real)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None, "broken link: it leads back to itself (a link loop)"
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return None, "broken link: its target is gone"
        return None, f"unreadable: {exc.strerror}"
    if not stat_module.S_ISREG(stat.st_mode):
        return None, (f"not a regular file ({file_kind(stat.st_mode)}), so not a model; remove it "
                      "from MODELS_DIR")
    return stat, _path_problem(path)


def _reason(exc: BaseException, *paths: str) -> str:
    """One line for `model list` (which names the file already): the message and its fix,
    or what a bug raised."""
    if isinstance(exc, ModelServeError):
        first = exc.message.splitlines()[0] if exc.message else type(exc).__name__
        for path in paths:
            if first.startswith(f"{path}: "):
                first = first[len(path) + 2:]
            elif first.startswith(f"{path} "):
                first = first[len(path) + 1:]
        return f"{first}; {exc.hint}" if exc.hint else first
    if isinstance(exc, OSError):
        return f"unreadable: {exc.strerror or exc}"
    return f"could not be read ({type(exc).__name__}: {str(exc)[:200]})"


def _scan(models_dir: Path, cache: InfoCache, problems: list[ScanProblem]) -> list[_Candidate]:
    records = _read_bridge_record(models_dir, problems)
    projectors: dict[Path, list[Path]] = {}
    split_parts: dict[tuple[Path, str], list[Path]] = {}
    candidates: list[_Candidate] = []
    real_paths = RealPaths()
    for path in _walk_gguf(models_dir, problems, real_paths):
        # One file's trouble, whatever it is, is a warning on that file: the rest is served.
        real = str(path)
        try:
            real = real_paths.file(str(path))
            stat, problem = _stat_file(path, real)
            if stat is None or problem:
                problems.append(ScanProblem(path, problem))
                continue
            split = SPLIT_RE.match(path.name)
            if split and split["part"] != "00001":
                split_parts.setdefault((path.parent, split["stem"].lower()), []).append(path)
                continue
            info = cache.get(path, real, stat)
        except Exception as exc:  # noqa: BLE001 - see above; the traceback goes to the log
            log.debug("reading %s failed", path, exc_info=True)
            problems.append(ScanProblem(path, _reason(exc, real, str(path))))
            continue
        if _is_projector_file(path, info):
            projectors.setdefault(path.parent, []).append(path)
            continue
        record = records.get(str(path.absolute()))
        candidates.append(_Candidate(path, Path(real), info, stat.st_size, record))
    for cand in candidates:
        split = SPLIT_RE.match(cand.path.name)
        if split:
            for part in split_parts.get((cand.path.parent, split["stem"].lower()), []):
                with contextlib.suppress(OSError):  # gone since the walk: the next sync sees
                    cand.size_bytes += part.stat().st_size
        cand.mmproj = _pick_projector(cand, projectors.get(cand.path.parent, []), models_dir)
    return candidates


def _pick_projector(cand: _Candidate, folder: list[Path], models_dir: Path) -> Path | None:
    if cand.record is not None:
        projector = cand.record.get("projector")
        return models_dir / "ollama" / projector if projector else None
    # LM Studio layout: one repo per folder, so a lone mmproj belongs to every model in it.
    return folder[0] if len(folder) == 1 else None


def _strip_labels(stem: str, *labels: str) -> str:
    """'big-70b-q8_0' without its size and quant labels: 'big'."""
    for label in labels:
        if label:
            stem = re.sub(rf"[-_.]{re.escape(label)}(?=$|[-_.])", "", stem)
    return stem.strip("-._")


def _base_candidates(cand: _Candidate, prefix: str) -> list[str]:
    """Names to try, most readable first; later ones exist only to break collisions."""
    info, record = cand.info, cand.record
    if record is not None:
        model = slug(record.get("model", "")) or "model"
        size = slug(record.get("model_type", "") or info.size_label)
        quant = record.get("file_type", "")
        if not quant or quant == "unknown":
            quant = info.file_type or record.get("tag", "")
        quant = slug(quant)
        tag = slug(record.get("tag", "")) or "latest"
        namespace = slug(record.get("namespace", ""))
        names = [f"{model}:{'-'.join(p for p in (size, quant) if p) or tag}"]
        names.append(f"{model}:{tag}" if tag != names[0].split(":", 1)[1] else names[0])
        names.append(f"{namespace}-{model}:{tag}" if namespace != "library" else names[-1])
    else:
        stem = cand.path.name[: -len(".gguf")]
        split = SPLIT_RE.match(cand.path.name)
        if split:
            stem = split["stem"]
        size, quant = slug(info.size_label), slug(info.file_type)
        model = slug(info.basename) or _strip_labels(slug(stem), size, quant) or "model"
        names = [f"{model}:{'-'.join(p for p in (size, quant) if p) or 'latest'}"]
        names.append(f"{model}:{slug(stem)}")
        names.append(f"{slug(cand.path.parent.name) or 'models'}-{model}:{slug(stem)}")
    return [prefix + n for n in names]


def _assign_names(
    candidates: list[_Candidate], prefix: str, previous: dict[str, str],
    pinned: dict[str, str] | None = None,
) -> dict[str, str]:
    """Map each real file to a unique name; pinned names (`model add --name`) come first, then
    names given in earlier runs, so adding a model never renames an existing one. Two names
    that differ only by case or by ':' against '-' are one name to the engines."""
    by_real: dict[str, list[_Candidate]] = {}
    for cand in candidates:
        by_real.setdefault(str(cand.real), []).append(cand)
    assigned: dict[str, str] = {}
    taken: set[str] = set()
    wanted = {real: _base_candidates(cands[0], prefix) for real, cands in by_real.items()}
    for real, name in sorted((pinned or {}).items()):
        if real in by_real and identity(name) not in taken:
            assigned[real] = name
            taken.add(identity(name))
    for real in sorted(by_real):
        old = previous.get(real)
        if real not in assigned and old and identity(old) not in taken and old in wanted[real]:
            assigned[real] = old
            taken.add(identity(old))
    primary_counts: dict[str, int] = {}
    for real in by_real:
        if real not in assigned:
            key = identity(wanted[real][0])
            primary_counts[key] = primary_counts.get(key, 0) + 1
    for real in sorted(by_real):
        if real in assigned:
            continue
        options = wanted[real]
        # When two new files want the same name, neither gets the ambiguous one.
        if primary_counts.get(identity(options[0]), 0) > 1:
            options = options[1:]
        for option in options:
            if identity(option) not in taken:
                break
        else:
            stem, _, tag = options[-1].partition(":")
            n = 2
            while identity(f"{stem}:{tag}-{n}") in taken:
                n += 1
            option = f"{stem}:{tag}-{n}"
        assigned[real] = option
        taken.add(identity(option))
    return assigned


@contextlib.contextmanager
def names_lock(path: Path | None) -> Iterator[None]:
    """Held from reading names.json to writing it back: the sync loop, the unloader, `model
    list` and `model add --name` all read, change and write it."""
    if path is None:
        yield
        return
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def load_names(path: Path | None,
               problems: list[ScanProblem] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """(names given in earlier runs, names pinned by `model add --name`), by real path.

    A file that is not valid JSON is moved aside, never overwritten: the pins in it can be
    copied back by hand."""
    if path is None:
        return {}, {}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}, {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelServeError(f"cannot read {path}: {exc}", "fix its permissions") from exc
    try:
        data = json.loads(text)
        return ({str(k): str(v) for k, v in data.get("names", {}).items()},
                {str(k): str(v) for k, v in data.get("pinned", {}).items()})
    except (ValueError, AttributeError, RecursionError):  # nested past Python's stack too
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        os.replace(path, aside)
        log.warning("%s was not valid JSON; kept as %s, names given anew", path, aside)
        if problems is not None:
            problems.append(ScanProblem(path, f"was not valid JSON: kept as {aside.name}; "
                                        "names were given anew (pins from `model add --name` "
                                        "can be copied back from it)"))
        return {}, {}


def save_names(path: Path, names: dict[str, str], pinned: dict[str, str]) -> None:
    content = json.dumps({"names": names, "pinned": pinned}, indent=1, sort_keys=True)
    try:
        write_if_changed(path, content)
    except OSError as exc:
        raise ModelServeError(f"cannot write {path}: {exc.strerror}",
                              "make STATE_DIR writable") from exc


def ensure_models_dir(settings: Settings) -> None:
    """Create the default MODELS_DIR on first use, and keep that choice (of two LM Studio
    folders); a folder the user named must exist."""
    if settings.sources.get("MODELS_DIR") == "the defaults":
        from model_serve.config.models_dir import keep_choice

        settings.models_dir.mkdir(parents=True, exist_ok=True)
        keep_choice(settings.models_dir, settings.state_dir)
    require_models_dir(settings.models_dir)


def require_models_dir(models_dir: Path) -> None:
    if not models_dir.is_dir():
        raise ConfigError(f"MODELS_DIR {models_dir} does not exist",
                          f"create it (mkdir -p {models_dir}) or set MODELS_DIR in .env to your "
                          "models folder")


def build_catalog(models_dir: Path, prefix: str, state_dir: Path | None = None) -> Catalog:
    """Scan models_dir and name every model. With a state_dir, names and headers persist."""
    require_models_dir(models_dir)
    problems: list[ScanProblem] = []
    cache = InfoCache(state_dir / "model-info-cache.json" if state_dir else None)
    candidates = _scan(models_dir, cache, problems)
    names_path = state_dir / NAMES_FILE if state_dir else None
    with names_lock(names_path):
        previous, pinned = load_names(names_path, problems)
        usable = {}
        for real, name in pinned.items():  # names.json is a file anyone may have edited
            problem = name_problem(name)
            if problem:
                problems.append(ScanProblem(names_path or models_dir, (
                    f"the name {name!r} pinned to {real} {problem}, so it is not used; "
                    "pin another with 'model add FILE --name NAME'")))
            else:
                usable[real] = name
        names = _assign_names(candidates, prefix, previous, usable)
        if names_path is not None:
            # Pins of files that are gone are kept: a re-mounted disk brings its names back.
            save_names(names_path, names, pinned)
    models: dict[str, CatalogModel] = {}
    for cand in candidates:
        real = str(cand.real)
        model = models.get(real)
        if model is None:
            name = names[real]
            model = models[real] = CatalogModel(
                name=name, key=name[len(prefix):] if name.startswith(prefix) else name,
                path=cand.path, size_bytes=cand.size_bytes, info=cand.info,
                source="ollama" if cand.record else "file", mmproj=cand.mmproj,
                params=dict(cand.record.get("params") or {}) if cand.record else {},
            )
        if cand.record and cand.record.get("ollama_name"):
            model.ollama_names.append(cand.record["ollama_name"])
            model.mmproj = model.mmproj or cand.mmproj
    cache.save()
    ordered = sorted(models.values(), key=lambda m: m.name)
    for model in ordered:
        model.ollama_names.sort()
    return Catalog(ordered, problems)
