"""A first run as a new user makes it: the README's quick start and its "first model without
Ollama", word for word, in a fresh copy of the project and a fresh home (no MODELS_DIR, no
models, no Ollama). Only the port is moved, so a stack the user runs is never touched."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from model_serve.config.settings import STACK_VARIABLES
from tests.conftest import REPO, free_port, stack_processes_under


def readme_commands(section: str) -> list[str]:
    """The shell lines of the first ```sh block of a README section, comments dropped."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    body = readme.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", body, re.S)
    assert block, f"README section '{section}' has no sh block"
    lines = [line.split(" #", 1)[0].strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line]


def fresh_checkout(target: Path) -> Path:
    """The project's files as a clone has them (tracked and new, nothing generated)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    for name in listed:
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def test_readme_quick_start_word_for_word_on_a_fresh_home(tmp_path: Path) -> None:
    checkout = fresh_checkout(tmp_path / "model_serve")
    home = tmp_path / "home"
    home.mkdir()
    real_cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    env = {k: v for k, v in os.environ.items() if k not in STACK_VARIABLES}
    port = free_port()
    # The caches stay the machine's (pip's, and the llama-server build, which takes minutes).
    env.update({"HOME": str(home), "XDG_CACHE_HOME": real_cache, "LLAMA_SWAP_PORT": str(port)})

    def sh(line: str, timeout: float = 900) -> str:
        done = subprocess.run(["bash", "-c", line], cwd=checkout, env=env, capture_output=True,
                              text=True, timeout=timeout)
        assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr

    quick_start = readme_commands("Quick start")
    assert quick_start == ["./install.sh", "./model start"]
    installed = sh(quick_start[0])
    assert "llama-server computes on this CPU" in installed or "computes" in installed
    try:
        started = sh(quick_start[1], timeout=180)
        assert "no models yet" in started and "model pull" in started
        assert "model add" in started
        assert (home / ".cache" / "lm-studio" / "models").is_dir()  # the default, created

        added = ""
        for line in readme_commands("A first model without Ollama"):
            added = sh(line)
        name = re.search(r"served as (\S+)", added)
        assert name, added
        assert ":" in name.group(1)  # the form every command shows

        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        reply = client.chat.completions.create(
            model=name.group(1), messages=[{"role": "user", "content": "Hello!"}], max_tokens=4)
        assert reply.usage.completion_tokens > 0
    finally:
        sh("./model stop", timeout=120)
    assert stack_processes_under(tmp_path) == []
