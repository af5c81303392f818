"""The planner's packer: sequences with their degrees -> groups in micro-steps.

`prepare` turns a batch into per-degree times and tokens once; `pack_groups` places it, for given
degrees and a micro-step count, as groups [step, k, start, load, room, seqs]; `candidate` prices
that and `to_plan` makes it a `Plan`. Which degrees and step counts to try is `planner`'s job.

1. Long sequences one by one: dealt to micro-steps so that tall ones share a step the rest then
   fills (level packing, first-fit decreasing height), and placed in decreasing degree order
   into aligned blocks carved from each step's free ranks with a bump pointer -- decreasing
   powers of two never misalign, as in a buddy allocator.
2. Short sequences in bulk: `_waterfill` decides how much work each step takes (filling idle
   time beside long sequences first), then one heap places them longest first on the group
   furthest below its step's level (LPT), within each rank's token capacity.

Plain data in, ties broken by index: every rank packs the same batch into the same groups.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from loomtrain.parallel.hetero.costmodel import CostModel
from loomtrain.parallel.hetero.plan_types import Group, MicroStep, Plan, PlanError, check_ranks


# ------------------------------------------------------------------------- the batch
@dataclass(frozen=True)
class Batch:
    """Lengths with their per-degree times and per-rank tokens, computed once per batch."""

    lengths: tuple[int, ...]
    n_ranks: int
    capacity: int
    cost: CostModel
    time: list  # time[k][i]: seconds of sequence i on a group of degree 2**k, less lat[k]
    tok: list  # tok[k][i]: its tokens per rank there, ceil(L / 2**k)
    lat: tuple  # lat[k]: fixed seconds of a non-empty group of degree 2**k
    kmin: np.ndarray  # smallest degree exponent whose memory holds the sequence
    time_np: np.ndarray  # time as an array [i, k]
    order: list  # longest first, ties by index (time grows with length at every degree)
    tok_np: np.ndarray  # tok as an array [i, k]


def prepare(lengths: Sequence[int], n_ranks: int, capacity: int, cost: CostModel | None) -> Batch:
    """Check the batch fits at all (one clear line if not) and tabulate it at every degree."""
    check_ranks(n_ranks)
    cost, n_ranks, capacity = cost or CostModel(), int(n_ranks), int(capacity)
    if capacity < 1:
        raise PlanError(f"per-GPU token capacity must be at least 1, got {capacity}")
    arr = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if arr.size and arr.min() < 1:
        raise PlanError(f"sequence lengths must be >= 1, got {int(arr.min())}")
    if arr.size and arr.max() > n_ranks * capacity:
        i = int(arr.argmax())
        raise PlanError(f"sequence {i} has {int(arr[i]):,} tokens, more than {n_ranks} ranks x "
                        f"{capacity:,} tokens per GPU = {n_ranks * capacity:,} can hold; raise the "
                        "capacity, add GPUs or cut the sequence")
    degrees = 2 ** np.arange(n_ranks.bit_length())
    t = np.stack([cost.seq_times(arr, int(d)) for d in degrees], axis=1)
    tok = -(-arr[:, None] // degrees[None, :])
    kmin = np.argmax(tok <= capacity, axis=1)
    lat = tuple(cost.group_overhead(int(d)) for d in degrees)
    order = np.lexsort((np.arange(arr.size), -arr)).tolist()
    return Batch(tuple(arr.tolist()), n_ranks, capacity, cost, t.T.tolist(), tok.T.tolist(),
                  lat, kmin, t, order, tok)


# ------------------------------------------------------------------------- the packer
FILL = 0.9  # share of free memory the water-filling plans for (LPT needs a little slack)
LARGE = 0.5  # a sequence over this share of the mean step time is placed one by one


def _waterfill(height, slope, headroom, cap, work):
    """Levels per micro-step that absorb `work` at the least sum of levels: first each step's
    headroom (idle time below its height: free), then, above it, `slope` units of work per
    second of level, the steepest steps first and equal ones level, each up to `cap` (memory)."""
    level, cap = list(height), list(cap)
    for m in range(len(level)):
        take = min(headroom[m], cap[m], work)
        work -= take
        cap[m] -= take
    for s in sorted({round(x, 9) for x in slope if x > 0}, reverse=True):
        live = [m for m in range(len(level)) if round(slope[m], 9) == s and cap[m] > 1e-12]
        while work > 1e-12 and live:
            low = min(level[m] for m in live)
            grp = [m for m in live if level[m] <= low + 1e-12]
            nxt = min((level[m] for m in live if level[m] > low + 1e-12), default=math.inf)
            rise = min(work / (s * len(grp)), min(cap[m] for m in grp) / s, nxt - low)
            for m in grp:
                level[m] += rise
                cap[m] -= rise * s
            work -= rise * s * len(grp)
            live = [m for m in live if cap[m] > 1e-12]
    return level if work <= 1e-9 else None


def pack_groups(b: Batch, kreq: Sequence[int], n_steps: int, k_small: int, min_rate: float = 0.0):
    """Place sequence i on a group of degree >= 2**kreq[i] in one of `n_steps` micro-steps;
    short ones (degree 2**k_small, under LARGE of the mean step time) in bulk. Large ones are
    dealt, most GPU-time first, to the step whose height estimate max(slowest, GPU-time / N)
    grows least, then placed where their step's height grows least: wide ones into the fullest
    group they fit under its target (keeping ranks free), others the least loaded, else a new
    block. Short ones go in bulk only to groups that do their work at >= `min_rate` of the
    rank-seconds they take on degree 2**k_small (a wide group spends far more on a short
    sequence's all-to-alls; the leftovers still go anywhere). Returns the groups [step, k, start,
    load, room, seqs], or None (out of memory)."""
    n, cap, lat = b.n_ranks, b.capacity, b.lat
    time, tok = b.time, b.tok
    alone = [time[k][i] + lat[k] for i, k in enumerate(kreq)]
    tau = sum(a * (1 << k) for a, k in zip(alone, kreq)) / (n * n_steps)
    is_large = [k > k_small or a > LARGE * tau for k, a in zip(kreq, alone)]
    large = sorted((i for i in b.order if is_large[i]), key=lambda i: (-kreq[i], -alone[i], i))
    ptr, height = [0] * n_steps, [0.0] * n_steps
    bins: list[list] = []  # [step, k, start, load, room, seqs]
    by_step: list[list[int]] = [[] for _ in range(n_steps)]

    def new_bin(m, k):
        bins.append([m, k, ptr[m], 0.0, cap, []])
        by_step[m].append(len(bins) - 1)
        ptr[m] += 1 << k
        return len(bins) - 1

    def choose(i, steps, target):
        k_i, wide = kreq[i], kreq[i] > k_small
        best = None
        for m in steps:
            h = max(height[m], target[m])
            for bi in by_step[m]:
                _, k, _, load, room, seqs = bins[bi]
                if k >= k_i and room >= tok[k][i]:
                    t = time[k][i]
                    cand = (max(0.0, load + t + (0.0 if seqs else lat[k]) - h), t * (1 << k),
                            -load if wide else load, m, bi)
                    best = cand if best is None or cand < best else best
            if ptr[m] + (1 << k_i) <= n:
                cand = (max(0.0, alone[i] - h), alone[i] * (1 << k_i), 0.0, m, -1)
                best = cand if best is None or cand < best else best
        return best

    def place(i, e):
        k = e[1]
        e[3] += time[k][i] + (0.0 if e[5] else lat[k])
        e[4] -= tok[k][i]
        e[5].append(i)
        height[e[0]] = max(height[e[0]], e[3])

    # 1. deal the large sequences to steps; 2. place them
    crit, work, room = [0.0] * n_steps, [0.0] * n_steps, [n * cap] * n_steps
    free = [n] * n_steps  # ranks not yet taken by a wide sequence's own group
    step_of = {}
    for i in sorted(large, key=lambda i: (-alone[i] * (1 << kreq[i]), i)):
        k, c = kreq[i], alone[i]
        w, t = c * (1 << k), tok[k][i] << k
        best = None
        for strict in (True, False):  # a step whose ranks wide groups took only as a last resort
            for m in range(n_steps):
                if room[m] >= t and (free[m] >= 1 << k or not strict):
                    grow = round(max(crit[m], c, (work[m] + w) / n) - max(crit[m], work[m] / n), 9)
                    best = min(best or (math.inf,), (grow, work[m], m))
            if best is not None:
                break
        if best is None:
            return None
        m = step_of[i] = best[2]
        room[m], work[m], crit[m] = room[m] - t, work[m] + w, max(crit[m], c)
        free[m] -= (1 << k) if k > k_small else 0
    target = [max(crit[m], work[m] / n) for m in range(n_steps)]
    for i in large:
        best = choose(i, (step_of[i],), target) or choose(i, range(n_steps), target)
        if best is None:
            return None
        place(i, bins[best[-1] if best[-1] >= 0 else new_bin(best[3], kreq[i])])
    # 3. pour the short ones onto groups of degree 2**k_small
    small = [i for i in b.order if not is_large[i]]
    if not small:
        return bins
    ks, nk = k_small, tok[k_small]
    for m in range(n_steps):
        while ptr[m] + (1 << ks) <= n:
            new_bin(m, ks)
    # any group may take short ones (a wide one below its step's height has idle ranks); a
    # degree-2**k group does their work (in seconds on degree 2**ks) at rate[k]
    col = b.time_np[small].sum(axis=0)
    need = float(col[ks])
    rate = [need / float(col[k]) if k >= ks else 0.0 for k in range(len(col))]
    elig = [[bi for bi in e if rate[bins[bi][1]] >= min_rate * (1 << (bins[bi][1] - ks))] for e in by_step]
    per_token = need / sum(nk[i] for i in small)
    slope = [sum(rate[bins[bi][1]] for bi in e) for e in elig]
    headroom = [sum(max(0.0, height[m] - bins[bi][3]) * rate[bins[bi][1]] for bi in e)
                for m, e in enumerate(elig)]
    level = None
    for fill in (FILL, 1.0):
        mem = [fill * per_token * sum(bins[bi][4] << (bins[bi][1] - ks) for bi in e) for e in elig]
        level = level or _waterfill(height, slope, headroom, mem, need)
    if level is None:
        return None
    heap = [(bins[bi][3] - level[m], m, bi) for m in range(n_steps) for bi in elig[m]]
    heapq.heapify(heap)
    for i in small:
        while heap:
            _, m, bi = heap[0]
            e = bins[bi]
            k = e[1]
            if e[4] >= tok[k][i]:
                break
            heapq.heappop(heap)  # (nearly) full: the slow path below may still use it
        if heap:
            place(i, e)
            heapq.heapreplace(heap, (e[3] - level[m], m, bi))
            continue
        best = choose(i, range(n_steps), level)  # no free ranks are left: best[-1] >= 0
        if best is None:
            return None
        place(i, bins[best[-1]])
    return bins


@dataclass(frozen=True)
class Candidate:
    """A packing priced by the cost model: the sum of its micro-steps' slowest groups."""

    time: float
    strategy: str
    degree: int | None
    n_steps: int
    bins: list


