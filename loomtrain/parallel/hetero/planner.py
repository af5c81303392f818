"""Per-step plan of sequence-parallel groups for a batch of variable-length sequences.

A static SP degree sized for the longest sequence pushes every short sequence through
all-to-alls (across nodes once the degree exceeds a node); FlexSP (Wang et al. 2024, arXiv
2412.01523) picks a mix of group degrees every step instead, with a MILP solver. This planner
makes the same choice greedily, in tens of milliseconds, so every rank can run it every step:

1. Degrees. Each sequence gets the smallest power of two whose memory holds it -- also its
   cheapest in GPU-time, as all-to-all volume grows with the degree -- widened, like ByteScale's
   data-aware sharding, only while it would run longer than alpha x tau, tau being the batch's
   GPU-time over N ranks and M micro-steps.
2. Long sequences one by one (`_pack`): dealt to micro-steps so that tall ones share a step the
   rest then fills (level packing, first-fit decreasing height), and placed in decreasing degree
   order into aligned blocks carved from each step's free ranks with a bump pointer -- decreasing
   powers of two never misalign, as in a buddy allocator.
3. Short sequences in bulk: `_waterfill` decides how much work each step takes (filling idle
   time beside long sequences first), then one heap places them longest first on the group
   furthest below its step's level (LPT), within each rank's token capacity.
4. Portfolio: a few alphas and micro-step counts (more for small batches); for the winner, its
   few longest sequences narrowed to fit one tall step (`_heterogeneous`), `widen` (the sequence
   holding a step up gets the next degree) and a candidate keeping short sequences off groups
   costing 2x; the best after `polish` (moves off each step's slowest group) wins. The same packer
   with one degree for every group competes; the fastest plan by the cost model wins, so the
   result is never slower than the best homogeneous plan.

Plain data in, ties broken by index: every rank computes the same plan, which
`Plan.fingerprint64` lets the executor check with one all-gather before running it.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from loomtrain.parallel.hetero.costmodel import CostModel
from loomtrain.parallel.hetero.plan_types import Group, MicroStep, Plan, PlanError, check_ranks
from loomtrain.parallel.hetero.local_search import polish, widen


# ------------------------------------------------------------------------- the batch
@dataclass(frozen=True)
class _Batch:
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


def _prepare(lengths: Sequence[int], n_ranks: int, capacity: int, cost: CostModel | None) -> _Batch:
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
    return _Batch(tuple(arr.tolist()), n_ranks, capacity, cost, t.T.tolist(), tok.T.tolist(),
                  lat, kmin, t, order, tok)


# ------------------------------------------------------------------------- the packer
FILL = 0.9  # share of free memory the water-filling plans for (LPT needs a little slack)
# batches of <= SMALL sequences pack fast: a wider portfolio (alphas, betas, n_long) for them
SMALL, WIDE = 300, (tuple(2.0 ** (e / 8) for e in range(-8, 9)), (0.3, 0.45, 0.55, 0.65, 0.8, 0.9, 1.0), 5)
MIN_RATE = 0.5  # a candidate keeps short sequences off groups that need 2x their rank-seconds
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


def _pack(b: _Batch, kreq: Sequence[int], n_steps: int, k_small: int, min_rate: float = 0.0):
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
class _Candidate:
    time: float
    strategy: str
    degree: int | None
    n_steps: int
    bins: list


def _candidate(b: _Batch, bins, strategy: str, degree: int | None) -> _Candidate | None:
    if bins is None:
        return None
    height: dict[int, float] = {}
    for e in bins:
        if e[5]:
            height[e[0]] = max(height.get(e[0], 0.0), e[3])
    return _Candidate(sum(height.values()) + len(height) * b.cost.step_overhead_s, strategy,
                      degree, len(height), bins)


def _to_plan(b: _Batch, c: _Candidate) -> Plan:
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


# ------------------------------------------------------------------------- strategies
def _search_steps(b: _Batch, k: int, run, shared: bool = True) -> list[_Candidate]:
    """`run(M)` for the first feasible micro-step count M and for M + 1. Memory bounds where to
    start: tokens over N x capacity, and (homogeneous, `shared`) sequences over half a group's
    memory, which cannot share one."""
    groups = b.n_ranks >> k
    m = math.ceil(sum(b.tok[k]) / (groups * b.capacity))
    if shared:
        m = max(m, math.ceil(sum(1 for t in b.tok[k] if 2 * t > b.capacity) / groups))
    m = max(1, m)
    while (first := run(m)) is None:
        if m > len(b.lengths):  # one sequence per step always fits: a bug, not a hang
            raise PlanError(f"internal error: no plan for {len(b.lengths)} sequences in {m} steps")
        m += max(1, m // 4)
    return [first] + [c for c in (run(m + 1),) if c is not None]


def _homogeneous(b: _Batch, k: int) -> _Candidate:
    kreq = [k] * len(b.lengths)
    return min(_search_steps(b, k, lambda m: _candidate(b, _pack(b, kreq, m, k), "homogeneous",
                                                        1 << k)), key=lambda c: (c.time, c.n_steps))


def _heterogeneous(b: _Batch, alphas=tuple(2.0 ** (e / 4) for e in (-3, -1, 1, 3)),
                   betas=(0.45, 0.65, 0.9), n_long=3) -> _Candidate | None:
    """Degrees: the smallest that holds a sequence, widened until it runs within alpha x tau.
    The alphas step by sqrt(2) around 1: half a degree-doubling, so a sequence near the
    threshold is tried at both of its candidate degrees.

    tau is a per-step share, but micro-steps need not be equal: one tall step can hold the
    longest sequences on narrow groups (least GPU-time; a degree over a node pays the NIC) while
    the rest fill it, and a short step takes what is left. So the `n_long` longest sequences of
    the winner are then given the smallest degree within beta x its GPU-time / N, for each
    beta, at its micro-step count and one fewer (a taller step may save one). Last, `polish`."""
    if not b.lengths:
        return None
    ks = np.arange(b.n_ranks.bit_length())
    alone = b.time_np + np.asarray(b.lat)[None, :]
    rank_time = alone * (2.0 ** ks)[None, :]
    feasible = ks[None, :] >= b.kmin[:, None]
    fastest = np.argmin(np.where(feasible, alone, np.inf), axis=1)
    rows = np.arange(len(b.lengths))
    w_min = float(rank_time[rows, b.kmin].sum())
    cache: dict = {}

    def run(m, alpha):
        tau, kreq = alpha * w_min / (b.n_ranks * m), b.kmin
        for _ in range(3):  # degrees <-> target: a fixed point in a few rounds
            ok = feasible & (alone <= tau)
            kreq = np.where(ok.any(axis=1), np.argmax(ok, axis=1), fastest)
            tau = alpha * float(rank_time[rows, kreq].sum()) / (b.n_ranks * m)
        return pack(m, kreq)

    def pack(m, kreq, min_rate=0.0):
        key = (m, kreq.tobytes(), min_rate)
        if key not in cache:  # another alpha may land on the same degrees
            cache[key] = (_candidate(b, _pack(b, kreq.tolist(), m, 0, min_rate), "hetero", None), m, kreq)
        return cache[key][0]

    cands = [c for a in alphas for c in _search_steps(b, 0, lambda m: run(m, a), shared=False)]
    best = min(cands, key=lambda c: (c.time, c.n_steps))
    m0, k0 = next((m, kreq) for c, m, kreq in cache.values() if c is best)  # the winner's steps, degrees
    top = np.asarray(b.order[:n_long])
    for beta in betas:  # the longest few: the smallest degree within beta x GPU-time / N
        ok = feasible[top] & (alone[top] <= beta * float(rank_time[rows, k0].sum()) / b.n_ranks)
        kreq = k0.copy()
        kreq[top] = np.where(ok.any(axis=1), np.argmax(ok, axis=1), k0[top])
        for c in (pack(m, kreq) for m in (m0 - 1, m0) if m >= 1):
            best = c if c is not None and (c.time, c.n_steps) < (best.time, best.n_steps) else best
    m0, k0 = next((m, kreq) for c, m, kreq in cache.values() if c is best)
    best = widen(b, best, m0, k0, pack)
    m0, k0 = next((m, kreq) for c, m, kreq in cache.values() if c is best)
    finals = [best] + [c for c in (pack(m, k0, MIN_RATE) for m in (m0, m0 + 1)) if c is not None]
    return min((_candidate(b, polish(b, c.bins), "hetero", None) for c in finals),
               key=lambda c: (c.time, c.n_steps))


@dataclass(frozen=True)
class Comparison:
    best: Plan  # the fastest candidate: what the executor runs
    best_homogeneous: Plan  # the fastest plan with one degree for all groups
    static: Plan | None  # the one-degree plan at `static_degree`, when asked for


def compare_plans(lengths: Sequence[int], n_ranks: int, capacity: int, cost: CostModel | None = None,
                  static_degree: int | None = None) -> Comparison:
    """Plan a batch (see `plan_batch`) and return the winner beside the homogeneous baselines.

    Homogeneous degrees are packed in the order of a lower bound on their time (max of GPU-time
    / N and their slowest sequence) and skipped once that bound exceeds the best one found, which
    finds the same best degree as packing all of them, at a fraction of the cost."""
    b = _prepare(lengths, n_ranks, capacity, cost)
    n_ranks, capacity = b.n_ranks, b.capacity
    k_lo = int(b.kmin.max(initial=0))
    static_degree = None if static_degree is None else int(static_degree)
    k_static = None if static_degree is None else static_degree.bit_length() - 1
    if static_degree is not None and (static_degree & (static_degree - 1) or
                                      not 1 << k_lo <= static_degree <= n_ranks):
        raise PlanError(f"static degree {static_degree} must be a power of two from {1 << k_lo} "
                        f"(to hold {max(b.lengths, default=0):,} tokens) to {n_ranks}")
    bounds = sorted((max(float(b.time_np[:, k].sum()) * (1 << k) / n_ranks,
                         float(b.time_np[:, k].max(initial=0.0)) + b.lat[k]), k)
                    for k in range(k_lo, n_ranks.bit_length()))
    homog: dict[int, _Candidate] = {}
    for bound, k in bounds:
        if k == k_static or bound <= min((c.time for c in homog.values()), default=math.inf):
            homog[k] = _homogeneous(b, k)
    hom = min(homog.values(), key=lambda c: (c.time, c.degree, c.n_steps))
    het = _heterogeneous(b) if len(b.lengths) > SMALL else _heterogeneous(b, *WIDE)
    best = het if het is not None and het.time < hom.time else hom  # ties: the simpler plan
    plans = {id(c): _to_plan(b, c) for c in {id(c): c for c in
                                              (best, hom, homog.get(k_static, hom))}.values()}
    return Comparison(plans[id(best)], plans[id(hom)],
                      None if k_static is None else plans[id(homog[k_static])])


def plan_batch(lengths: Sequence[int], n_ranks: int, capacity: int,
               cost: CostModel | None = None) -> Plan:
    """The plan the executor runs: the fastest candidate by the cost model.

    `lengths`: tokens of each sequence of the global batch (index = position in the batch);
    `n_ranks`: data x context ranks (a power of two); `capacity`: tokens one GPU holds in a
    micro-step (`cost.max_tokens_per_gpu()` when unsure). Same input, same plan, on every rank.
    """
    return compare_plans(lengths, n_ranks, capacity, cost).best


def plan_homogeneous(lengths: Sequence[int], n_ranks: int, capacity: int, degree: int,
                     cost: CostModel | None = None) -> Plan:
    """The best plan with every group of one degree (static SP at that degree)."""
    return compare_plans(lengths, n_ranks, capacity, cost, static_degree=degree).static
