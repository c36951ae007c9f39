"""The real Ollama 0.32.15 (CPU) from ../shared/tools/ollama, for tests and benchmarks.

`ollama serve` runs with a private store (OLLAMA_MODELS), a private HOME (where it writes its
key) and its own port; `ollama create NAME -f Modelfile` with `FROM <file.gguf>` fills the store
offline, `ollama rm` and `ollama cp` change it, all through the real CLI talking to that server.
Only `ollama pull` needs the registry (the network): tests/ollama and tests/ollama_server.py
stand in for that part alone.

    with serving(tmp_path / "ollama") as ollama:
        ollama.create("gemma3-test", gguf)
        ollama.cli("list")
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BINARY = REPO.parent / "shared" / "tools" / "ollama" / "bin" / "ollama"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Ollama:
    """A running `ollama serve`: its folder, port and the environment its CLI needs."""

    root: Path
    port: int
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def store(self) -> Path:
        return Path(self.env["OLLAMA_MODELS"])

    @property
    def log(self) -> Path:
        return self.root / "serve.log"

    def cli(self, *args: str, check: bool = True,
            timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """`ollama ARGS` against this server."""
        result = subprocess.run([str(BINARY), *args], env=self.env, capture_output=True,
                                text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"ollama {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout}{result.stderr}")
        return result

    def create(self, name: str, gguf: Path, *extra_lines: str) -> None:
        """`ollama create NAME` from a Modelfile `FROM gguf` (plus `extra_lines`)."""
        modelfile = self.root / f"Modelfile.{abs(hash(name))}"
        modelfile.write_text("\n".join([f"FROM {gguf}", *extra_lines]) + "\n")
        self.cli("create", name, "-f", str(modelfile))

    def pids(self) -> list[int]:
        """The server and every process under it (its llama-server runners)."""
        import psutil

        if self.proc is None or self.proc.poll() is not None:
            return []
        top = psutil.Process(self.proc.pid)
        return [top.pid, *(child.pid for child in top.children(recursive=True))]


def _answers(host: str) -> bool:
    import requests

    try:
        return requests.get(f"{host}/api/version", timeout=1).status_code == 200
    except requests.RequestException:
        return False


@contextlib.contextmanager
def serving(root: Path, **settings: str) -> Iterator[Ollama]:
    """`ollama serve` under `root` (store, HOME, log) on a free port; always stopped, with its
    runners. `settings` are extra OLLAMA_* variables (OLLAMA_CONTEXT_LENGTH...)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "store").mkdir(exist_ok=True)
    (root / "home").mkdir(exist_ok=True)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_")}
    env.update({"OLLAMA_HOST": f"127.0.0.1:{port}", "OLLAMA_MODELS": str(root / "store"),
                "HOME": str(root / "home"), "OLLAMA_NO_CLOUD": "1", **settings})
    ollama = Ollama(root, port, env)
    with open(ollama.log, "wb") as log:
        ollama.proc = subprocess.Popen([str(BINARY), "serve"], env=env, stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not _answers(ollama.host):
            if ollama.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ollama serve did not answer on {ollama.host}:\n"
                                   f"{ollama.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
        yield ollama
    finally:
        _stop(ollama.proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """TERM the server's process group (it stops its runners), then KILL what is left."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # a runner that outlived its server
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