def candidate(b: Batch, bins, strategy: str, degree: int | None) -> Candidate | None:
    """Price `pack_groups`'s groups (None, out of memory, stays None)."""
    if bins is None:
        return None
    height: dict[int, float] = {}
    for e in bins:
        if e[5]:
            height[e[0]] = max(height.get(e[0], 0.0), e[3])
    return Candidate(sum(height.values()) + len(height) * b.cost.step_overhead_s, strategy,
                     degree, len(height), bins)


def to_plan(b: Batch, c: Candidate) -> Plan:
    """The executor's view: groups sorted by first rank, idle ranks as empty degree-1 groups."""
    per_step: dict[int, list[Group]] = {}
    for m, k, start, load, room, seqs in c.bins:
        if seqs:
            per_step.setdefault(m, []).append(Group(start, 1 << k, tuple(sorted(seqs)),
                                                    b.capacity - room, load))
    steps = []
    for m in sorted(per_step):  # a micro-step nobody works in is dropped, not run empty
        used = {r for g in per_step[m] for r in range(g.start, g.start + g.degree)}
        groups = per_step[m] + [Group(r, 1, (), 0, 0.0) for r in range(b.n_ranks) if r not in used]
        steps.append(MicroStep(tuple(sorted(groups, key=lambda g: g.start))))
    return Plan(b.n_ranks, b.capacity, b.lengths, tuple(steps), c.strategy, c.degree, c.time)
