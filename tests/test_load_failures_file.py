"""The remembered load failures are the owner's only: each cause is a line of the log."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from model_serve.config.settings import load_settings
from model_serve.runtime.load_failures import (
    FAILURES_FILE,
    FAILURES_LOCK,
    LoadFailure,
    LoadFailures,
    forget_failures,
)


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


def log_line(path: Path, text: str) -> str:
    """A line of the model servers' output as it lands in model_serve.log."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S,000")
    return f"{stamp} model_serve.engine INFO [5801] 0.00.061.370 E {text.format(path=path)}\n"


def test_a_reset_by_the_cli_is_not_undone_by_the_front(tmp_path: Path) -> None:
    """`model unload a` removes a's failure from the file while the front remembers it: the
    front's next write (b fails) must not bring it back, and a is tried again."""
    settings = load_settings({"HOME": str(tmp_path), "STATE_DIR": str(tmp_path / "state")})
    files = {name: tmp_path / f"{name}.gguf" for name in ("a", "b")}
    lines = []
    for path in files.values():
        path.write_bytes(b"GGUF")
        lines.append(log_line(path, "llama_model_load: loading model '{path}'"))
        lines.append(log_line(path, "llama_model_load: error loading model: data is not "
                                    "within the file bounds"))
        lines.append(log_line(path, "common_init_from_params: failed to load model '{path}'"))
    settings.log_file.parent.mkdir(parents=True, exist_ok=True)
    settings.log_file.write_text("".join(lines))
    front = LoadFailures(settings, lambda engine_id: (engine_id, files[engine_id]))
    since = time.time() - 5
    assert front.failed("a", since) is not None and front.current("a") is not None

    assert forget_failures(settings, ["a"]) == ["a"]  # the CLI, another process
    assert front.failed("b", since) is not None
    on_disk = json.loads((settings.state_dir / FAILURES_FILE).read_text())
    assert list(on_disk) == ["b"], on_disk
    assert front.current("a") is None and front.current("b") is not None
    assert (settings.state_dir / FAILURES_LOCK).stat().st_mode & 0o777 == 0o600


def test_a_load_that_succeeds_ends_the_run_of_failures(tmp_path: Path) -> None:
    """The backoff doubles for failures in a row: a model that failed once last week, loaded
    fine since, and fails once today is refused for 10 s, not 20 (nor 10 min after a few
    such weeks)."""
    settings = load_settings({"HOME": str(tmp_path), "STATE_DIR": str(tmp_path / "state")})
    path = tmp_path / "a.gguf"
    path.write_bytes(b"GGUF")
    settings.log_file.parent.mkdir(parents=True, exist_ok=True)
    settings.log_file.write_text(
        log_line(path, "llama_model_load: error loading model: failed to allocate buffer")
        + log_line(path, "common_init_from_params: failed to load model '{path}'"))
    front = LoadFailures(settings, lambda engine_id: (engine_id, path))
    since = time.time() - 5
    assert front.failed("a", since).count == 1
    front.loaded("a")  # the backoff passed, and the next load worked
    assert "a" not in json.loads((settings.state_dir / FAILURES_FILE).read_text())
    again = front.failed("a", since)
    assert again.count == 1 and again.until - again.at == 10 and "failed once" in again.message()


def test_a_cause_is_printable_text(tmp_path: Path) -> None:
    """The cause quotes the file (llama.cpp: "unknown model architecture: '<its name>'"), and
    `model stats` prints it to a terminal: escape sequences a hostile GGUF put in its
    architecture's name are shown, not obeyed."""
    settings = load_settings({"HOME": str(tmp_path), "STATE_DIR": str(tmp_path / "state")})
    path = tmp_path / "a.gguf"
    path.write_bytes(b"GGUF")
    hostile = "\x1b]52;c;ZWNobyBwd25lZA==\x07\x1b[2J"  # set the clipboard, clear the screen
    settings.log_file.parent.mkdir(parents=True, exist_ok=True)
    settings.log_file.write_text(
        log_line(path, "llama_model_load: error loading model: unknown model architecture: "
                       f"'{hostile}'")
        + log_line(path, "common_init_from_params: failed to load model '{path}'"))
    failure = LoadFailures(settings, lambda engine_id: (engine_id, path)).failed(
        "a", time.time() - 5)
    assert failure is not None and "unknown model architecture" in failure.message()
    assert failure.message().isprintable() and "\\x1b]52" in failure.cause, failure.cause


def test_model_logs_shows_escape_sequences_as_text(tmp_path: Path) -> None:
    """`model logs` (where a failure's fix sends the owner) prints the log's lines, which quote
    files (a hostile GGUF's architecture name) and clients' requests (a grammar the engine
    could not parse): their escape sequences are shown, not obeyed by the terminal."""
    from tests.conftest import new_env

    env = new_env(tmp_path)
    path = tmp_path / "a.gguf"
    hostile = "\x1b]52;c;ZWNobyBwd25lZA==\x07\x1b[2J\u202e"  # clipboard, clear, right-to-left
    log = env.state / "logs" / "model_serve.log"
    log.parent.mkdir(parents=True)
    log.write_text(log_line(path, f"unknown model architecture: '{hostile}'\tend"))
    shown = env.run("logs", "-n", "5", check=True).stdout
    assert "unknown model architecture" in shown and "\tend" in shown
    assert "\x1b" not in shown and "\x07" not in shown and "\u202e" not in shown, repr(shown)
    assert "\\x1b]52;c;" in shown
