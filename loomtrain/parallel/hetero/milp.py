"""A mixed-integer relaxation of heterogeneous planning, solved with SciPy's HiGHS (`scipy.optimize.milp`).

What it relaxes. A plan is micro-steps; each step holds disjoint aligned groups of ranks; a group of
degree d runs its sequences one after the other (load = sum of their times + a fixed latency) and
holds sum ceil(L / d) <= capacity tokens per rank; a step lasts as long as its slowest group plus a
fixed overhead. The relaxation keeps, per micro-step, only these consequences of that:

* height: the step lasts at least as long as each sequence in it, alone, at its degree;
* area:   N ranks x the step's height >= the rank-seconds (degree x time) of its sequences, plus
          the part of wide groups' idle time short sequences cannot use cheaply;
* memory: N x capacity >= the rank-tokens (degree x ceil(L / degree)) of its sequences, plus the
          memory that groups whose time a long sequence fills cannot use (see `milp_bound`);
* groups: the long sequences at each degree fill a whole number of groups, within the N ranks;

and drops alignment and which sequence shares which group. Every real plan satisfies these, so
the optimum of the relaxation -- or any lower bound HiGHS proves on it within its time limit
(`mip_dual_bound`) -- is a lower bound on every plan's step time.

Only the `long` sequences (those that decide the step heights) are placed with binaries. The rest
("short") are continuous: their least rank-seconds and least rank-tokens over their feasible degrees
are poured, as divisible amounts, into the steps of the long ones or into short-only steps (counted
by an integer, each paying the overhead). Dropping integrality only lowers the optimum, so the bound
stays valid whatever `long` is; more long sequences make it tighter and slower.

Symmetry: steps are labelled by their first long sequence (its "leader", in the order given), so
sequence p sits in a step m <= p, and a step exists iff its leader sits in it -- one labelling per
plan instead of K!.
"""
from __future__ import annotations

import importlib
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from loomtrain.errors import LoomError


def _scipy():
    """SciPy, loaded when a bound is solved: an install requirement, but 0.3 s to import, which
    every `loomtrain` command line would pay (cli imports `plan`'s options), so it is loaded the
    way cli loads a command's module."""
    try:
        opt, sparse = importlib.import_module("scipy.optimize"), importlib.import_module("scipy.sparse")
    except ImportError:
        raise LoomError("the planner's lower bound needs SciPy (pip install scipy), "
                        "or pass --bound-seconds 0 for the analytic bound only") from None
    return opt.Bounds, opt.LinearConstraint, opt.milp, sparse.coo_matrix


