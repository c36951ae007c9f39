"""The one module that knows the platform: how this machine answers about its processes, its
memory, its CPU and its open-file limit.

Linux answers fast from /proc and os.sysconf (psutil alone costs `model status` 13 ms to
import). Every other platform (macOS, the users' main one) answers through psutil or its own
tools, and so does Linux with MODEL_SERVE_PORTABLE=1: the portable lane, in which
model_serve's own code also finds no /proc or /sys (an audit hook refuses them), so that the
suite runs the paths a Mac takes (README, "Development"). Every read of a Linux-only source in
model_serve goes through here; tests/test_machine.py keeps it so.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

PORTABLE_VARIABLE = "MODEL_SERVE_PORTABLE"
# In the portable lane, each refused /proc or /sys open is also appended to this file (tests
# read it: a refusal that a fallback hid must still fail them).
REFUSALS_VARIABLE = "MODEL_SERVE_PORTABLE_REFUSALS"
# A process's start time, as stored with its pid, may differ by this much between readings
# (psutil and /proc round the clock ticks differently).
START_TIME_SLACK = 0.5
# macOS's own bound on a process's open files when kern.maxfilesperproc cannot be read
# (OPEN_MAX); RLIM_INFINITY is refused there.
MACOS_OPEN_FILES = 10240


def portable() -> bool:
    """True when the Linux fast paths are turned off (MODEL_SERVE_PORTABLE=1)."""
    return os.environ.get(PORTABLE_VARIABLE, "") not in ("", "0")


def linux_fast_paths() -> bool:
    return sys.platform == "linux" and not portable()


# --- processes ---------------------------------------------------------------------------------
def process_start(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch, as psutil's create_time), or None
    when no running process has that pid (ended, or a zombie waiting to be reaped)."""
    if linux_fast_paths():
        found = _proc_start(pid)
        if found is not _UNKNOWN:
            return found  # type: ignore[return-value]
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except psutil.Error:
        return None


def same_process(pid: int, started: float) -> bool:
    """True while `pid` is still the process that started at `started` (not a reused pid)."""
    now = process_start(pid)
    return now is not None and abs(now - started) <= START_TIME_SLACK


_UNKNOWN = object()
_BOOT_TIME: list[float] = []


def _proc_start(pid: int) -> float | None | object:
    """process_start from /proc alone: boot time + start ticks / clock rate, as psutil
    computes it. _UNKNOWN when /proc cannot say (a container without it): psutil answers."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except FileNotFoundError:
        # No such process, or no /proc at all: only the first means ended.
        return None if os.path.isdir("/proc/self") else _UNKNOWN
    except OSError:
        return _UNKNOWN
    # The name (field 2) may hold spaces and ')': the fields after it follow the last ')'.
    fields = stat[stat.rfind(b")") + 2:].split()
    try:
        state, start_ticks = fields[0], int(fields[19])
        started = _boot_time() + start_ticks / os.sysconf("SC_CLK_TCK")
    except (IndexError, ValueError, OSError, StopIteration):
        return _UNKNOWN
    return None if state == b"Z" else started


def _boot_time() -> float:
    if not _BOOT_TIME:
        with open("/proc/stat", "rb") as handle:
            line = next(row for row in handle if row.startswith(b"btime "))
        _BOOT_TIME.append(float(line.split()[1]))
    return _BOOT_TIME[0]


# --- memory ------------------------------------------------------------------------------------
def physical_memory() -> int:
    """The machine's RAM in bytes."""
    if linux_fast_paths():
        with contextlib.suppress(ValueError, OSError):
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    import psutil

    return int(psutil.virtual_memory().total)


def oom_kills() -> int | None:
    """How many processes the Linux kernel has ended for lack of memory since boot; None where
    it does not say (macOS, whose jetsam keeps no such count; an older kernel; the portable
    lane)."""
    if linux_fast_paths():
        with contextlib.suppress(OSError, ValueError), open("/proc/vmstat", "rb") as handle:
            for line in handle:
                if line.startswith(b"oom_kill "):
                    return int(line.split()[1])
    return None


# --- the CPU -----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def cpu_description() -> str:
    """What a native llama.cpp build depends on, as one line: the architecture, the CPU's model
    and its instruction features. Equal on one machine from run to run (it keys recorded engine
    checks); the Linux fast path and `lscpu` give the same line."""
    import platform

    text = platform.machine()
    if linux_fast_paths():
        with contextlib.suppress(OSError), \
                open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            return text + _cpu_lines(handle.read(), ("model name", "flags", "Features"))
    if sys.platform == "darwin":
        return text + _darwin_cpu()
    # Another Unix, or Linux in the portable lane: util-linux's lscpu, which words the model
    # and the flags as /proc/cpuinfo does.
    return text + _cpu_lines(_run(["lscpu"]), ("Model name", "Flags"))


