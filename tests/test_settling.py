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


def test_memory_other_programs_free_meanwhile_comes_off_a_floor() -> None:
    """A floor is no absolute level: an app closed while the model settles gives its memory
    back to the count, though the model's own memory has not shown whole (its weights are
    page cache on Linux: it may never show)."""
    settling = Settling()
    settling.counted(reading(10), set())
    settling.admitted("a", 4 * GIB, reading(10), {})
    assert settling.counted(reading(10.5), {"a"}).used == 14 * GIB  # a shows 0.5 GiB
    # Another program frees 2 GiB: the reading falls 1.5 GiB below the admission's (10).
    assert settling.counted(reading(8.5), {"a"}).used == int(12.5 * GIB)
    assert settling.counted(reading(8.6), {"a"}).used == int(12.6 * GIB)
    # Once the reading is back up, the floor is whole again; it ends when the reading reaches it.
    assert settling.counted(reading(13.9), {"a"}).used == 14 * GIB
    assert settling.counted(reading(14.1), {"a"}).used == int(14.1 * GIB)
    assert settling.floors == []


def test_memory_others_take_back_goes_back_on_the_floor() -> None:
    """A dip of other programs' memory (a browser freeing and taking again) while a model
    settles does not lower its floor for good: a rise after it may be theirs, not the model's.
    Else a second model is admitted on a count 2 GiB short, and then a third that does not
    fit."""
    settling = Settling()
    settling.counted(reading(10), set())
    settling.admitted("a", 4 * GIB, reading(10), {})
    assert settling.counted(reading(8), {"a"}).used == 12 * GIB  # others freed 2 GiB
    # They take it back; a shows 0.5 GiB: others 10, a 4 once settled.
    counted = settling.counted(reading(10.5), {"a"})
    assert counted.used == 14 * GIB
    settling.admitted("b", 4 * GIB, counted, {"a": 4 * GIB})
    assert settling.counted(reading(11), {"a", "b"}).used == 18 * GIB


def test_a_gone_model_is_taken_off_a_floor_once() -> None:
    """Its estimate comes off when the engine no longer lists it; its memory coming back in
    the readings after that does not come off a second time."""
    settling = Settling()
    settling.counted(reading(3), {"a"})
    settling.admitted("b", GIB, reading(4), {"a": GIB})  # counted 4: a's floor, say
    assert settling.counted(reading(3), {"b"}).used == 4 * GIB  # a gone: 5 - 1
    assert settling.counted(reading(2.2), {"b"}).used == 4 * GIB  # a's 0.8 GiB came back
    # 0.5 GiB more: up to a's estimate it may still be a's (0.2), the rest others' (0.3).
    assert settling.counted(reading(1.7), {"b"}).used == int(3.7 * GIB)
