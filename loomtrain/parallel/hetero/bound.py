"""A lower bound on the step time of any heterogeneous plan of a batch, under the planner's cost model.

Speedups over static SP depend on the length distribution, so they cannot say how good a plan is;
plan / bound - 1 (the optimality gap) can. The bound is the largest of:

* area:    every plan spends at least each sequence's least rank-seconds (degree x time, over the
           degrees whose memory holds it); N ranks share them, and memory forces at least
           ceil(least rank-tokens / (N x capacity)) micro-steps, each paying the fixed overhead;
* longest: some micro-step runs the slowest sequence at its fastest feasible degree;
* MILP:    the relaxation in `milp.py` (per-step height, area and memory; the long sequences placed
           with binaries; idle time in wide groups only partly usable by short sequences; memory
           beside a long sequence that fills its group's time unusable),
           whatever bound HiGHS proves within `seconds`; skipped when seconds <= 0.
* classes: whole micro-steps per step-height class (`height_bound.py`), each sequence charged the
           ranks its time and memory take at the top of its class; also within `seconds`.

Memory is charged with a dual feasible function of bin packing per degree (`_dff`), so memory
that fragmentation makes unusable counts, and two sequences over half a rank's capacity at a
degree never share a group.

Each is valid for every plan the executor can run, so plan / bound - 1 overstates the true gap by
however loose the bound is, never understates it (tests/test_plan_bound.py checks bound <= the
brute-force optimum on small instances).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from loomtrain.parallel.hetero.costmodel import CostModel
from loomtrain.parallel.hetero.height_bound import height_class_bound
from loomtrain.parallel.hetero.milp import milp_bound
from loomtrain.parallel.hetero.plan_types import PlanError, check_ranks

LONG_MAX = 40  # sequences placed with binaries at most (more: tighter, slower)
LONG_SHARE = 0.05  # ... those at least this share of the mean micro-step's height


@dataclass(frozen=True)
class Bound:
    value: float  # seconds: no plan of the batch is faster
    area: float
    longest: float
    milp: float | None  # None: not run
    solved: bool  # the MILP relaxation was solved to optimality (the bound is its optimum)
    n_long: int  # sequences the MILP placed with binaries
    classes: float | None = None  # the step-height class bound (None: not run)


@dataclass(frozen=True)
class Tables:
    """Per sequence i and degree 2**k: seconds (without the group latency), rank-tokens, fits."""

    time: np.ndarray
    lat: np.ndarray
    mem: np.ndarray
    feasible: np.ndarray
    per_rank: np.ndarray  # tokens per rank: ceil(L / 2**k)


def _dff(tau: np.ndarray, capacity: int, alone: np.ndarray, j_max: int = 24) -> np.ndarray:
    """Tokens per rank to charge each sequence at one degree, so that the charges of any group's
    sequences still sum to <= capacity: a dual feasible function of bin packing (Fekete and
    Schepers 2001, u^(j)(x) = x if (j+1)x is whole, else floor((j+1)x) / j, for x = tokens /
    capacity), one j for the whole degree (the one charging the batch most), and the whole
    capacity for a sequence nothing else fits beside. Charges above the tokens count memory that
    fragmentation makes unusable (e.g. three 0.27 x capacity sequences fill a group)."""
    best, best_sum = tau.astype(np.float64), float(tau.sum())
    for j in range(1, j_max + 1):
        scaled = (j + 1) * tau
        w = np.where(scaled % capacity == 0, tau, (scaled // capacity) * capacity / j).astype(np.float64)
        if float(w.sum()) > best_sum:
            best, best_sum = w, float(w.sum())
    return np.where(alone, float(capacity), best)


def tables(lengths: Sequence[int], n_ranks: int, capacity: int, cost: CostModel) -> Tables:
    """`mem` charges memory lost to fragmentation too (`_dff`); the charges of the sequences of
    any group fit its degree x capacity, so those of any micro-step fit N x capacity."""
    check_ranks(n_ranks)
    arr = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if arr.size and (arr.min() < 1 or arr.max() > n_ranks * capacity):
        raise PlanError(f"bound: lengths must be 1..{n_ranks * capacity:,} tokens")
    degrees = 2 ** np.arange(int(n_ranks).bit_length())
    time = np.stack([cost.seq_times(arr, int(d)) for d in degrees], axis=1).reshape(arr.size, -1)
    per_rank = -(-arr[:, None] // degrees[None, :])
    lat = np.array([cost.group_overhead(int(d)) for d in degrees])
    feasible = per_rank <= capacity
    # the smallest other sequence at each degree: the two smallest, so each i excludes itself
    if arr.size > 1:
        two = np.sort(per_rank, axis=0)[:2]
        other = np.where(per_rank == two[0][None, :], two[1][None, :], two[0][None, :])
    else:
        other = np.full_like(per_rank, capacity + 1)
    alone = per_rank + other > capacity
    charge = np.zeros(per_rank.shape)
    for k in range(degrees.size):
        ok = feasible[:, k]
        charge[ok, k] = _dff(per_rank[ok, k], capacity, alone[ok, k])
    mem = np.where(feasible, charge, per_rank) * degrees[None, :]
    return Tables(time, lat, mem.astype(np.float64), feasible, per_rank.astype(np.float64))


def lower_bound(lengths: Sequence[int], n_ranks: int, capacity: int, cost: CostModel | None = None,
                seconds: float = 1.0, long_max: int = LONG_MAX, upper: float | None = None) -> Bound:
    """The bound (see the module docstring); `seconds`: HiGHS's time limit (<= 0: analytic only);
    `upper`: the step time of a plan of the batch, if known (it tightens the MILP; default: one
    sequence per micro-step, each at its fastest degree, which is always a plan)."""
    cost = cost or CostModel()
    if len(lengths) == 0:
        return Bound(0.0, 0.0, 0.0, None, True, 0)
    t = tables(lengths, n_ranks, capacity, cost)
    width = 2.0 ** np.arange(t.time.shape[1])
    area = np.where(t.feasible, t.time * width[None, :], np.inf).min(axis=1)
    tokens = np.where(t.feasible, t.mem, np.inf).min(axis=1)
    steps = max(1, math.ceil(float(tokens.sum()) / (n_ranks * capacity) - 1e-12))
    o = cost.step_overhead_s
    area_lb = float(area.sum()) / n_ranks + steps * o
    alone = np.where(t.feasible, t.time + t.lat[None, :], np.inf).min(axis=1)
    longest_lb = float(alone.max()) + o
    milp_lb, solved, n_long, cls_lb = None, False, 0, None
    if seconds > 0:
        share = LONG_SHARE * float(area.sum()) / n_ranks / steps
        order = np.lexsort((np.arange(alone.size), -alone))
        long = [int(i) for i in order[:long_max] if alone[i] >= share] or [int(order[0])]
        n_long = len(long)
        big = t.per_rank * 2 > capacity  # no two of these share a group
        trivial = float(alone.sum()) + alone.size * o
        upper = trivial if upper is None else min(float(upper), trivial)
        res = milp_bound(t.time, t.lat, t.mem, t.feasible, big, long, n_ranks, capacity, o, seconds, upper,
                         per_rank=t.per_rank)
        milp_lb, solved = res.value * (1 - 1e-7), res.solved  # HiGHS's feasibility tolerance
        cls_lb, cls_solved = height_class_bound(lengths, t.time, t.lat, t.mem, t.feasible, n_ranks, capacity,
                                                o, upper, seconds)
        cls_lb *= 1 - 1e-7
        solved = solved or (cls_solved and cls_lb >= milp_lb)
    value = max(area_lb, longest_lb, milp_lb or 0.0, cls_lb or 0.0)
    return Bound(value, area_lb, longest_lb, milp_lb, solved, n_long, cls_lb)
