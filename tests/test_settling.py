"""Admission's floors (runtime/settling.py): a model admitted here counts at least at its
estimate until the reading shows it, and no longer once it is out of memory."""

from __future__ import annotations

from model_serve.runtime.memory import MemoryReading
from model_serve.runtime.settling import Settling

GIB = 2**30


def reading(used_gib: float) -> MemoryReading:
    return MemoryReading(total=24 * GIB, used=int(used_gib * GIB))


def test_a_just_loaded_model_counts_at_its_estimate_until_the_reading_shows_it() -> None:
    settling = Settling()
    settling.admitted("a", GIB, reading(2), {})
    # Just after the load the reading shows a tenth of it: counted at 2 + 1 GiB.
    assert settling.counted(reading(2.1), {"a"}).used == 3 * GIB
    # The second load is admitted on that count: its floor is 3 + 1 GiB.
    settling.admitted("b", GIB, settling.counted(reading(2.2), {"a"}), {"a": GIB})
    assert settling.counted(reading(2.3), {"a", "b"}).used == 4 * GIB
    # Once the reading reaches a floor it is the reading that counts.
    assert settling.counted(reading(4.5), {"a", "b"}).used == int(4.5 * GIB)
    assert settling.floors == []


def test_a_model_gone_takes_its_floor_and_its_share_of_later_floors() -> None:
    settling = Settling()
    settling.admitted("a", GIB, reading(2), {})
    settling.admitted("b", GIB, reading(3), {"a": GIB})
    # a is unloaded: b's floor no longer holds a's estimate.
    assert settling.counted(reading(2.2), {"b"}).used == 3 * GIB
    # b is unloaded too: nothing is added to the reading.
    assert settling.counted(reading(2.2), set()).used == int(2.2 * GIB)
    assert settling.floors == []


def test_a_model_admitted_again_has_one_floor() -> None:
    settling = Settling()
    settling.admitted("a", GIB, reading(2), {})
    settling.admitted("a", 2 * GIB, reading(2), {})
    assert [f.bytes for f in settling.floors] == [4 * GIB]
