"""How full memory is, read the way each OS means it.

Linux: psutil's percent is (total - available) / total, which already leaves reclaimable cache
out.

macOS (`vm_stat`): used is active + wired pages + the compressor's pages + part of what the
compressor saved. Inactive and speculative pages (the file cache) stay out: the kernel
reclaims them without unloading anything.

Compressed memory is demand: the apps whose pages macOS compressed take them back at their
original size when they touch them. Counting only the pages the compressor occupies made the
percent *fall* as macOS compresses (a page compressed 2:1 frees half a page) just when memory
runs short. So the compressor's saving ("stored" - "occupied" pages) counts too, with two
bounds, because a calm Mac's compressor can store more than its RAM (idle apps compressed,
then swapped out, over days) and counting all of it would read 150% with nothing pressing:
- up to the free pages. Compressing moves exactly the saving into the free pages, so while
  this bound or none applies, the percent holds steady as macOS compresses. Free memory
  beyond the saving is free, and the cache is never counted, so a Mac with long-idle
  compressed apps reads at most everything but its cache;
- up to the compressor's own pages (a 2:1 saving). Past that the compressor holds mostly cold
  memory, and without this bound a big app quitting (many free pages at once) would read as
  pressure. While this bound applies, compressing at better than 2:1 lowers the percent a
  little, still much less than without the saving.
The price of the first bound: pages an unload frees count toward the saving until a bound is
reached, so while the compressor's saving exceeds the free pages, the percent falls by less
than the model's size (the compressed apps may take those pages back); the unloader re-reads
after each unload and may take one model more than a plain count would.
The kernel's own pressure level (warn/critical) is read too and acts whatever the percent
says; how far it may act is the unloader's call.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

_MACOS_LEVELS = {1: "normal", 2: "warn", 4: "critical"}
KERNEL_LEVELS = ("warn", "critical")  # the levels at which macOS itself asks for memory back
_VM_STAT_PAGE_SIZE = re.compile(r"page size of (\d+) bytes")
_VM_STAT_LINE = re.compile(r'^"?([^":]+)"?:\s+(\d+)\.?\s*$')
# vm_stat's names of the pages read on macOS (see the module docstring).
MACOS_USED_PAGES = ("Pages active", "Pages wired down", "Pages occupied by compressor")
MACOS_PAGES = (*MACOS_USED_PAGES, "Pages stored in compressor", "Pages free")


@dataclass(frozen=True)
class MemoryReading:
    total: int
    used: int  # bytes that cannot be reclaimed without unloading something
    pressure_level: str | None = None  # macOS kernel level, None elsewhere

    @property
    def percent(self) -> float:
        return 100.0 * self.used / self.total if self.total else 0.0

    def percent_after(self, extra_bytes: int) -> float:
        return 100.0 * (self.used + extra_bytes) / self.total if self.total else 0.0

    def over(self, threshold: float, extra_bytes: int = 0) -> bool:
        """Over the line by the percent alone; the kernel level is `kernel_asks`."""
        return self.percent_after(extra_bytes) >= threshold

    @property
    def kernel_asks(self) -> bool:
        """macOS reports warn or critical pressure (it lags behind what unloads free)."""
        return self.pressure_level in KERNEL_LEVELS

    def describe(self) -> str:
        gib = 2**30
        text = f"{self.percent:.1f}% used ({self.used / gib:.1f} of {self.total / gib:.1f} GiB)"
        return text + (f", kernel pressure {self.pressure_level}" if self.pressure_level else "")


def parse_vm_stat(text: str) -> tuple[int, dict[str, int]]:
    """(page size, {line name: page count}) from `vm_stat`'s output."""
    match = _VM_STAT_PAGE_SIZE.search(text)
    if not match:
        raise ValueError("vm_stat output has no 'page size of N bytes' header")
    counts = {}
    for line in text.splitlines()[1:]:
        field = _VM_STAT_LINE.match(line.strip())
        if field:
            counts[field.group(1).strip()] = int(field.group(2))
    return int(match.group(1)), counts


def macos_used_bytes(vm_stat_text: str) -> int:
    """Bytes in use on macOS, compressed memory partly at its original size (module docstring)."""
    page_size, counts = parse_vm_stat(vm_stat_text)
    missing = [name for name in MACOS_PAGES if name not in counts]
    if missing:
        raise ValueError(f"vm_stat output lacks {', '.join(missing)}")
    occupied = counts["Pages occupied by compressor"]
    saving = max(0, counts["Pages stored in compressor"] - occupied)
    counted_saving = min(saving, counts["Pages free"], occupied)
    return page_size * (sum(counts[name] for name in MACOS_USED_PAGES) + counted_saving)


def macos_pressure_level(sysctl_output: str | None = None) -> str | None:
    """The kernel's level from `sysctl -n kern.memorystatus_vm_pressure_level` (1, 2 or 4)."""
    try:
        if sysctl_output is None:
            sysctl_output = subprocess.run(
                ["sysctl", "-n", "kern.memorystatus_vm_pressure_level"],
                capture_output=True, text=True, timeout=2).stdout
        return _MACOS_LEVELS.get(int(sysctl_output.strip()))
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def _macos_used(vm) -> int:
    try:
        text = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=2).stdout
        return macos_used_bytes(text)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        # psutil's available is free + inactive, so this still counts the compressor.
        return int(vm.total - vm.available)


def read_memory() -> MemoryReading:
    import psutil

    vm = psutil.virtual_memory()
    if sys.platform == "darwin":
        return MemoryReading(vm.total, _macos_used(vm), macos_pressure_level())
    return MemoryReading(vm.total, vm.total - vm.available)


def private_bytes(pid: int) -> int:
    """What process `pid` holds of its own: resident minus shared on Linux (a model file's
    mapped pages are page cache, which `used` leaves out), resident elsewhere (macOS reports
    no shared part); 0 for a process that has gone."""
    import psutil

    try:
        info = psutil.Process(pid).memory_info()
    except psutil.Error:
        return 0
    return max(0, info.rss - getattr(info, "shared", 0))


@dataclass(frozen=True)
class StackMemory:
    """What the stack's own processes hold: its model servers (children of the engine), and
    everything of the stack (supervisor, front, engine, unloader, model servers)."""

    servers: int = 0  # how many model-server processes are alive
    servers_bytes: int = 0
    stack_bytes: int = 0


def read_stack_memory(pid_file: Path) -> StackMemory:
    """From the supervisor's state file; empty when no stack runs there."""
    from model_serve.runtime.procs import descendants
    from model_serve.runtime.state import read_state

    state = read_state(pid_file)
    if state is None:
        return StackMemory()
    engine = state.child("engine").pid
    servers = descendants(engine) if engine is not None else []
    held = [private_bytes(ref.pid) for ref in servers]
    held = [bytes_ for bytes_ in held if bytes_ > 0]  # zombies and gone ones hold nothing
    stack = [*state.owned(), *servers]
    return StackMemory(len(held), sum(held),
                       sum(private_bytes(pid) for pid in {ref.pid for ref in stack}))
