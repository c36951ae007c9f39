"""`model add PATH [--name N]`: serve a GGUF file that lives outside MODELS_DIR, by a link."""

from __future__ import annotations

import os
import re
from pathlib import Path

from model_serve.config.models_dir import ADDED_DIR
from model_serve.config.settings import Settings
from model_serve.errors import ConfigError
from model_serve.fileio import replace_symlink
from model_serve.models.catalog import (
    NAMES_FILE,
    SPLIT_RE,
    ensure_models_dir,
    identity,
    load_names,
    names_lock,
    save_names,
    slug,
)
from model_serve.models.gguf import GGUFError
from model_serve.models.model_info import read_model_info

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]*")


def add_model(settings: Settings, source: Path, name: str | None = None) -> Path:
    """Link `source` into MODELS_DIR/added (unless it is already below MODELS_DIR) and pin
    `name` to it. Returns the path the catalog will find it under."""
    ensure_models_dir(settings)
    source = Path(os.path.abspath(os.path.expanduser(source)))
    if not source.is_file():
        raise ConfigError(f"{source} is not a file", "give the path of a .gguf file")
    try:
        info = read_model_info(source)
    except GGUFError as exc:
        raise ConfigError(exc.message, exc.hint) from exc
    if SPLIT_RE.match(source.name):
        raise ConfigError(f"{source} is one part of a split model",
                          "link or move the folder holding all its parts into MODELS_DIR")
    if info.is_projector:
        raise ConfigError(f"{source} is a vision projector (mmproj), not a model",
                          "add the model itself; set 'mmproj' for it in custom_models.yaml")
    if name is not None:
        name = _served_name(settings, name)
    models_dir = settings.models_dir.resolve()
    real = source.resolve()
    if models_dir in real.parents or models_dir in source.parents:
        found = source  # already scanned; only the name needs pinning
    else:
        found = _link(settings.models_dir / ADDED_DIR, source)
    if name is not None:
        path = settings.state_dir / NAMES_FILE
        with names_lock(path):
            names, pinned = load_names(path)
            for other, pinned_name in pinned.items():
                if identity(pinned_name) == identity(name) and other != str(real):
                    raise ConfigError(f"the name '{name}' is already pinned to {other}",
                                      "choose another --name")
            pinned[str(real)] = name
            names.pop(str(real), None)
            save_names(path, names, pinned)
    return found


def _served_name(settings: Settings, name: str) -> str:
    if not name.startswith(settings.model_prefix):
        name = settings.model_prefix + name
    bare = name[len(settings.model_prefix):]
    if not bare or not _NAME_RE.fullmatch(bare):
        raise ConfigError(f"'{name}' is not a usable model name",
                          "use letters, digits and . _ - : / @ + (e.g. my-model:7b-q4)")
    return name


def _link(folder: Path, source: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    stem = slug(source.stem) or "model"
    for n in range(1, 1000):
        link = folder / (f"{stem}.gguf" if n == 1 else f"{stem}-{n}.gguf")
        if link.is_symlink() and os.readlink(link) == str(source):
            return link  # added before
        if not link.exists() and not link.is_symlink():
            replace_symlink(link, source)
            return link
    raise ConfigError(f"too many files named {stem} in {folder}", "remove unused links there")