@functools.lru_cache(maxsize=1)
def native_cpu() -> str:
    """The CPU's own architecture ('arm64', 'x86_64'). Under Rosetta platform.machine() says
    x86_64 on Apple Silicon; the kernel's version string still names its ARM64 kernel
    ('…/RELEASE_ARM64_T6000')."""
    import platform

    if sys.platform == "darwin" and "ARM64" in os.uname().version:
        return "arm64"
    return platform.machine()


def _cpu_lines(text: str, keys: tuple[str, ...]) -> str:
    """'|model|flags' from `name: value` lines, up to the first line of flags."""
    found = ""
    for line in text.splitlines():
        if line.startswith(keys):
            found += "|" + line.split(":", 1)[-1].strip()
            if line.startswith(keys[1:]):
                break
    return found


def _darwin_cpu() -> str:
    """'|brand|features': `sysctl machdep.cpu.brand_string hw.optional`. The features are the
    hw.optional entries set to 1: arm.FEAT_* (dot products, i8mm, bf16, SME) on Apple Silicon,
    avx2_0, avx512f... on an Intel Mac, the same names llama.cpp's own CPU check reads."""
    brand, features = "", []
    for line in _run(["sysctl", "machdep.cpu.brand_string", "hw.optional"]).splitlines():
        name, _, value = line.partition(":")
        value = value.strip()
        if name == "machdep.cpu.brand_string":
            brand = value
        elif name.startswith("hw.optional.") and value == "1":
            features.append(name.removeprefix("hw.optional."))
    return f"|{brand}|{' '.join(sorted(features))}"


def _run(argv: list[str]) -> str:
    import subprocess

    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


# --- open files --------------------------------------------------------------------------------
def raise_open_files_limit() -> tuple[int, int]:
    """Raise this process's soft limit on open files as far as the system allows; its children
    inherit it. macOS starts programs at 256 (Terminal and launchd alike), and the front holds two
    sockets per request. Returns (before, after)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = resource.RLIM_INFINITY
    if sys.platform == "darwin":  # setrlimit refuses RLIM_INFINITY there, and more than this
        wanted = [_darwin_max_files(), MACOS_OPEN_FILES]
        if hard != unlimited:
            wanted = [min(hard, limit) for limit in wanted]
    else:  # Linux: the hard limit, else the most its default fs.nr_open lets a process hold
        wanted = [hard if hard != unlimited else 1 << 20]
    for limit in wanted:
        if soft != unlimited and soft >= limit:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
            return soft, limit
        except (ValueError, OSError):
            continue
    return soft, soft


def _darwin_max_files() -> int:
    try:
        return int(_run(["sysctl", "-n", "kern.maxfilesperproc"]).strip())
    except ValueError:
        return MACOS_OPEN_FILES


# --- the portable lane's guard -----------------------------------------------------------------
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_GUARDED_EVENTS = frozenset({"open", "os.listdir", "os.scandir"})
_INSTALLED: list[bool] = []


def install_guard() -> None:
    """Make model_serve's own code find no /proc or /sys, as on macOS, whenever the fast paths
    are off (MODEL_SERVE_PORTABLE=1, or a test that sets sys.platform). Libraries keep them:
    psutil reads /proc on Linux as it reads sysctl on macOS. Once per process (audit hooks
    cannot be removed; the hook looks at the switch each time)."""
    if _INSTALLED:
        return
    sys.addaudithook(functools.partial(_refuse_linux_sources, os.path.dirname(os.__file__)))
    _INSTALLED.append(True)


def _linux_source(path: str) -> bool:
    return any(path == root or path.startswith(root + "/") for root in ("/proc", "/sys"))


def _refuse_linux_sources(stdlib: str, event: str, args: tuple) -> None:
    if event not in _GUARDED_EVENTS or not args:
        return
    path = args[0]
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, str) or not _linux_source(path) or linux_fast_paths():
        return
    # The first frame outside the standard library says who asked: pathlib or io on behalf of
    # model_serve is model_serve.
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(("<", stdlib)) or "-packages" in name:
            break
        frame = frame.f_back
    if frame is None or not frame.f_code.co_filename.startswith(_PACKAGE):
        return
    where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
    report = os.environ.get(REFUSALS_VARIABLE)
    if report:
        with contextlib.suppress(OSError), open(report, "a", encoding="utf-8") as handle:
            handle.write(f"{os.getpid()} {event} {path} from {where}\n")
    raise FileNotFoundError(2, f"No such file or directory (the portable lane: {where})", path)
