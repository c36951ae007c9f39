"""Models admitted here count at least at their estimate until the memory reading shows them.

Right after a load a model server has not touched all it will hold, so a reading taken then
under-counts it: two loads in a row could each see room that only one of them has. Each
load therefore leaves a floor, the memory in use it was admitted at plus its estimate; the
reading admission judges by is never below a live floor. A floor ends when the reading
reaches it (the model's memory shows), and when its model is no longer in memory. A model
that was in memory when a later one was admitted and has gone since takes its estimate out
of that later floor."""

from __future__ import annotations

from dataclasses import dataclass, replace

from model_serve.runtime.memory import MemoryReading


@dataclass
class Floor:
    engine_id: str
    bytes: int
    estimate: int
    beneath: dict[str, int]  # the models in memory when it was admitted, and their estimates


class Settling:
    def __init__(self) -> None:
        self.floors: list[Floor] = []

    def admitted(self, engine_id: str, estimate: int, counted: MemoryReading,
                 in_memory: dict[str, int]) -> None:
        """`engine_id` loads now, admitted at `counted` (the reading as counted here) with
        `in_memory` (each model in memory then, with its estimate)."""
        self.floors = [f for f in self.floors if f.engine_id != engine_id]
        self.floors.append(Floor(engine_id, counted.used + estimate, estimate,
                                 {k: v for k, v in in_memory.items() if k != engine_id}))

    def counted(self, reading: MemoryReading, in_memory: set[str]) -> MemoryReading:
        """`reading` with every live floor under it; floors that ended are dropped."""
        kept: list[Floor] = []
        for floor in self.floors:
            if floor.engine_id not in in_memory:
                continue
            gone = [name for name in floor.beneath if name not in in_memory]
            for name in gone:
                floor.bytes -= floor.beneath.pop(name)
            if reading.used >= floor.bytes:
                continue  # its memory shows in the reading now
            kept.append(floor)
        self.floors = kept
        highest = max((f.bytes for f in kept), default=0)
        return reading if highest <= reading.used else replace(reading, used=highest)
