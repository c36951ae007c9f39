"""Folders macOS's privacy protection (TCC) guards from programs that launchd or cron start.

A checkout, state folder or MODELS_DIR in one of them works from Terminal (which the user
allowed) but gives "Operation not permitted" to the login agent, which then restarts every
10 s. install.sh, setup_service.sh and `model doctor` warn about it:
`python -m model_serve.service.privacy privacy` prints one warning per such folder.
"""

from __future__ import annotations

import os
import sys
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


def folders_to_check(settings: Settings, checkout: Path = PROJECT_ROOT) -> dict[str, Path]:
    folders = {"the checkout": checkout, "MODELS_DIR": settings.models_dir,
               "STATE_DIR": settings.state_dir, "MODEL_SERVE_HOME": settings.home}
    if settings.ollama_models is not None:
        folders["OLLAMA_MODELS"] = settings.ollama_models
    return folders


def privacy_warnings(settings: Settings, checkout: Path = PROJECT_ROOT) -> list[str]:
    warnings = []
    seen: set[Path] = set()
    for what, path in folders_to_check(settings, checkout).items():
        area = protected_area(path, settings.user_home)
        if area is None or path in seen:
            continue
        seen.add(path)
        warnings.append(f"{what} ({path}) is in {area}, which macOS protects: the login "
                        "service and cron get 'Operation not permitted' there")
    return warnings


PRIVACY_FIX = ("move it out (e.g. to ~/model_serve or ~/models), or give Full Disk Access to "
               "/bin/bash and {python} in System Settings > Privacy & Security")


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
        fix = PRIVACY_FIX.format(python=os.path.realpath(sys.executable))
        print(f"  fix: {fix}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
