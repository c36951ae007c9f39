"""Folders macOS's privacy protection (TCC) guards from programs that launchd or cron start.

A checkout, state folder, MODELS_DIR, KV_CACHE_DIR, keys file or program (LLAMA_SERVER_BIN...)
in one of them works from Terminal (which the user allowed) but gives "Operation not
permitted" to the login agent, which then restarts every 10 s, and to cron's keep-alive.
install.sh, setup_service.sh, setup_cron.sh and `model doctor` warn about it:
`python -m model_serve.service.privacy privacy` prints one warning per such path.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from model_serve.config.settings import PROJECT_ROOT, Settings

# Relative to the user's home; /Volumes (external and network disks) is checked apart.
PROTECTED_IN_HOME = {
    "Desktop": "~/Desktop",
    "Documents": "~/Documents",
    "Downloads": "~/Downloads",
    "Library/Mobile Documents": "iCloud Drive",
    "Library/CloudStorage": "a cloud storage folder (Dropbox, OneDrive, Google Drive...)",
}


def protected_area(path: Path, home: Path) -> str | None:
    """Which protected area holds `path` (as written, or where its links lead), if any."""
    for candidate in {path, Path(os.path.realpath(path))}:
        if candidate == Path("/Volumes") or Path("/Volumes") in candidate.parents:
            return "/Volumes (an external or network disk)"
        for folder, label in PROTECTED_IN_HOME.items():
            area = home / folder
            if candidate == area or area in candidate.parents:
                return label
    return None


def paths_to_check(settings: Settings, checkout: Path = PROJECT_ROOT,
                   environ: Mapping[str, str] | None = None) -> dict[str, Path]:
    """Every folder and file the service opens: the stack's folders, the keys files, and the
    programs it runs (set, or as this shell's PATH finds them: the service is given those)."""
    from model_serve.service.files import PROGRAM_SETTINGS, resolved_programs

    paths = {"the checkout": checkout, "MODELS_DIR": settings.models_dir,
             "STATE_DIR": settings.state_dir, "MODEL_SERVE_HOME": settings.home,
             "KV_CACHE_DIR": settings.kv_cache_dir}
    optional = {"OLLAMA_MODELS": settings.ollama_models,
                "API_KEYS_FILE": settings.api_keys_file,
                "ADMIN_KEYS_FILE": settings.admin_keys_file,
                "PEER_KEYS_FILE": settings.peer_keys_file if settings.peers else None,
                **{name: getattr(settings, name.lower()) for name in PROGRAM_SETTINGS}}
    found = resolved_programs(settings, os.environ if environ is None else environ)
    for name, path in optional.items():
        if path is not None or name in found:
            paths[name] = path if path is not None else Path(found[name])
    return paths


def privacy_warnings(settings: Settings, checkout: Path = PROJECT_ROOT,
                     environ: Mapping[str, str] | None = None) -> list[str]:
    warnings = []
    seen: set[Path] = set()
    for what, path in paths_to_check(settings, checkout, environ).items():
        area = protected_area(path, settings.user_home)
        if area is None or path in seen:
            continue
        seen.add(path)
        warnings.append(f"{what} ({path}) is in {area}, which macOS protects: the login "
                        "service and cron get 'Operation not permitted' there")
    return warnings


CRON = "/usr/sbin/cron"  # cron's jobs get the access cron has, whatever they run
HOMEBREW_STORE = "Cellar"  # Homebrew's versioned folders: a new one at every upgrade


def stable_path(program: Path) -> tuple[Path, bool]:
    """The path to give access to for `program`, and whether it leads into Homebrew's store.
    Links are followed to the real file, except into Homebrew's store, whose folders change
    at every upgrade: then the last link before it (e.g. /opt/homebrew/opt/python@3.12/...,
    which each upgrade points anew)."""
    hops, current = [program], program
    for _ in range(40):  # a loop of links ends somewhere
        if not current.is_symlink():
            break
        target = Path(os.readlink(current))
        current = Path(os.path.normpath(target if target.is_absolute()
                                        else current.parent / target))
        hops.append(current)
    outside = [hop for hop in hops if HOMEBREW_STORE not in hop.parts]
    in_store = HOMEBREW_STORE in Path(os.path.realpath(program)).parts  # folder links too
    return (outside[-1] if outside else current), in_store


def privacy_fix(checkout: Path = PROJECT_ROOT, service_path: str | None = None) -> str:
    """Move it out, or which programs need Full Disk Access: launchd runs `model` with the
    bash its PATH finds (Homebrew's first), then .venv's Python; cron's jobs run as cron."""
    from model_serve.programs import find_on_path
    from model_serve.service.files import SERVICE_PATH

    bash = find_on_path("bash", platform="", path=service_path or SERVICE_PATH)
    python = checkout / ".venv" / "bin" / "python"
    programs = []
    for program, role in ((bash or Path("/bin/bash"), "runs ./model"),
                          (python, ".venv's Python")):
        path, homebrew = stable_path(program)
        note = ("; Homebrew's: if the service fails after a 'brew upgrade', give access again"
                if homebrew else "")
        programs.append(f"{path} ({role}{note})")
    return ("move it out (e.g. to ~/model_serve or ~/models), which lasts; or in System Settings"
            " > Privacy & Security > Full Disk Access, add (+) the programs that open it: for "
            f"the login service {' and '.join(programs)}; for the cron keep-alive {CRON}")


def main(argv: list[str]) -> int:
    if argv != ["privacy"]:
        print("usage: python -m model_serve.service.privacy privacy", file=sys.stderr)
        return 2
    from model_serve.config.settings import load_settings
    from model_serve.errors import ModelServeError

    try:
        settings = load_settings()
    except ModelServeError:
        return 0  # the settings' own error is reported by the command that needs them
    warnings = privacy_warnings(settings)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if warnings:
        print(f"  fix: {privacy_fix()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
