"""Collectives per step, counted the same way for loomtrain and every peer.

The count comes from torch's flight recorder (`TORCH_FR_BUFFER_SIZE`, which the launcher sets
before any process group exists): every collective a process group issues gets an increasing
`record_id`, whoever issued it (FSDP2's all-gathers and reduce-scatters, DeepSpeed's own calls,
loomtrain's loss and token all-reduces). The benchmark reads the newest id after each step, outside
the timed region, so counting costs the step nothing; the count of a step is the difference from the
previous reading. Because it sits below every framework, one mechanism serves all systems and the
numbers compare.

`counter()` picks the mechanism; another (a profiler, or loomtrain's own runtime counter once it
exists) plugs in by implementing `Counter`.
"""
from __future__ import annotations

import pickle

from torch._C import _distributed_c10d as c10d


class Counter:
    """Collectives issued by this process since the previous `read()` (None when unknown)."""

    name = "none"

    def read(self) -> int | None:
        return None


class FlightRecorderCounter(Counter):
    """Counts through torch's flight recorder (see the module docstring)."""

    name = "flight_recorder"

    def __init__(self) -> None:
        self._last = self._newest()

    @staticmethod
    def _newest() -> int | None:
        try:
            data = pickle.loads(c10d._dump_fr_trace(True, False, False))
        except (RuntimeError, AttributeError, pickle.UnpicklingError, TypeError):
            return None
        ids = [e.get("record_id") for e in data.get("entries", []) if e.get("record_id") is not None]
        return max(ids) if ids else -1

    def read(self) -> int | None:
        newest = self._newest()
        if newest is None or self._last is None:
            self._last = newest
            return None
        count, self._last = newest - self._last, newest
        return count


def counter(enabled: bool) -> Counter:
    """The counter every system uses in this benchmark (a no-op one when counting is off)."""
    return FlightRecorderCounter() if enabled else Counter()
