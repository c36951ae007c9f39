"""macOS logic that runs the same on Linux: memory read from `vm_stat` and `sysctl` output
(laid out as those programs print it, with the figures of a 32 GiB Apple Silicon Mac), and
decisions taken from such readings."""

from __future__ import annotations

import pytest

from model_serve.memory import (
    MemoryReading,
    macos_pressure_level,
    macos_used_bytes,
    parse_vm_stat,
)

GIB = 2**30
TOTAL = 32 * GIB
PAGE = 16384


def vm_stat(active: int, wired: int, compressor: int, inactive: int, stored: int = 0) -> str:
    """`vm_stat` output with these page counts (16 KiB pages); free pages are the rest."""
    free = TOTAL // PAGE - (active + wired + compressor + inactive + 4210)
    return f"""Mach Virtual Memory Statistics: (page size of {PAGE} bytes)
Pages free:                               {free}.
Pages active:                             {active}.
Pages inactive:                           {inactive}.
Pages speculative:                          4210.
Pages throttled:                               0.
Pages wired down:                         {wired}.
Pages purgeable:                            1877.
"Translation faults":                  912830112.
Pages copy-on-write:                    18734523.
Pages zero filled:                     402371245.
Pages reactivated:                       3320148.
Pages purged:                             811294.
File-backed pages:                        301233.
Anonymous pages:                          {active + inactive - 301233}.
Pages stored in compressor:               {stored}.
Pages occupied by compressor:             {compressor}.
Decompressions:                          2291842.
Compressions:                            4012773.
Pageins:                                 9012345.
Pageouts:                                  10234.
Swapins:                                       0.
Swapouts:                                      0.
"""


# Pressure rises: a model server wires 3.5 GiB more, macOS compresses 6 GiB of app memory into
# 3.25 GiB more of compressor pages, and free pages fall from 2.7 to 1.9 GiB.
BEFORE = vm_stat(active=1_048_576, wired=655_360, compressor=16_384, inactive=196_608)
UNDER_PRESSURE = vm_stat(active=655_360, wired=884_736, compressor=229_376, inactive=196_608,
                         stored=393_216)


def test_vm_stat_parses_page_size_and_counts() -> None:
    page_size, counts = parse_vm_stat(BEFORE)
    assert page_size == 16384
    assert counts["Pages active"] == 1_048_576
    assert counts["Translation faults"] == 912830112
    assert counts["Pages occupied by compressor"] == 16_384
    assert counts["Pages free"] == 176_014


def test_used_counts_active_wired_and_the_compressor() -> None:
    assert macos_used_bytes(BEFORE) == (1_048_576 + 655_360 + 16_384) * PAGE
    assert macos_used_bytes(BEFORE) / TOTAL == pytest.approx(0.8203, abs=1e-3)


def test_compression_under_pressure_raises_the_percent() -> None:
    before = MemoryReading(TOTAL, macos_used_bytes(BEFORE))
    after = MemoryReading(TOTAL, macos_used_bytes(UNDER_PRESSURE))
    assert after.percent > before.percent > 75
    assert after.percent == pytest.approx(84.4, abs=0.1)
    # Active + wired alone (the reading before the compressor counted) fell under the line.
    pages = parse_vm_stat(UNDER_PRESSURE)[1]
    assert (pages["Pages active"] + pages["Pages wired down"]) * PAGE / TOTAL < 0.75


def test_the_page_size_comes_from_the_header() -> None:
    intel = BEFORE.replace("page size of 16384 bytes", "page size of 4096 bytes")
    assert macos_used_bytes(intel) == macos_used_bytes(BEFORE) // 4


@pytest.mark.parametrize("text", ["", "Pages active: 12.\n",
                                  "Mach Virtual Memory Statistics: (page size of 4096 bytes)\n"
                                  "Pages active: 1.\n"])
def test_unusable_vm_stat_output_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        macos_used_bytes(text)


@pytest.mark.parametrize(("output", "level"), [("1\n", "normal"), ("2\n", "warn"),
                                               ("4\n", "critical"), ("", None), ("7", None)])
def test_kernel_pressure_level(output: str, level: str | None) -> None:
    assert macos_pressure_level(output) == level
    reading = MemoryReading(TOTAL, TOTAL // 2, level)
    assert reading.kernel_asks == (level in ("warn", "critical"))
    assert not reading.over(75), "the level alone never makes the percent over the line"
