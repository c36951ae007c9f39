"""How full memory is, read the way each OS means it.

Linux: psutil's percent is (total - available) / total, which already leaves reclaimable cache
out. macOS: psutil's figure counts inactive (reclaimable) pages as used, so app memory is taken
as active + wired, and the kernel's own pressure level (warn/critical) counts as over the line.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

_MACOS_LEVELS = {1: "normal", 2: "warn", 4: "critical"}


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
        if self.pressure_level in ("warn", "critical"):
            return True
        return self.percent_after(extra_bytes) >= threshold

    def describe(self) -> str:
        gib = 2**30
        text = f"{self.percent:.1f}% used ({self.used / gib:.1f} of {self.total / gib:.1f} GiB)"
        return text + (f", kernel pressure {self.pressure_level}" if self.pressure_level else "")


def macos_pressure_level() -> str | None:
    try:
        out = subprocess.run(["sysctl", "-n", "kern.memorystatus_vm_pressure_level"],
                             capture_output=True, text=True, timeout=2)
        return _MACOS_LEVELS.get(int(out.stdout.strip()))
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def read_memory() -> MemoryReading:
    import psutil

    vm = psutil.virtual_memory()
    if sys.platform == "darwin":
        used = int(getattr(vm, "active", 0) + getattr(vm, "wired", 0))
        return MemoryReading(vm.total, used, macos_pressure_level())
    return MemoryReading(vm.total, vm.total - vm.available)
