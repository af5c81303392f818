"""`resilience.straggler=rebalance`: a reported straggler gets less work from the next step on.

The straggler monitor measures every rank's compute seconds per unit of predicted work (`rate`)
each window. When it reports a straggler, `speed_factors` turns the window's rates into factors
relative to the median (1.5 = takes 1.5x as long), and `Rebalancer.apply` hands them to the
heterogeneous scheduler (`HeteroScheduler.set_speeds`), whose plans then move sequences off the
slow rank's groups (`loomtrain.parallel.hetero.speeds`). Only the heterogeneous scheduler can do
this: packed rows give every rank the same shape of work (config checks refuse the policy with
`parallel.sequence_scheduler=static`).

Every rank runs the detector on the same all-gathered figures, so every rank reaches the same
factors without another collective; the plan's fingerprint check would stop a rank that did not.
Factors within `min_slowdown` of 1 are set to exactly 1, so noise never moves work.

A rank that recovers (a throttled chip cools down, a noisy neighbour leaves) is not reported
again (the detector reports a rank once per episode), so no new factors would come:
`eased_factors` brings the factor of a rank measured clearly faster than its factor to halfway
between 1 and the measurement (exactly 1 once within `min_slowdown`), so it gets its work back
within a few windows; a rank measured at or above its factor keeps it.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch.distributed as dist

from loomtrain.parallel.hetero.scheduler import HeteroScheduler
from loomtrain.parallel.hetero.speeds import apply_speeds, effective_time, work_shares

LOWEST, HIGHEST = 0.25, 4.0  # factors are clipped here: a measurement off by more is not a speed


def speed_factors(rates: Sequence[float], snap: float) -> list[float]:
    """Per rank: its compute rate over the median rate, 1.0 within `snap` of 1 or when unmeasured."""
    known = sorted(r for r in rates if math.isfinite(r) and r > 0)
    if not known:
        return [1.0] * len(rates)
    mid = len(known) // 2
    median = known[mid] if len(known) % 2 else (known[mid - 1] + known[mid]) / 2
    out = []
    for r in rates:
        f = r / median if math.isfinite(r) and r > 0 else 1.0
        out.append(1.0 if abs(f - 1.0) < snap else round(min(HIGHEST, max(LOWEST, f)), 4))
    return out


def eased_factors(current: Sequence[float], measured: Sequence[float], snap: float) -> list[float] | None:
    """The factors after a window without a straggler report: a rank that holds a factor but
    measured clearly faster than it (`measured`, from `speed_factors`, below the factor by more
    than `snap / 2`) goes to halfway between 1 and its measurement, snapped to 1 within `snap`; a
    rank measured at or above its factor keeps it. None when nothing changes.

    Halfway to 1, not to the measurement: a rank given less work measures slower per unit of
    predicted work than it is (fixed per-micro-step costs weigh more), so a recovered rank still
    reads ~1.3 on its reduced share (4 ranks, 1.5x slow until step 32: 1.39, then 1.29)."""
    out = []
    for f, m in zip(current, measured):
        if f != 1.0 and m < f - snap / 2:
            f = 1.0 + (m - 1.0) / 2
            f = 1.0 if abs(f - 1.0) < snap else round(f, 4)
        out.append(f)
    return out if out != list(current) else None


class Rebalancer:
    """Maps the monitor's per-rank factors onto the heterogeneous scheduler's pool of ranks."""

    def __init__(self, scheduler: HeteroScheduler):
        self.scheduler = scheduler
        self.pool_index: list[int] = []  # global rank -> index in the scheduler's pool
        self.factors: list[float] = []  # per global rank, as last applied ([] = none yet)

    def setup(self, side_group, world_size: int) -> None:
        """One all-gather at start-up: which pool index each global rank is."""
        self.pool_index = [0] * world_size
        dist.all_gather_object(self.pool_index, self.scheduler.executor.index, group=side_group)

    def pool_speeds(self, factors: Sequence[float]) -> list[float]:
        """A pool index held by several ranks (tensor-parallel peers) runs at its slowest one's speed."""
        per: dict[int, list[float]] = {}
        for rank, f in enumerate(factors):
            per.setdefault(self.pool_index[rank] if rank < len(self.pool_index) else rank, []).append(f)
        return [max(per.get(i, [1.0])) for i in range(self.scheduler.ranks)]

    def apply(self, factors: Sequence[float]) -> dict:
        """Set the factors for the next plans; returns what the event record says about them: the
        factors per pool rank, and for the last batch each rank's predicted work share and the
        predicted step time, as planned before and with the factors."""
        self.factors = [float(f) for f in factors]
        speeds = self.pool_speeds(factors)
        self.scheduler.set_speeds(speeds)
        plan, cost = self.scheduler.last_plan, self.scheduler.cost
        rec: dict = {"speeds": speeds}
        if plan is not None:
            after = apply_speeds(plan, speeds, cost)
            rec.update(work_share_before=[round(s, 4) for s in work_shares(plan)],
                       work_share_after=[round(s, 4) for s in work_shares(after)],
                       predicted_step_s_before=round(effective_time(plan, speeds, cost), 6),
                       predicted_step_s_after=round(after.time if after is not plan else
                                                    effective_time(plan, speeds, cost), 6))
        return rec
