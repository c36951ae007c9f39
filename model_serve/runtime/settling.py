"""Models admitted here count at least at their estimate until the memory reading shows them.

Right after a load a model server has not touched all it will hold, so a reading taken then
under-counts it: two loads in a row could each see room that only one of them has. Each
load therefore leaves a floor, the memory in use it was admitted at plus its estimate; the
reading admission judges by is never below a live floor. A floor ends when the reading
reaches it (the model's memory shows), and when its model is no longer in memory. A model
that was in memory when a later one was admitted and has gone since takes its estimate out
of that later floor.

A floor follows what other programs give back meanwhile, for as long as they keep it given
back: a model that is loading only adds to the reading, so a reading below the one its
admission was judged on is memory others freed (or a model gone, whose estimate already came
out), and the floor is that much lower while the reading stays there. Otherwise a floor whose
model's memory never shows whole (its weights mapped from the file, page cache on Linux)
would keep what a closed app freed counted as used for as long as the model stays loaded. A
reading that rises again is not taken for the model's own memory showing: it may be the
others' coming back (a browser's tabs, a build), and a floor that stayed down would then let
in a model that does not fit, the very thing floors are for."""

from __future__ import annotations

from dataclasses import dataclass, replace

from model_serve.runtime.memory import MemoryReading


@dataclass
class Floor:
    engine_id: str
    bytes: int
    estimate: int
    beneath: dict[str, int]  # the models in memory when it was admitted, and their estimates
    base: int  # the raw reading it was admitted at
    credit: int = 0  # the estimates of models gone since (already out of `bytes`)


class Settling:
    def __init__(self) -> None:
        self.floors: list[Floor] = []
        self.last: MemoryReading | None = None  # the raw reading `counted` was last given

    def admitted(self, engine_id: str, estimate: int, counted: MemoryReading,
                 in_memory: dict[str, int]) -> None:
        """`engine_id` loads now, admitted at `counted` (the reading as counted here, from
        the raw one `counted` was last given) with `in_memory` (each model in memory then,
        with its estimate)."""
        self.floors = [f for f in self.floors if f.engine_id != engine_id]
        raw = self.last.used if self.last is not None else counted.used
        self.floors.append(Floor(engine_id, counted.used + estimate, estimate,
                                 {k: v for k, v in in_memory.items() if k != engine_id}, raw))

    def counted(self, reading: MemoryReading, in_memory: set[str]) -> MemoryReading:
        """`reading` with every live floor under it; floors that ended are dropped."""
        self.last = reading
        kept: list[Floor] = []
        levels: list[int] = []
        for floor in self.floors:
            if floor.engine_id not in in_memory:
                continue
            gone = [name for name in floor.beneath if name not in in_memory]
            for name in gone:
                estimate = floor.beneath.pop(name)
                floor.bytes -= estimate
                floor.credit += estimate
            # Below the admission's reading now, past what gone models give back: freed by
            # others, off the floor while it stays freed.
            freed = max(0, floor.base - reading.used - floor.credit)
            if freed == 0 and reading.used >= floor.bytes:
                continue  # its memory shows in the reading now
            kept.append(floor)
            levels.append(floor.bytes - freed)
        self.floors = kept
        highest = max(levels, default=0)
        return reading if highest <= reading.used else replace(reading, used=highest)
