"""Metal's working-set limit on Apple Silicon: how much memory the GPU may wire, and whether
the models loaded together stay under it.

llama-server puts every layer in Metal buffers, and checks Metal's
`recommendedMaxWorkingSetSize` for its own process only: several model servers together can
pass it, which ends in GPU out-of-memory errors (kIOGPUCommandBufferCallbackErrorOutOfMemory)
or thrashing. No command prints that size. It is, in order:
- `sysctl iogpu.wired_limit_mb` when the user set it (0 means unset; it resets at reboot);
- what llama-server reports for its Metal device (`--list-devices`: "MTL0: Apple M4 (25559 MiB,
  25557 MiB free)", the total being recommendedMaxWorkingSetSize; its start log also prints
  "recommendedMaxWorkingSetSize  = 26800.60 MB"), read once per binary and cached;
- else macOS's usual default: about 2/3 of RAM up to 36 GiB, 3/4 above.
The decision is a pure function of these figures, tested with recorded values on Linux.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from model_serve.engines.base import LOADED_STATES, EngineModel
from model_serve.engines.engine_check import binary_stamp
from model_serve.fileio import write_if_changed
from model_serve.machine_code import Machine, this_machine

MIB, GIB = 2**20, 2**30
LARGE_RAM = 36 * GIB  # above this macOS lets the GPU wire 3/4 of RAM, below about 2/3
RESERVE = 4 * GIB  # at least this much stays macOS's when a larger limit is suggested
CACHE_NAME = "metal-device.json"
DEFAULT_SOURCE = "macOS's usual default"
HOLDING_STATES = LOADED_STATES - {"sleeping"}
REPORT_TIMEOUT = 60.0  # seconds `llama-server --list-devices` may take (Metal's first start)
# After a report that did not come (hung, or could not start), the default share is used for
# this long before the program is asked again: admission asks at every poll, under its lock.
UNANSWERED_RETRY = 600.0
_UNANSWERED: dict[str, float] = {}  # binary stamp -> when its report last failed (monotonic)
# `llama-server --list-devices`: "  MTL0: Apple M2 Pro (21845 MiB, 21845 MiB free)"; older
# builds name the device "Metal".
_DEVICE_LINE = re.compile(r"^\s*(MTL\d*|Metal)\s*: .*\((\d+) MiB, \d+ MiB free\)\s*$", re.M)
# ggml-metal's init log: "recommendedMaxWorkingSetSize  = 26800.60 MB" (MB of 10^6 bytes)
_LOG_LINE = re.compile(r"recommendedMaxWorkingSetSize\s*=\s*([\d.]+)\s*MB")


@dataclass(frozen=True)
class GpuLimit:
    """What the GPU may wire (bytes), where that figure comes from, and the RAM."""

    bytes: int
    source: str
    ram: int

    @property
    def guessed(self) -> bool:
        """Neither the user nor llama-server gave it (a llama-server without Metal?)."""
        return self.source.startswith(DEFAULT_SOURCE)


@dataclass(frozen=True)
class GpuShortfall:
    """A load that would pass the limit: why, in words, and the fix."""

    why: str
    fix: str


def default_working_set(ram: int) -> int:
    return ram * 2 // 3 if ram <= LARGE_RAM else ram * 3 // 4


def parse_device_report(text: str) -> int | None:
    """The Metal device's working-set size (bytes) in llama-server's --list-devices output or
    start log; None when neither names one (no Metal in this build)."""
    match = _DEVICE_LINE.search(text)
    if match:
        return int(match.group(2)) * MIB
    match = _LOG_LINE.search(text)
    return int(float(match.group(1)) * 1_000_000) if match else None


def parse_wired_limit(text: str) -> int:
    """`sysctl -n iogpu.wired_limit_mb` -> MiB; 0 when unset or not a number."""
    try:
        return max(0, int(text.strip()))
    except ValueError:
        return 0


def choose_limit(wired_limit_mb: int, reported: int | None, ram: int) -> GpuLimit:
    if wired_limit_mb > 0:
        return GpuLimit(wired_limit_mb * MIB, f"iogpu.wired_limit_mb={wired_limit_mb}", ram)
    if reported:
        return GpuLimit(reported, "Metal's recommendedMaxWorkingSetSize, as llama-server "
                        "reports it", ram)
    share = "2/3" if ram <= LARGE_RAM else "3/4"
    return GpuLimit(default_working_set(ram), f"{DEFAULT_SOURCE}, {share} of RAM", ram)


def held_by_others(models: Iterable[EngineModel], footprints: Mapping[str, int],
                   target: str) -> list[int]:
    """The footprints of the models other than `target` that hold Metal buffers: loading,
    loaded or still stopping. A sleeping model server (the router's) has freed its weights and
    KV cache; a model with no recorded footprint counts 0."""
    return [footprints.get(m.name, 0) for m in models
            if m.state in HOLDING_STATES and m.name != target]


def gpu_shortfall(limit: GpuLimit, loaded: Iterable[int], need: int) -> GpuShortfall | None:
    """None when `need` more bytes fit beside the `loaded` models' estimates under the limit;
    else why not and the fix."""
    held = sum(loaded)
    if held + need <= limit.bytes:
        return None
    gib = f"{limit.bytes / GIB:.1f} GiB"
    why = (f"the GPU's working-set limit is {gib} ({limit.source}), and "
           + (f"the loaded models' estimates ({held / GIB:.2f} GiB) plus this one "
              f"come to {(held + need) / GIB:.2f} GiB" if held else "this model alone passes it"))
    wanted_mb = -(-(held + need) // GIB) * 1024  # whole GiB, in MiB
    if wanted_mb * MIB > limit.ram - RESERVE:
        fix = (f"use a smaller quantization or context: {(held + need) / GIB:.1f} GiB is more "
               f"than the GPU of a Mac with {limit.ram / GIB:.0f} GiB of RAM can be given")
    else:
        fix = (f"raise the GPU's limit: sudo sysctl iogpu.wired_limit_mb={wanted_mb} (until "
               "the next restart; see 'Metal's working-set limit' in the README)")
    return GpuShortfall(why, fix)


# --- reading the figures on a Mac ----------------------------------------------------------
def read_wired_limit_mb() -> int:
    try:
        out = subprocess.run(["sysctl", "-n", "iogpu.wired_limit_mb"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return 0
    return parse_wired_limit(out.stdout) if out.returncode == 0 else 0


def device_report(binary: Path, cache_dir: Path,
                  timeout: float = REPORT_TIMEOUT) -> int | None:
    """parse_device_report of `binary --list-devices`, run once per binary file (path, size,
    mtime) and cached: Metal's start-up takes a moment, and the figure does not change while
    iogpu.wired_limit_mb is unset (the only case it is asked for). A report that did not come
    is not recorded, but not asked for again within UNANSWERED_RETRY either."""
    try:
        stamp = binary_stamp(binary)
    except OSError:
        return None
    cache = cache_dir / CACHE_NAME
    try:
        records = json.loads(cache.read_text(encoding="utf-8"))
        if not isinstance(records, dict):
            records = {}
    except (OSError, ValueError):
        records = {}
    if stamp in records and (records[stamp] is None or isinstance(records[stamp], int)):
        return records[stamp]
    failed = _UNANSWERED.get(stamp)
    if failed is not None and time.monotonic() - failed < UNANSWERED_RETRY:
        return None
    try:
        out = subprocess.run([str(binary), "--list-devices"], capture_output=True, text=True,
                             timeout=timeout, stdin=subprocess.DEVNULL)
        reported = parse_device_report(out.stdout + out.stderr)
    except (OSError, subprocess.SubprocessError):
        _UNANSWERED[stamp] = time.monotonic()  # not recorded: asked again after a while
        return None
    records[stamp] = reported
    with contextlib.suppress(OSError):  # only a cache
        write_if_changed(cache, json.dumps(records, indent=1))
    return reported


def read_gpu_limit(llama_server_bin: Path | None, cache_dir: Path,
                   machine: Machine | None = None) -> GpuLimit | None:
    """The limit on Apple Silicon, None elsewhere (Linux, Intel Macs: unified memory and this
    limit are Apple Silicon's). `llama_server_bin` is the LLAMA_SERVER_BIN setting."""
    if not (machine or this_machine()).apple_silicon:
        return None
    from model_serve.engines.llama_server import resolve_llama_server
    from model_serve.errors import ModelServeError
    from model_serve.machine import physical_memory

    wired = read_wired_limit_mb()
    reported = None
    if not wired:
        with contextlib.suppress(ModelServeError):  # no llama-server: the default share
            reported = device_report(resolve_llama_server(llama_server_bin, machine),
                                     cache_dir)
    return choose_limit(wired, reported, physical_memory())
