"""model_serve/machine.py, the one module that knows the platform: its Linux fast paths and
their portable twins give the same answers, nothing else in the code reads a Linux-only source,
and a reused pid is never signalled."""

from __future__ import annotations

import ast
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from model_serve import machine
from model_serve.runtime import procs
from tests.conftest import REPO
from tests.test_services import tool

LINUX_ROOTS = ("/proc", "/sys")
# Sources scanned for Linux-only reads: the package, and the bridge, which runs on Macs too.
SOURCES = [*sorted((REPO / "model_serve").rglob("*.py")),
           REPO / "lm-studio-ollama-bridge" / "ollama_bridge.py"]
SCRIPTS = [REPO / "install.sh", REPO / "setup_service.sh", REPO / "setup_cron.sh", REPO / "model",
           *sorted((REPO / "scripts").glob("*.sh"))]
# os functions whose names (or whose names' meaning) differ between Linux and macOS.
PLATFORM_CALLS = {"sysconf", "sysconf_names", "confstr", "confstr_names", "pathconf"}


def _linux_paths(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, text) of each string that starts a /proc or /sys path (f-strings included: their
    leading text is a constant of its own)."""
    return sorted((node.lineno, node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str)
                  and any(node.value == root or node.value.startswith(root + "/")
                          for root in LINUX_ROOTS))


def test_only_the_machine_module_reads_linux_sources() -> None:
    """/proc, /sys and os.sysconf names are read in model_serve/machine.py alone, where each
    has its portable twin (the suite runs those in the portable lane)."""
    assert SOURCES[-1].exists()
    found = []
    for path in SOURCES:
        if path == REPO / "model_serve" / "machine.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found += [f"{path.relative_to(REPO)}:{line}: {text!r}" for line, text in _linux_paths(tree)]
        found += [f"{path.relative_to(REPO)}:{node.lineno}: os.{node.attr}"
                  for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and node.attr in PLATFORM_CALLS]
    for script in SCRIPTS:
        for number, line in enumerate(script.read_text(encoding="utf-8").splitlines(), 1):
            if any(f"{root}/" in line for root in LINUX_ROOTS):
                found.append(f"{script.relative_to(REPO)}:{number}: {line.strip()}")
    assert found == []


def test_the_scan_sees_what_it_looks_for() -> None:
    tree = ast.parse('open(f"/proc/{pid}/stat")\nPath("/sys/fs/cgroup")\nx = "/system"\n'
                     '"""Read from /proc alone."""\n')
    assert _linux_paths(tree) == [(1, "/proc/"), (2, "/sys/fs/cgroup")]


@pytest.fixture
def portable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A way to ask the portable twin in this process; any /proc open of ours is recorded."""
    machine.install_guard()
    refusals = tmp_path / "refused"
    monkeypatch.setenv(machine.REFUSALS_VARIABLE, str(refusals))

    def ask(function, *args):
        with monkeypatch.context() as lane:
            lane.setenv(machine.PORTABLE_VARIABLE, "1")
            return function(*args)

    yield ask
    assert not refusals.exists(), refusals.read_text()


def test_process_start_times_agree(portable) -> None:
    """A pid recorded by one path is recognised by the other (the CLI may take either)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        fast, twin = machine.process_start(child.pid), portable(machine.process_start, child.pid)
        assert fast is not None and twin is not None
        assert abs(fast - twin) <= machine.START_TIME_SLACK
        assert abs(fast - psutil.Process(child.pid).create_time()) <= machine.START_TIME_SLACK
        child.kill()  # ended, and not reaped yet: a zombie
        assert procs.wait_until(
            lambda: psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE, 10)
        assert machine.process_start(child.pid) is None
        assert portable(machine.process_start, child.pid) is None
        child.wait(timeout=10)
        assert machine.process_start(child.pid) is None
        assert portable(machine.process_start, child.pid) is None
    finally:
        child.kill()
        child.wait(timeout=10)


def test_memory_and_cpu_agree(portable) -> None:
    assert machine.physical_memory() == portable(machine.physical_memory)
    assert machine.physical_memory() == psutil.virtual_memory().total
    machine.cpu_description.cache_clear()
    fast = machine.cpu_description()
    machine.cpu_description.cache_clear()
    try:
        twin = portable(machine.cpu_description)  # lscpu
    finally:
        machine.cpu_description.cache_clear()
    assert fast == twin and fast.count("|") == 2, (fast, twin)


APPLE_SILICON = """machdep.cpu.brand_string: Apple M2 Pro
hw.optional.arm.FEAT_FlagM: 1
hw.optional.arm.FEAT_DotProd: 1
hw.optional.arm.FEAT_I8MM: 1
hw.optional.arm.FEAT_BF16: 1
hw.optional.arm.FEAT_SME: 0
hw.optional.floatingpoint: 1
hw.optional.neon: 1
hw.optional.arm64: 1
"""


def test_a_mac_describes_its_cpu_with_sysctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             portable) -> None:
    """`sysctl machdep.cpu.brand_string hw.optional` as an M2 Pro prints it (a stand-in
    sysctl): the brand and the features present, not the absent SME."""
    (tmp_path / "sysctl-output").write_text(APPLE_SILICON)
    tool(tmp_path / "bin", "sysctl",
         f'[ "$1 $2" = "machdep.cpu.brand_string hw.optional" ] && cat {tmp_path}/sysctl-output')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    monkeypatch.setattr(sys, "platform", "darwin")
    machine.cpu_description.cache_clear()
    try:
        described = machine.cpu_description()
    finally:
        machine.cpu_description.cache_clear()
    assert described.endswith("|Apple M2 Pro|arm.FEAT_BF16 arm.FEAT_DotProd arm.FEAT_FlagM "
                              "arm.FEAT_I8MM arm64 floatingpoint neon")


def test_a_reused_pid_is_never_signalled() -> None:
    """After the stop wait, the pid of a process that ended may belong to a newer one, which
    may lead a process group of its own: the KILL must not reach it or its group."""
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                start_new_session=True)
    try:
        started = psutil.Process(stranger.pid).create_time()
        recorded = procs.ProcRef(stranger.pid, started - 100)  # ours, which ended long ago
        procs._signal(recorded, psutil.Process(stranger.pid), signal.SIGKILL)
        time.sleep(0.3)
        assert stranger.poll() is None, "a stranger that took our old pid was killed"
        procs._signal(procs.ProcRef(stranger.pid, started), psutil.Process(stranger.pid),
                      signal.SIGKILL)
        assert stranger.wait(timeout=10) == -signal.SIGKILL
    finally:
        stranger.kill()
        stranger.wait(timeout=10)


def _limit_open_files(soft: int):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, resource.getrlimit(
            resource.RLIMIT_NOFILE)[1]))
    return preexec


def test_the_open_files_limit_is_raised_to_the_hard_limit() -> None:
    """macOS starts programs with 256 open files; the stack raises its own soft limit."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    out = subprocess.run(
        [sys.executable, "-c", "from model_serve import machine; "
                               "print(*machine.raise_open_files_limit())"],
        capture_output=True, text=True, timeout=30, preexec_fn=_limit_open_files(256), cwd=REPO)
    assert out.returncode == 0, out.stderr
    expected = hard if hard != resource.RLIM_INFINITY else 1 << 20
    assert out.stdout.split() == ["256", str(expected)]
