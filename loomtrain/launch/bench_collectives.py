"""Collectives per step, counted the same way for loomtrain and every peer.

The count is `loomtrain.runtime.collectives`' (torch's flight recorder, which the launcher turns
on before any process group exists): every collective a process group issues is recorded,
whoever issued it (FSDP2's all-gathers and reduce-scatters, DeepSpeed's own calls, loomtrain's
loss and token all-reduces), so one mechanism sits below every framework and the numbers compare.
The benchmark reads it after each step, outside the timed region, so counting costs the step
nothing; a step's count is the difference from the previous reading.

`counter()` picks the mechanism; another (a profiler, say) plugs in by implementing `Counter`.
"""
from __future__ import annotations

from loomtrain.runtime.collectives import CollectiveCounter


class Counter:
    """Collectives issued by this process since the previous `read()` (None when unknown)."""

    name = "none"

    def read(self) -> int | None:
        return None


class FlightRecorderCounter(Counter):
    """Counts through `CollectiveCounter` (see the module docstring)."""

    name = "flight_recorder"

    def __init__(self) -> None:
        self._counter = CollectiveCounter() if CollectiveCounter.available() else None
        self._mark = self._counter.mark() if self._counter is not None else None

    def read(self) -> int | None:
        if self._counter is None:
            return None
        count = self._counter.since(self._mark)
        self._mark = self._counter.mark()
        return count.total


def counter(enabled: bool) -> Counter:
    """The counter every system uses in this benchmark (a no-op one when counting is off)."""
    return FlightRecorderCounter() if enabled else Counter()
