"""Per-step plan of sequence-parallel groups for a batch of variable-length sequences.

A static SP degree sized for the longest sequence pushes every short sequence through
all-to-alls (across nodes once the degree exceeds a node); FlexSP (Wang et al. 2024, arXiv
2412.01523) picks a mix of group degrees every step instead, with a MILP solver. This planner
makes the same choice greedily, in tens of milliseconds, so every rank can run it every step:

1. Degrees. Each sequence gets the smallest power of two whose memory holds it -- also its
   cheapest in GPU-time, as all-to-all volume grows with the degree -- widened, like ByteScale's
   data-aware sharding, only while it would run longer than alpha x tau, tau being the batch's
   GPU-time over N ranks and M micro-steps.
2. Packing (`packer.pack_groups`): long sequences one by one into aligned blocks of each
   micro-step's free ranks, short ones in bulk by water-filling and LPT.
3. Portfolio: a few alphas and micro-step counts (more for small batches); for the winner, its
   few longest sequences narrowed to fit one tall step (`_heterogeneous`), `widen` (the sequence
   holding a step up gets the next degree) and a candidate keeping short sequences off groups
   costing 2x; for batches of <= 400 sequences, `descend` (the longest sequences' degrees moved
   one or two either way, one at a time, while the plan gets faster); the best after `polish`
   (moves off each step's slowest group; for batches of <= 600 sequences after `swap`, exchanges
   inside a step) wins. Batches of <= 400 sequences also try first-step candidates, the rest of
   the batch planned after them: `_fill_first` (one step filled at one degree) and `_tall_first`
   (a step of height H with the longest sequences on the narrowest groups that run them within
   H, filled with the next longest; a few H). The same packer with one degree for every group
   competes; the fastest plan by the cost model wins, so the result is never slower than the
   best homogeneous plan.

Plain data in, ties broken by index: every rank computes the same plan, which
`Plan.fingerprint64` lets the executor check with one all-gather before running it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from loomtrain.parallel.hetero.costmodel import CostModel
from loomtrain.parallel.hetero.local_search import descend, polish, swap, widen
from loomtrain.parallel.hetero.packer import Batch, Candidate, candidate, pack_groups, prepare, to_plan
from loomtrain.parallel.hetero.plan_types import Plan, PlanError

# batches of <= SMALL sequences pack fast: a wider portfolio (alphas, betas, n_long) for them
SMALL, WIDE = 300, (tuple(2.0 ** (e / 8) for e in range(-8, 9)), (0.3, 0.45, 0.55, 0.65, 0.8, 0.9, 1.0), 5)
SWAP_MAX = 600  # batches of at most this many sequences get `swap` before `polish`
# batches of at most this many sequences get the search that pays where memory forces several
# steps: `descend` on the longest ones' degrees, `_fill_first` and `_tall_first`
THOROUGH_MAX = 400
DESCEND_MAX = THOROUGH_MAX
MIN_RATE = 0.5  # a candidate keeps short sequences off groups that need 2x their rank-seconds
TALL_TARGETS, TALL_LONGEST = 6, 6  # `_tall_first`: heights tried, from the alone times of the longest


# ------------------------------------------------------------------------- strategies
def _search_steps(b: Batch, k: int, run, shared: bool = True) -> list[Candidate]:
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


def _homogeneous(b: Batch, k: int) -> Candidate:
    kreq = [k] * len(b.lengths)
    return min(_search_steps(b, k, lambda m: candidate(b, pack_groups(b, kreq, m, k), "homogeneous", 1 << k)),
               key=lambda c: (c.time, c.n_steps))


def _heterogeneous(b: Batch, alphas=tuple(2.0 ** (e / 4) for e in (-3, -1, 1, 3)),
                   betas=(0.45, 0.65, 0.9), n_long=3, thorough: bool = True) -> Candidate | None:
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
            cache[key] = (candidate(b, pack_groups(b, kreq.tolist(), m, 0, min_rate), "hetero", None), m, kreq)
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
    if thorough and len(b.lengths) <= DESCEND_MAX:  # few steps, few long sequences: each degree matters
        best, m0, k0 = descend(b, best, m0, k0, pack)
    finals = [best] + [c for c in (pack(m, k0, MIN_RATE) for m in (m0, m0 + 1)) if c is not None]
    # swaps cost O(pairs): only where few steps make them count, and not in the rest plans of
    # first-step candidates (`thorough` off), whose final plan is swapped once as a whole
    small = thorough and len(b.lengths) <= SWAP_MAX
    return min((candidate(b, polish(b, swap(b, c.bins) if small else c.bins), "hetero", None) for c in finals),
               key=lambda c: (c.time, c.n_steps))


def _first_step_then_rest(b: Batch, idx: list, kreq, k_small: int, rest_plan, height: float | None = None,
                          whole: bool = True) -> Candidate | None:
    """One micro-step holding the longest prefix of `idx` (sequence i at degree >= 2**kreq[i])
    that it fits -- in memory and, when `height` is given, under that height -- the rest planned
    on their own (`rest_plan(lengths) -> Plan`) after it. `whole`: a step that holds the whole
    batch is a candidate too (else None: another candidate covers that case)."""
    def one_step(p):
        sub = prepare([b.lengths[i] for i in idx[:p]], b.n_ranks, b.capacity, b.cost)
        bins = pack_groups(sub, [int(kreq[i]) for i in idx[:p]], 1, k_small)
        if bins is not None and height is not None and max(e[3] for e in bins) > height:
            return None
        return bins

    lo, hi = 0, len(idx)  # the longest prefix that one step holds: lo fits, hi + 1 does not
    if one_step(hi) is None:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if one_step(mid) is not None else (lo, mid)
        hi = lo
    if hi == 0 or (hi == len(b.lengths) and not whole):
        return None
    first = set(idx[:hi])
    bins = [[0, kk, start, load, room, [idx[j] for j in seqs]]
            for _, kk, start, load, room, seqs in one_step(hi)]
    rest = [i for i in range(len(b.lengths)) if i not in first]
    if rest:
        plan = rest_plan([b.lengths[i] for i in rest])
        for m, step in enumerate(plan.steps):
            for g in step.groups:
                if g.seqs:
                    bins.append([m + 1, g.degree.bit_length() - 1, g.start, g.time, b.capacity - g.tokens,
                                 [rest[j] for j in g.seqs]])
    return candidate(b, polish(b, bins), "hetero", None)  # the winner is swapped (`compare_plans`)


def _fill_first(b: Batch, k: int, rest_plan) -> Candidate | None:
    """One micro-step filled at degree 2**k with as many of the longest sequences as it holds,
    the rest planned on their own after it. Balanced steps are not always best: 58 x 16K
    documents on 64 GPUs run fastest as 56 of them 7 to a degree-8 group in one tall step and the
    last two alone on 32 GPUs each in a short one, not as two steps of 29."""
    idx = [i for i in b.order if b.kmin[i] <= k]
    if not idx:
        return None
    return _first_step_then_rest(b, idx, np.full(len(b.lengths), k), k, rest_plan, whole=False)


def _tall_first(b: Batch, rest_plan, upper: float) -> Candidate | None:
    """A first micro-step of height H holding the longest sequences, each at the narrowest degree
    that runs it within H, and as many of the next longest as fit under H; the rest planned on
    their own after it. For H: up to TALL_TARGETS of the alone times of the TALL_LONGEST longest
    sequences at each degree, from the least any plan allows to `upper` (the best plan so far).

    When a batch nearly fills the ranks' memory, two steps are needed and the packer balances
    them, which runs the long documents on wide groups (cross-node all-to-alls, more
    rank-seconds) to keep each step short. One tall step with them on narrow groups and a short
    step for the short documents that did not fit is often faster (the lognormal batches of
    benchmarks/plan_distributions.py: 3-6% per batch)."""
    alone = b.time_np + np.asarray(b.lat)[None, :]
    ks = np.arange(b.n_ranks.bit_length())
    alone = np.where(ks[None, :] >= b.kmin[:, None], alone, np.inf)
    floor = float(alone.min(axis=1).max())  # no step is shorter than the slowest sequence's best
    heights = sorted({float(alone[i, k]) for i in b.order[:TALL_LONGEST] for k in ks
                      if floor - 1e-12 <= alone[i, k] <= upper})
    if len(heights) > TALL_TARGETS:
        pick = np.unique(np.round(np.linspace(0, len(heights) - 1, TALL_TARGETS)).astype(int))
        heights = [heights[q] for q in pick]
    best = None
    for h in heights:
        fits = alone <= h * (1 + 1e-12)
        kreq = np.where(fits.any(axis=1), np.argmax(fits, axis=1), np.argmin(alone, axis=1))
        c = _first_step_then_rest(b, list(b.order), kreq, 0, rest_plan, height=h * (1 + 1e-12))
        if c is not None and (best is None or (c.time, c.n_steps) < (best.time, best.n_steps)):
            best = c
    return best


@dataclass(frozen=True)
class Comparison:
    best: Plan  # the fastest candidate: what the executor runs
    best_homogeneous: Plan  # the fastest plan with one degree for all groups
    static: Plan | None  # the one-degree plan at `static_degree`, when asked for


def compare_plans(lengths: Sequence[int], n_ranks: int, capacity: int, cost: CostModel | None = None,
                  static_degree: int | None = None, fill_first: bool = True) -> Comparison:
    """Plan a batch (see `plan_batch`) and return the winner beside the homogeneous baselines.

    Homogeneous degrees are packed in the order of a lower bound on their time (max of GPU-time
    / N and their slowest sequence) and skipped once that bound exceeds the best one found, which
    finds the same best degree as packing all of them, at a fraction of the cost."""
    b = prepare(lengths, n_ranks, capacity, cost)
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
    homog: dict[int, Candidate] = {}
    for bound, k in bounds:
        if k == k_static or bound <= min((c.time for c in homog.values()), default=math.inf):
            homog[k] = _homogeneous(b, k)
    hom = min(homog.values(), key=lambda c: (c.time, c.degree, c.n_steps))
    # the wide portfolio for small batches; not for the rest of a batch after a first step
    # (`fill_first` off), planned once per candidate first step
    het = _heterogeneous(b, thorough=fill_first) if len(b.lengths) > SMALL or not fill_first else \
        _heterogeneous(b, *WIDE)
    if fill_first and 1 < len(b.lengths) <= THOROUGH_MAX:  # a tall first step, then the rest
        rests: dict = {}  # first-step candidates often leave the same rest

        def rest_plan(sub):
            key = tuple(sub)
            if key not in rests:
                rests[key] = compare_plans(sub, n_ranks, capacity, b.cost, fill_first=False).best
            return rests[key]
        cands = [_fill_first(b, k, rest_plan) for k in range(k_lo, n_ranks.bit_length())]
        so_far = min((c for c in [het, hom, *cands] if c is not None), key=lambda c: (c.time, c.n_steps))
        if so_far.n_steps > 1:  # memory forced several steps: one tall step may beat balanced ones
            cands.append(_tall_first(b, rest_plan, so_far.time - b.cost.step_overhead_s))
        first = min((c for c in cands if c is not None), key=lambda c: (c.time, c.n_steps), default=None)
        if first is not None:  # swaps cost O(pairs): for the best first-step candidate only
            first = candidate(b, polish(b, swap(b, first.bins)), "hetero", None)
            if het is None or (first.time, first.n_steps) < (het.time, het.n_steps):
                het = first
    best = het if het is not None and het.time < hom.time else hom  # ties: the simpler plan
    plans = {id(c): to_plan(b, c) for c in {id(c): c for c in
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
