"""An Intel-only llama-server or llama-swap on an Apple Silicon Mac (an old Intel Homebrew's
/usr/local/bin) is refused with the fix; a universal one with an arm64 slice is taken. The
Mach-O headers are written here byte for byte as <mach-o/loader.h> and <mach-o/fat.h> lay them
out; the machine is given as an argument, so the Mac's path runs on Linux."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from model_serve.engines.llama_server import resolve_llama_server
from model_serve.engines.llama_swap import resolve_llama_swap
from model_serve.errors import EngineError
from model_serve.machine_code import (
    Machine,
    mach_o_cpus,
    program_cpus,
    refuse_foreign,
    this_machine,
)

X86_64, ARM64, I386 = 0x01000007, 0x0100000C, 7
APPLE_SILICON = Machine("darwin", "arm64")
INTEL_MAC = Machine("darwin", "x86_64")


def thin(cputype: int, order: str = "<", magic: int = 0xFEEDFACF) -> bytes:
    """mach_header_64: magic, cputype, cpusubtype, filetype (MH_EXECUTE), ncmds, sizeofcmds,
    flags, reserved; in the CPU's byte order."""
    return struct.pack(order + "IiiIIIII", magic, cputype, 3, 2, 0, 0, 0, 0) + b"\0" * 64


def fat(*cputypes: int, wide: bool = False) -> bytes:
    """fat_header then one fat_arch (or fat_arch_64) per slice, big-endian; the slices follow."""
    head = struct.pack(">II", 0xCAFEBABF if wide else 0xCAFEBABE, len(cputypes))
    for index, cputype in enumerate(cputypes):
        offset = 0x4000 * (index + 1)
        head += (struct.pack(">iiQQII", cputype, 3, offset, 0x4000, 14, 0) if wide else
                 struct.pack(">iiIII", cputype, 3, offset, 0x4000, 14))
    body = bytearray(head + b"\0" * (0x4000 * (len(cputypes) + 1) - len(head)))
    for index, cputype in enumerate(cputypes):
        slice_at = 0x4000 * (index + 1)
        body[slice_at:slice_at + 96] = thin(cputype)[:96]
    return bytes(body)


