"""Count the collectives this process enters in a window of code (a training step, say).

Why: the cost of data parallelism on a slow network is mostly the number and size of collectives,
and a change such as "reduce gradients once per step, not once per micro-batch" must be shown by
counting them, not only by timing. The count comes from torch's own flight recorder, the ring
buffer of recent collectives that every process group writes to when `TORCH_FR_BUFFER_SIZE` is
set before the first process group is created (`loomtrain run` sets it; the hang watchdog reads
the same buffer). Nothing is patched or wrapped: FSDP2's all-gathers and reduce-scatters, DDP's
bucketed all-reduces and our own small all-reduces are all seen. On gloo FSDP2's reduce-scatter
is recorded as `gloo:all_reduce`.

    counter = CollectiveCounter()          # CollectivesUnavailable if the recorder is off
    mark = counter.mark()
    trainer.train_step()
    count = counter.since(mark)            # CollectiveCount
    print(count.total, count.by_op)        # e.g. 9 {'gloo:all_gather': 3, 'gloo:all_reduce': 6}

A `CollectiveCount` is this process's view: `total` collectives (every rank of a group enters the
same ones), `p2p` point-to-point operations (pipeline sends and receives, counted apart, where the
backend records them: gloo in torch 2.13 records none), and breakdowns by operation name and by
process group (then operation; groups by their mesh name, e.g. `mesh_dp_shard_cp`, or `default_pg`). `complete` is False when the ring buffer
wrapped inside the window (raise `TORCH_FR_BUFFER_SIZE`); the totals are then still exact (they
come from per-group sequence numbers), only the breakdowns are partial.
"""
from __future__ import annotations

import os
import pickle
import time
from collections import Counter
from dataclasses import dataclass, field

from torch._C import _distributed_c10d as c10d

from loomtrain.hooks import Hook, LoopState


_OFF = ("collectives cannot be counted: torch's flight recorder is off (set TORCH_FR_BUFFER_SIZE, e.g. 2000, "
        "before the first process group is created, as `loomtrain run` does)")


class CollectivesUnavailable(RuntimeError):
    """torch's flight recorder is off in this process, so collectives cannot be counted."""


@dataclass(frozen=True)
class Mark:
    """Where a window starts: per process group, the last collective and p2p sequence numbers."""

    seq: dict = field(default_factory=dict)
    p2p: dict = field(default_factory=dict)
    time_ns: int = 0


@dataclass(frozen=True)
class CollectiveCount:
    """Collectives (and point-to-point operations) this process entered in a window."""

    total: int
    p2p: int
    by_op: dict = field(default_factory=dict)  # e.g. {"gloo:all_gather": 3, "gloo:all_reduce": 6}
    by_group: dict = field(default_factory=dict)  # process group -> {operation: count}
    complete: bool = True

    def per_step(self, steps: int) -> float:
        return self.total / steps if steps else 0.0


def _entries() -> list[dict]:
    try:
        return pickle.loads(c10d._dump_fr_trace(True, False, False)).get("entries", [])
    except (RuntimeError, AttributeError, pickle.UnpicklingError, TypeError) as exc:
        raise CollectivesUnavailable(f"torch's flight recorder cannot be read ({exc})") from exc


def _group(entry: dict) -> tuple[str, str]:
    """(name, label): the group's name, and its description when it has one (`default_pg`)."""
    pg = entry.get("process_group") or (str(entry.get("pg_id")), "")
    name, desc = str(pg[0]), str(pg[1] or "")
    return name, desc if desc and desc != "undefined" else name


def _last_seq(entries: list[dict]) -> tuple[dict, dict]:
    seq: dict[str, int] = {}
    p2p: dict[str, int] = {}
    for e in entries:
        name, _ = _group(e)
        seq[name] = max(seq.get(name, 0), int(e.get("collective_seq_id") or 0))
        p2p[name] = max(p2p.get(name, 0), int(e.get("p2p_seq_id") or 0))
    return seq, p2p


class CollectiveCounter:
    """Reads torch's flight recorder at the two ends of a window (see the module docstring).

    Reading the recorder costs a few milliseconds (it pickles the buffer): mark outside the code
    you time. Construction raises `CollectivesUnavailable` when the recorder is off."""

    def __init__(self) -> None:
        if not self.available():
            raise CollectivesUnavailable(_OFF)

    @staticmethod
    def available() -> bool:
        """True when torch's flight recorder is on in this process: it reads the same variables
        (the NCCL name is the older one) when the first process group is created."""
        for name in ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"):
            try:
                if int(os.environ.get(name, "0")) > 0:
                    return True
            except ValueError:
                pass
        return False

    def mark(self) -> Mark:
        """The start of a window."""
        now = time.time_ns()  # before reading: an entry written meanwhile belongs to the window
        seq, p2p = _last_seq(_entries())
        return Mark(seq, p2p, now)

    def since(self, mark: Mark) -> CollectiveCount:
        entries = _entries()
        seq, p2p = _last_seq(entries)
        # A group the mark did not see (created in the window, or whose entries had left the
        # buffer) counts from its entries created after the mark.
        fresh = Counter((_group(e)[0], bool(e.get("is_p2p"))) for e in entries if _group(e)[0] not in mark.seq
                        and int(e.get("time_created_ns") or 0) >= mark.time_ns)
        total = sum(n - mark.seq[g] if g in mark.seq else fresh[g, False] for g, n in seq.items())
        p2p_total = sum(n - mark.p2p[g] if g in mark.p2p else fresh[g, True] for g, n in p2p.items())
        by_op: Counter = Counter()
        by_group: dict[str, Counter] = {}
        seen = 0
        for e in entries:
            name, label = _group(e)
            if e.get("is_p2p"):
                continue
            new = (int(e.get("collective_seq_id") or 0) > mark.seq[name] if name in mark.seq
                   else int(e.get("time_created_ns") or 0) >= mark.time_ns)
            if new:
                by_op[str(e.get("profiling_name"))] += 1
                by_group.setdefault(label, Counter())[str(e.get("profiling_name"))] += 1
                seen += 1
        return CollectiveCount(total=total, p2p=p2p_total, by_op=dict(by_op),
                               by_group={g: dict(c) for g, c in by_group.items()}, complete=seen == total)


class StepCollectives(Hook):
    """A loop component that counts the collectives of every optimizer step (from `before_step`
    to `after_optimizer_step`: forward, backward, gradient reduction, clipping, the optimizer).

        counter = trainer.add_hook(StepCollectives())
        trainer.fit()
        counter.counts[-1].total, counter.mean(skip=2)

    Register it with `Trainer.add_hook`; it runs after the built-in components at each point, so
    their own `before_step` work is outside the window. The first steps can hold one-time work
    (DDP rebuilds its buckets in step 2): `mean(skip=...)` leaves them out."""

    def __init__(self) -> None:
        self.counter = CollectiveCounter()
        self.counts: list[CollectiveCount] = []
        self._mark: Mark | None = None

    def before_step(self, loop: LoopState) -> None:
        self._mark = self.counter.mark()

    def after_optimizer_step(self, loop: LoopState) -> None:
        if self._mark is not None:
            self.counts.append(self.counter.since(self._mark))
            self._mark = None

    def mean(self, skip: int = 0) -> float:
        """Collectives per step over the steps after the first `skip`."""
        counts = self.counts[skip:]
        return sum(c.total for c in counts) / len(counts) if counts else 0.0
