"""Which CPU a program's machine code is for, from its Mach-O header, and a refusal of an Intel
build on Apple Silicon.

An old Intel Homebrew leaves x86_64 programs in /usr/local/bin. On an Apple Silicon Mac they
still start (under Rosetta), but without native speed, and a llama.cpp built for Intel CPUs
may crash on instructions Rosetta lacks. A universal (fat) binary with an arm64 slice runs
natively and is fine. The header is read, never the program run, so this is tested on Linux
with crafted headers.
"""

from __future__ import annotations

import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from model_serve.errors import EngineError

# <mach-o/loader.h>, <mach-o/fat.h>, <mach/machine.h>
MH_MAGIC, MH_MAGIC_64 = 0xFEEDFACE, 0xFEEDFACF
FAT_MAGIC, FAT_MAGIC_64 = 0xCAFEBABE, 0xCAFEBABF
CPU_ARCH_ABI64, CPU_ARCH_ABI64_32 = 0x01000000, 0x02000000
CPU_NAMES = {
    7: "i386", 7 | CPU_ARCH_ABI64: "x86_64",
    12: "arm", 12 | CPU_ARCH_ABI64: "arm64", 12 | CPU_ARCH_ABI64_32: "arm64_32",
    18: "ppc", 18 | CPU_ARCH_ABI64: "ppc64",
}
# Java class files share 0xcafebabe; their version sits where the slice count would be (45+).
# Apple's `file` draws the same line.
MAX_FAT_ARCHS = 20
HEAD_BYTES = 8 + MAX_FAT_ARCHS * 32


@dataclass(frozen=True)
class Machine:
    """The platform (sys.platform) and the CPU's own architecture."""

    system: str
    cpu: str

    @property
    def apple_silicon(self) -> bool:
        return self.system == "darwin" and self.cpu == "arm64"


def this_machine() -> Machine:
    from model_serve.machine import native_cpu

    return Machine(sys.platform, native_cpu())


def mach_o_cpus(head: bytes) -> list[str] | None:
    """The architectures a Mach-O file holds code for (['x86_64'], ['x86_64', 'arm64']), from
    its first bytes; None when it is not a Mach-O file (a script, an ELF program)."""
    if len(head) < 8:
        return None
    (magic,) = struct.unpack(">I", head[:4])
    if magic in (FAT_MAGIC, FAT_MAGIC_64):  # fat headers are big-endian on every CPU
        (count,) = struct.unpack(">I", head[4:8])
        size = 20 if magic == FAT_MAGIC else 32  # fat_arch / fat_arch_64
        if not 0 < count <= MAX_FAT_ARCHS or len(head) < 8 + count * size:
            return None
        return [_cpu_name(struct.unpack_from(">i", head, 8 + i * size)[0])
                for i in range(count)]
    for order in ("<", ">"):  # a thin file is in its CPU's byte order
        (magic,) = struct.unpack(order + "I", head[:4])
        if magic in (MH_MAGIC, MH_MAGIC_64):
            return [_cpu_name(struct.unpack(order + "i", head[4:8])[0])]
    return None


def _cpu_name(cputype: int) -> str:
    return CPU_NAMES.get(cputype & 0xFFFFFFFF, f"cputype {cputype & 0xFFFFFFFF:#x}")


def program_cpus(path: Path) -> list[str] | None:
    """mach_o_cpus of the file at `path` (links followed); None when unreadable."""
    try:
        with open(path, "rb") as handle:
            return mach_o_cpus(handle.read(HEAD_BYTES))
    except OSError:
        return None


def foreign_code(path: Path, machine: Machine) -> list[str] | None:
    """The architectures of a program that cannot run natively on `machine` (an Intel-only
    build on Apple Silicon); None when it can, or when the header does not tell."""
    if not machine.apple_silicon:
        return None
    cpus = program_cpus(path)
    return cpus if cpus and "arm64" not in cpus else None


def refuse_foreign(path: Path, program: str, setting: str, configured: bool, machine: Machine,
                   formula: str, install: str, alternatives: tuple[Path, ...] = ()) -> None:
    """Raise with the fix when `path`, the `program` found (from `setting` when `configured`,
    else on PATH), is an Intel-only build on Apple Silicon. `formula` is its Homebrew name,
    `install` how to get the arm64 one; `alternatives` other places a native copy may be."""
    cpus = foreign_code(path, machine)
    if cpus is None:
        return
    fixes = []
    native = next((p for p in alternatives if p != path and p.is_file()
                   and os.access(p, os.X_OK) and foreign_code(p, machine) is None), None)
    if native is not None:
        fixes.append(f"set {setting}={native} in .env"
                     + ("" if configured else f" (or put {native.parent} before "
                                              f"{path.parent} on PATH)"))
    elif configured:
        fixes.append(f"point {setting} in .env at an arm64 build, or unset it")
    if str(path).startswith("/usr/local/"):
        fixes.append("uninstall the Intel copy with the Intel Homebrew that left it: "
                     f"arch -x86_64 /usr/local/bin/brew uninstall {formula} (or delete {path})")
    elif not configured:
        fixes.append(f"remove {path} or take its folder off PATH")
    if native is None:
        fixes.append(f"install the arm64 one with Homebrew in /opt/homebrew: {install}")
    raise EngineError(f"{program} at {path} is built for Intel Macs only "
                      f"({', '.join(cpus)}), and this Mac has Apple Silicon: under Rosetta "
                      "it runs slowly, or crashes on instructions Rosetta lacks",
                      "; ".join(fixes))