@contextmanager
def _quiet_stdout():
    """HiGHS's C++ code can print a debug line to file descriptor 1 even with output off, which
    would corrupt `loomtrain plan --json`; point descriptor 1 at /dev/null while it runs."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


SLACK = 0.02  # a short sequence whose best degree is within 2% of both least costs stays fixed


def _pareto(area_i, mem_i, ks):
    """The degrees where neither a sequence's rank-seconds nor its rank-tokens is beaten by another's."""
    out = []
    for k in ks:
        if not any((area_i[o] <= area_i[k] and mem_i[o] <= mem_i[k]) and
                   (area_i[o] < area_i[k] or mem_i[o] < mem_i[k] or o < k) for o in ks if o != k):
            out.append(int(k))
    return out


def _couple(rows, new, short, area, mem, feasible, n_ranks, h, lead, area_rows, q, q_s, h_s, j, q_short):
    """Short sequences pay rank-seconds and rank-tokens of one same degree (fractions x over the
    degrees where neither is beaten), not the least of each from two different degrees: a second
    area row per step in those actual rank-seconds (ac), and memory totals in x. Where one degree
    beats all others, nothing changes but the memory row, as before."""
    fixed_a = fixed_q = a_max = 0.0
    x_area, x_mem, x_cols = [], [], []
    for i in short:
        ks = _pareto(area[i], mem[i], np.flatnonzero(feasible[i]))
        a_max += float(max(area[i, k] for k in ks))
        least_a, least_q = min(float(area[i, k]) for k in ks), min(float(mem[i, k]) for k in ks)
        if any(area[i, k] <= (1 + SLACK) * least_a and mem[i, k] <= (1 + SLACK) * least_q for k in ks):
            fixed_a, fixed_q = fixed_a + least_a, fixed_q + least_q  # (nearly) one best degree
            continue
        cols = [new(hi=1.0) for _ in ks]
        rows.add(cols, [1.0] * len(cols), 1.0, 1.0)
        x_cols += cols
        x_area += [float(area[i, k]) for k in ks]
        x_mem += [float(mem[i, k]) for k in ks]
    if not x_cols:
        rows.add(q + [q_s], [1.0] * (len(q) + 1), lo=q_short)
        return
    rows.add(q + [q_s] + x_cols, [1.0] * (len(q) + 1) + [-v for v in x_mem], lo=fixed_q)
    ac = [new() for _ in h]
    ac_s = new()
    for m, (cols, vals) in enumerate(area_rows):
        rows.add([h[m], ac[m]] + cols, [float(n_ranks), -1.0] + vals, lo=0.0)
        rows.add([ac[m]] + lead[m], [1.0] + [-a_max] * len(lead[m]), hi=0.0)
    rows.add(ac + [ac_s] + x_cols, [1.0] * (len(ac) + 1) + [-v for v in x_area], lo=fixed_a)
    rows.add([h_s, ac_s], [float(n_ranks), -1.0], lo=0.0)
    rows.add([j, ac_s], [max(a_max, 1.0), -1.0], lo=0.0)


@dataclass(frozen=True)
class MilpBound:
    value: float  # proven lower bound on the relaxation's optimum (0.0 when HiGHS gave none)
    solved: bool  # the relaxation was solved to optimality within the time limit
    objective: float | None  # best relaxed plan found (an upper bound on the relaxation only)
    placed: tuple = ()  # in that relaxed plan: (sequence, micro-step, degree exponent) of each long one


class _Rows:
    """Sparse constraint rows lo <= A x <= hi, built one row at a time."""

    def __init__(self):
        self.r, self.c, self.v, self.lo, self.hi = [], [], [], [], []

    def add(self, cols, vals, lo=-np.inf, hi=np.inf):
        row = len(self.lo)
        self.r.extend([row] * len(cols))
        self.c.extend(cols)
        self.v.extend(vals)
        self.lo.append(lo)
        self.hi.append(hi)

    def constraint(self, n_vars):
        _, LinearConstraint, _, coo_matrix = _scipy()
        a = coo_matrix((self.v, (self.r, self.c)), shape=(len(self.lo), n_vars)).tocsr()
        return LinearConstraint(a, np.asarray(self.lo), np.asarray(self.hi))


def milp_bound(time, lat, mem, feasible, big, long, n_ranks: int, capacity: int, overhead: float,
               time_limit: float, upper: float, per_rank=None) -> MilpBound:
    """Lower bound on the step time of any plan.

    time[i, k]: seconds of sequence i on a degree-2**k group (without lat[k]); mem[i, k]: its
    rank-tokens there (2**k x ceil(L / 2**k), or more where memory is lost beside it); feasible[i,
    k]: it fits in memory there; big[i, k]: no two such share a group, so their degrees in one step
    add up to at most N; `long`: indices placed with binaries (the rest are divisible), in leader
    order; `upper`: the step time of some plan (no step of a better plan is taller).

    Groups: per step and degree d, an integer G (binary digits g_b) of groups of degree d holding
    long sequences: at least one if any runs at d, one per big one, their loads (sum of times +
    a latency per group) within G x h, and the degrees of all of them within N ranks. The
    product G x h is exact: P = sum 2**b r_b with r_b = h g_b, linearised with `upper` as big-M.

    Idle rank-time in those groups: d x (G h - their loads) rank-seconds, which only sequences at
    degree d can use, at rho_d x their least rank-seconds or more (rho_d: the least such ratio
    over the short sequences). So a share c_d = 1 - 1/rho_d of it is lost to the divisible work:
    the step's area row also counts lam >= c_d x d x (P - loads).

    Memory a time-bound group cannot use (`per_rank`: tokens per rank, ceil(L / d); given, these
    rows are added). Every sequence at degree d takes at least r_d seconds per token it puts on a
    rank (r_d: the least time / per-rank tokens over the batch), so sequence i takes r_d x tok_i
    + e_i with e_i >= 0 its excess (attention's quadratic part, mostly). A group of height h
    holding excess e_g can then hold at most (h - lat - e_g) / r_d tokens per rank, and
    d x max(0, capacity - (h - lat - e_g) / r_d) of its memory is lost. Summed over the G groups
    holding long sequences (max(0, .) summed >= the sum): W >= d x (G capacity - (P - lat G - sum e_i)
    / r_d), linear in G, P and the placements. A second memory row per step counts raw
    tokens: long ones', W, and the short work's (whose raw least rank-tokens, L each, are poured
    like its charged ones). A long document at a narrow degree in a step not much taller than it
    runs fills its group's time, not its memory; the charged rows alone let short work use that
    memory, and so promise one tall step where two are needed.
    """
    time, mem, feasible = np.asarray(time, float), np.asarray(mem, float), np.asarray(feasible, bool)
    big = np.asarray(big, bool)
    lat = np.asarray(lat, float)
    n_deg = time.shape[1]
    width = 2.0 ** np.arange(n_deg)
    area = time * width[None, :]
    long = [int(i) for i in long]
    short = np.setdiff1d(np.arange(time.shape[0]), long)
    least = np.where(feasible[short], area[short], np.inf).min(axis=1) if short.size else np.zeros(0)
    a_short = float(least.sum())
    q_short = float(np.where(feasible[short], mem[short], np.inf).min(axis=1).sum()) if short.size else 0.0
    lost = np.ones(n_deg)  # c_d; with no short sequence every idle rank-second is lost
    for k in range(n_deg):
        ok = feasible[short, k] & (least > 0)
        if ok.any():
            lost[k] = max(0.0, 1.0 - 1.0 / float((area[short[ok], k] / least[ok]).min()))
    n_mem = float(n_ranks) * capacity
    k_long = len(long)
    raw = None
    if per_rank is not None:  # seconds per per-rank token, least over the batch, per degree
        tok = np.asarray(per_rank, float)
        raw = tok * width[None, :]  # raw rank-tokens
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(feasible & (tok > 0), time / tok, np.inf)
        rate = ratio.min(axis=0)
        excess = np.where(feasible, time - rate[None, :] * tok, 0.0)
        excess = np.maximum(excess, 0.0) * (1 - 1e-9)  # float error must never add excess
    big_m = max(float(upper), 0.0)

    kinds: list = []  # per variable: (integer, upper bound)

    def new(integer=False, hi=np.inf):
        kinds.append((integer, hi))
        return len(kinds) - 1

    y: dict = {}  # y[p, m, k]: long sequence p in step m at degree 2**k
    for p, i in enumerate(long):
        for m in range(p + 1):
            for k in np.flatnonzero(feasible[i]):
                y[p, m, int(k)] = new(True, 1.0)
    h = [new(hi=big_m) for _ in range(k_long)]
    a = [new() for _ in range(k_long)]
    q = [new() for _ in range(k_long)]
    a_s, q_s, h_s, j = new(), new(), new(), new(True)
    lead = [[y[m, m, k] for k in np.flatnonzero(feasible[long[m]])] for m in range(k_long)]

    rows = _Rows()
    slots = [[[] for _ in range(k_long)] for _ in range(k_long)]  # slots[p][m]: (col, k)
    for (p, m, k), col in y.items():
        slots[p][m].append((col, k))
    for p, i in enumerate(long):
        rows.add([c for m in range(p + 1) for c, _ in slots[p][m]], [1.0] * sum(
            len(slots[p][m]) for m in range(p + 1)), 1.0, 1.0)  # placed exactly once
        for m in range(p + 1):
            cols = [c for c, _ in slots[p][m]]
            if m < p:  # only in an existing step
                rows.add(cols + lead[m], [1.0] * len(cols) + [-1.0] * len(lead[m]), hi=0.0)
            rows.add([h[m]] + cols, [1.0] + [-(time[i, k] + lat[k]) for _, k in slots[p][m]], lo=0.0)
    area_rows = []
    waste_cols: list[list[int]] = [[] for _ in range(k_long)]
    for m in range(k_long):
        members = [(c, long[p], k) for p in range(m, k_long) for c, k in slots[p][m]]
        lam_cols, rank_cols, rank_vals = [], [], []
        for k in range(n_deg):
            at_k = [(c, i) for c, i, kk in members if kk == k]
            if not at_k or big_m <= 0:
                continue
            # G = sum 2**b g_b groups of degree 2**k hold long sequences here; P = G x h exactly
            bits = [new(True, 1.0) for _ in range((n_ranks >> k).bit_length())]
            prods = [new(hi=big_m) for _ in bits]
            for g, r in zip(bits, prods):
                rows.add([r, h[m]], [1.0, -1.0], hi=0.0)  # r <= h
                rows.add([r, g], [1.0, -big_m], hi=0.0)  # r <= U g
                rows.add([r, h[m], g], [1.0, -1.0, -big_m], lo=-big_m)  # r >= h - U (1 - g)
            weights = [float(1 << b) for b in range(len(bits))]
            rank_cols += bits
            rank_vals += [w * (1 << k) for w in weights]
            cols, loads = [c for c, _ in at_k], [time[i, k] for _, i in at_k]
            for c in cols:  # at least one group if any long sequence runs at this degree
                rows.add(bits + [c], weights + [-1.0], lo=0.0)
            bigs = [c for c, i in at_k if big[i, k]]
            if len(bigs) > 1:  # one group per big one
                rows.add(bits + bigs, weights + [-1.0] * len(bigs), lo=0.0)
            # their load fits G groups of height h: sum t + lat x G <= G h
            rows.add(prods + bits + cols, weights + [-lat[k] * w for w in weights] + [-t for t in loads],
                     lo=0.0)
            if raw is not None and np.isfinite(rate[k]) and rate[k] > 0:
                # memory those groups cannot use (time-bound): W >= d (G cap - (P - lat G - sum e) / r)
                w = new()
                waste_cols[m].append(w)
                dr = float(width[k]) / float(rate[k])
                rows.add([w] + bits + prods + cols,
                         [1.0] + [-(float(width[k]) * capacity + dr * lat[k]) * wb for wb in weights]
                         + [dr * wb for wb in weights] + [-dr * float(excess[i, k]) for _, i in at_k], lo=0.0)
            if lost[k] > 0:  # idle time in those groups: lam >= c d (G h - lat G - sum t)
                scale = lost[k] * width[k]
                lam = new()
                lam_cols.append(lam)
                rows.add([lam] + prods + bits + cols,
                         [1.0] + [-scale * w for w in weights] + [scale * lat[k] * w for w in weights]
                         + [scale * t for t in loads], lo=0.0)
        if rank_cols:  # the groups holding long sequences fit the N ranks
            rows.add(rank_cols, rank_vals, hi=float(n_ranks))
        area_rows.append(([c for c, _, _ in members], [-area[i, k] for _, i, k in members]))
        rows.add([h[m], a[m]] + [c for c, _, _ in members] + lam_cols,
                 [float(n_ranks), -1.0] + [-area[i, k] for _, i, k in members] + [-1.0] * len(lam_cols),
                 lo=0.0)  # area
        coef: dict = {c: -mem[i, k] for c, i, k in members}
        for c in lead[m]:
            coef[c] += n_mem
        rows.add([q[m]] + list(coef), [-1.0] + list(coef.values()), lo=0.0)  # memory
        rows.add([a[m]] + lead[m], [1.0] + [-a_short] * len(lead[m]), hi=0.0)  # short work: open steps
    if raw is not None:  # raw tokens: long ones', the memory time-bound groups lose, and short work's
        raw_short = float(np.where(feasible[short], raw[short], np.inf).min(axis=1).sum()) if short.size else 0.0
        qr = [new() for _ in range(k_long)]
        qr_s = new()
        for m in range(k_long):
            members = [(c, long[p], k) for p in range(m, k_long) for c, k in slots[p][m]]
            coef = {c: float(raw[i, k]) for c, i, k in members}
            for c in lead[m]:
                coef[c] -= n_mem
            rows.add([qr[m]] + waste_cols[m] + list(coef), [1.0] * (1 + len(waste_cols[m])) + list(coef.values()),
                     hi=0.0)
        rows.add(qr + [qr_s], [1.0] * (k_long + 1), lo=raw_short)
        rows.add([j, qr_s], [n_mem, -1.0], lo=0.0)
    rows.add(a + [a_s], [1.0] * (k_long + 1), lo=a_short)
    _couple(rows, new, short, area, mem, feasible, n_ranks, h, lead, area_rows, q, q_s, h_s, j, q_short)
    rows.add([h_s, a_s], [float(n_ranks), -1.0], lo=0.0)
    rows.add([j, q_s], [n_mem, -1.0], lo=0.0)
    rows.add([j, a_s], [max(a_short, 1.0), -1.0], lo=0.0)  # short-only work needs a step

    n_vars = len(kinds)
    cost = np.zeros(n_vars)
    cost[h] = 1.0
    cost[h_s] = 1.0
    cost[j] = overhead
    for cols in lead:
        cost[cols] = overhead  # a step exists iff its leader is in it
    Bounds, _, milp, _ = _scipy()
    integrality = np.array([1 if integer else 0 for integer, _ in kinds])
    hi = np.array([b for _, b in kinds])
    with _quiet_stdout():
        res = milp(cost, constraints=rows.constraint(n_vars), integrality=integrality,
                   bounds=Bounds(np.zeros(n_vars), hi),
                   options={"time_limit": max(0.05, float(time_limit)), "presolve": True})
    dual = getattr(res, "mip_dual_bound", None)
    if res.status == 0 and dual is None:
        dual = res.fun
    value = float(dual) if dual is not None and np.isfinite(dual) else 0.0
    placed = () if res.x is None else tuple(
        (long[p], m, k) for (p, m, k), col in y.items() if res.x[col] > 0.5)
    return MilpBound(max(0.0, value), res.status == 0,
                     float(res.fun) if res.fun is not None else None, placed)
