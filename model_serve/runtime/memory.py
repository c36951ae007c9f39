"""How full memory is, read the way each OS means it.

Linux: psutil's percent is (total - available) / total, which already leaves reclaimable cache
out. macOS: used is active + wired + the pages the compressor occupies, read from `vm_stat`.
Under pressure macOS compresses app memory, so active pages shrink while the compressor's grow;
leaving the compressor out would make the percent *drop* as pressure rises. Inactive and
speculative pages stay out: the kernel reclaims them without unloading anything. The kernel's
own pressure level (warn/critical) is read too; how far it may act is the unloader's call.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass

_MACOS_LEVELS = {1: "normal", 2: "warn", 4: "critical"}
KERNEL_LEVELS = ("warn", "critical")  # the levels at which macOS itself asks for memory back
_VM_STAT_PAGE_SIZE = re.compile(r"page size of (\d+) bytes")
_VM_STAT_LINE = re.compile(r'^"?([^":]+)"?:\s+(\d+)\.?\s*$')
# vm_stat's names of the pages counted as used on macOS (see the module docstring).
MACOS_USED_PAGES = ("Pages active", "Pages wired down", "Pages occupied by compressor")


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
    page_size, counts = parse_vm_stat(vm_stat_text)
    missing = [name for name in MACOS_USED_PAGES if name not in counts]
    if missing:
        raise ValueError(f"vm_stat output lacks {', '.join(missing)}")
    return page_size * sum(counts[name] for name in MACOS_USED_PAGES)


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