def program(folder: Path, name: str, content: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(content)
    path.chmod(0o755)
    return path


@pytest.mark.parametrize(("head", "cpus"), [
    (thin(X86_64), ["x86_64"]),
    (thin(ARM64), ["arm64"]),
    (thin(X86_64, ">"), ["x86_64"]),  # MH_CIGAM_64: the other byte order
    (thin(I386, magic=0xFEEDFACE), ["i386"]),
    (fat(X86_64, ARM64), ["x86_64", "arm64"]),
    (fat(X86_64, I386), ["x86_64", "i386"]),
    (fat(X86_64, ARM64, wide=True), ["x86_64", "arm64"]),
    (fat(0x0100000D), ["cputype 0x100000d"]),
    (b"\x7fELF\x02\x01\x01" + b"\0" * 57, None),
    (b"#!/bin/sh\nexec /usr/local/Cellar/llama.cpp/bin/llama-server \"$@\"\n", None),
    (struct.pack(">IHH", 0xCAFEBABE, 0, 52) + b"\0" * 64, None),  # a Java class file
    (struct.pack(">II", 0xCAFEBABE, 3) + b"\0" * 20, None),  # cut short: slices missing
    (b"\xcf\xfa", None),
])
def test_the_header_names_the_cpus(head: bytes, cpus: list[str] | None) -> None:
    assert mach_o_cpus(head) == cpus


def test_a_file_that_cannot_be_read_tells_nothing(tmp_path: Path) -> None:
    assert program_cpus(tmp_path / "absent") is None


def test_an_intel_llama_server_on_path_is_refused_on_apple_silicon(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    intel = program(tmp_path / "usr-local-bin", "llama-server", thin(X86_64))
    monkeypatch.setenv("PATH", str(intel.parent))
    with pytest.raises(EngineError) as refused:
        resolve_llama_server(None, machine=APPLE_SILICON)
    assert f"llama-server at {intel} is built for Intel Macs only (x86_64)" in refused.value.message
    assert "brew install llama.cpp" in refused.value.hint
    # Elsewhere the same file is what it was: an Intel Mac runs it, Linux never reads it.
    assert resolve_llama_server(None, machine=INTEL_MAC) == intel
    assert resolve_llama_server(None, machine=Machine("linux", "x86_64")) == intel


def test_a_universal_or_arm64_build_is_taken(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    for name, content in (("universal", fat(X86_64, ARM64)), ("wide", fat(X86_64, ARM64,
                                                                          wide=True)),
                          ("arm", thin(ARM64)), ("script", b"#!/bin/sh\nexit 0\n")):
        found = program(tmp_path / name, "llama-server", content)
        monkeypatch.setenv("PATH", str(found.parent))
        assert resolve_llama_server(None, machine=APPLE_SILICON) == found
        assert resolve_llama_server(found, machine=APPLE_SILICON) == found


def test_an_intel_llama_server_bin_is_refused_with_the_setting(tmp_path: Path) -> None:
    intel = program(tmp_path / "intel", "llama-server", fat(X86_64, I386))
    with pytest.raises(EngineError) as refused:
        resolve_llama_server(intel, machine=APPLE_SILICON)
    assert "(x86_64, i386)" in refused.value.message
    assert "point LLAMA_SERVER_BIN in .env at an arm64 build" in refused.value.hint


def test_an_intel_llama_swap_is_refused_and_the_fix_says_how(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    intel = program(tmp_path / "bin", "llama-swap", thin(X86_64))
    monkeypatch.setenv("PATH", str(intel.parent))
    with pytest.raises(EngineError) as refused:
        resolve_llama_swap(None, machine=APPLE_SILICON)
    assert "llama-swap at" in refused.value.message
    assert "brew tap mostlygeek/llama-swap && brew install llama-swap" in refused.value.hint
    with pytest.raises(EngineError) as refused:
        resolve_llama_swap(intel, machine=APPLE_SILICON)
    assert "LLAMA_SWAP_BIN" in refused.value.hint
    native = program(tmp_path / "native", "llama-swap", fat(ARM64, X86_64))
    assert resolve_llama_swap(native, machine=APPLE_SILICON) == native
    assert resolve_llama_swap(intel, machine=INTEL_MAC) == intel


def test_a_native_copy_elsewhere_is_named_in_the_fix(tmp_path: Path) -> None:
    """Both Homebrews installed: the arm64 one in /opt/homebrew is the fix to name."""
    intel = program(tmp_path / "usr-local-bin", "llama-server", thin(X86_64))
    native = program(tmp_path / "opt-homebrew-bin", "llama-server", thin(ARM64))
    with pytest.raises(EngineError) as refused:
        refuse_foreign(intel, "llama-server", "LLAMA_SERVER_BIN", False, APPLE_SILICON,
                       "llama.cpp", "brew install llama.cpp", (intel, native))
    assert refused.value.hint.startswith(f"set LLAMA_SERVER_BIN={native} in .env (or put "
                                         f"{native.parent} before {intel.parent} on PATH)")
    assert "brew install" not in refused.value.hint


def test_apple_silicon_is_known_under_rosetta_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Python run under Rosetta hears 'x86_64' from platform.machine(); the kernel's version
    string (as `uname -v` prints it on an M1 Pro) still says ARM64. An Intel Mac's does not."""
    import os
    import platform
    import sys

    from model_serve import machine

    kernel = ("Darwin Kernel Version 23.4.0: Fri Mar 15 00:10:42 PDT 2024; "
              "root:xnu-10063.101.17~1/RELEASE_{}")
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    try:
        for version, apple_silicon in ((kernel.format("ARM64_T6000"), True),
                                       (kernel.format("X86_64"), False)):
            monkeypatch.setattr(os, "uname", lambda v=version: os.uname_result(
                ("Darwin", "mac", "23.4.0", v, "x86_64")))
            machine.native_cpu.cache_clear()
            assert this_machine().apple_silicon is apple_silicon
    finally:
        machine.native_cpu.cache_clear()
