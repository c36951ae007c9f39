"""The remembered load failures are the owner's only: each cause is a line of the log."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from model_serve.config.settings import load_settings
from model_serve.runtime.load_failures import FAILURES_FILE, LoadFailure, forget_failures


def test_the_failures_file_is_owner_only(tmp_path: Path) -> None:
    settings = load_settings({"HOME": str(tmp_path), "STATE_DIR": str(tmp_path / "state")})
    path = settings.state_dir / FAILURES_FILE
    path.parent.mkdir(parents=True)
    failure = {"model": "m", "name": "m", "file": "/m.gguf", "cause": "x", "fix": "y",
               "count": 1, "at": 0.0, "until": 0.0}
    extra = LoadFailure(**{**failure, "model": "n", "name": "n"})
    path.write_text(json.dumps({"m": failure, "n": asdict(extra)}))
    path.chmod(0o644)
    assert forget_failures(settings, ["m"]) == ["m"]
    assert path.stat().st_mode & 0o777 == 0o600
    assert list(json.loads(path.read_text())) == ["n"]
