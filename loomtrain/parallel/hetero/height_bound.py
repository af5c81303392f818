"""A step-height class bound: how many micro-steps of which height a batch needs, with whole steps.

The area bound divides the batch's least rank-seconds over the ranks as if micro-steps could be
fractional; when a batch needs 1.8 micro-steps' worth of ranks it pays 2 whole ones. This bound
counts whole steps per height class:

* step heights are cut into classes [b_c, b_c+1) (the alone times of the longest sequences at
  every degree, where optimal steps tend to end, and a geometric grid between); a step of class c
  costs at least b_c + the micro-step overhead;
* an integer n_c of steps of class c; every sequence goes to a class (fractions allowed);
* in a step of height H < b_c+1, a group of degree d holds sequences whose times add up to at
  most H - lat_d and whose tokens add up to at most the capacity. So for any dual feasible
  function u of bin packing (Fekete and Schepers 2001), sum u(t / (b_c+1 - lat_d)) <= 1 and
  sum u(tokens / capacity) <= 1 over a group, and summed over a step's groups, d x those add up
  to at most N. Each sequence is charged, per class, the least of each over its feasible degrees
  (two separate rows: time with the best DFF per class and degree, and memory with
  `bound._dff`'s charges). Relaxing the "same degree" link between rows only lowers
  the optimum.

Every plan is a solution (each step in the class of its height, each charge at most what its
groups use), so the MILP's optimum -- or the dual bound HiGHS proves -- is a lower bound. It is
exact for equal lengths whenever the best plan's step heights are alone times (e.g. one sequence
per group). Sequences other than the `exact` longest are pooled in buckets of near-equal length,
charged per token the least ratio of the bucket (valid, and tight where the charge is linear).
"""
from __future__ import annotations

import numpy as np

from loomtrain.parallel.hetero.milp import _quiet_stdout, _scipy

EXACT = 40  # the longest distinct lengths kept as their own type (they set the step heights)
BUCKET = 1.05  # the others pooled by length, each bucket within this ratio
CUT_TYPES = 8  # class boundaries at the alone times of the longest types at every degree
MULTI, MULTI_TYPES = 8, 4  # class boundaries also at k = 1..MULTI copies of the longest types
GRID = 1.05  # geometric grid of class boundaries between the alone times
MAX_SHARES = 4000  # (type, class) pairs solved at most; more: skipped (slow, and weak when lengths vary)
J_MAX = 12  # dual feasible functions u^(j), j = 1..J_MAX, tried per class and degree
EDGE = 1e-6  # boundaries moved down by this share (costs a step at most this share of its height)
SHRINK = 1 - 1e-9  # fractions rounded down before a floor (float error must never raise a charge)


def _dff_rows(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """u(x) for one DFF per column (the one of u^(j), j = 0 (identity) .. J_MAX, charging the
    column's weighted sum most); x > 1 stays inf (does not fit)."""
    xs = np.where(np.isfinite(x), x * SHRINK, 0.0)
    best = xs
    best_sum = (xs * weight[:, None]).sum(axis=0)
    for j in range(1, J_MAX + 1):
        u = np.floor((j + 1) * xs) / j
        s = (u * weight[:, None]).sum(axis=0)
        better = s > best_sum
        best = np.where(better[None, :], u, best)
        best_sum = np.maximum(best_sum, s)
    return np.where(np.isfinite(x) & (x <= 1.0), best, np.inf)


def _types(lengths: np.ndarray):
    """(representatives, member lists): the EXACT longest distinct lengths alone, the rest in
    geometric buckets."""
    uniq = np.unique(lengths)[::-1]  # longest first
    exact = uniq[:EXACT]
    rest = uniq[EXACT:]
    groups = [[int(v)] for v in exact]
    if rest.size:
        key = np.floor(np.log(rest.astype(np.float64)) / np.log(BUCKET)).astype(np.int64)
        for k in np.unique(key)[::-1]:
            groups.append([int(v) for v in rest[key == k]])
    return groups


def height_class_bound(lengths, time, lat, mem, feasible, n_ranks: int, capacity: int, overhead: float,
                       upper: float, time_limit: float) -> tuple[float, bool]:
    """(bound in seconds, solved to optimality); see the module docstring. `time`, `lat`, `mem`,
    `feasible` are `bound.tables`' (mem: rank-tokens charged with fragmentation)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        return 0.0, True
    lat = np.asarray(lat, float)
    n_deg = time.shape[1]
    width = 2.0 ** np.arange(n_deg)
    alone = np.where(feasible, time + lat[None, :], np.inf)
    top = max(float(upper) - overhead, float(alone.min(axis=1).max())) * (1 + 1e-9)
    # class boundaries: 0, the alone times of the exact types, a geometric grid, the top
    groups = _types(lengths)
    uniq, rows, count = np.unique(lengths, return_index=True, return_counts=True)
    pos = {int(v): i for i, v in enumerate(uniq)}
    exact_rows = [rows[pos[g[0]]] for g in groups if len(g) == 1]
    # k copies of one of the longest types in one group: the step heights of near-equal lengths
    reps = np.arange(1, MULTI + 1, dtype=np.float64)
    sub = exact_rows[:MULTI_TYPES]
    multi = (time[sub][:, :, None] * reps[None, None, :] + lat[None, :, None])
    multi = np.where(feasible[sub][:, :, None], multi, np.inf)
    cuts = np.concatenate([alone[exact_rows[:CUT_TYPES]].ravel(), multi.ravel()])
    cuts = cuts[np.isfinite(cuts) & (cuts < top)]
    lo = max(top / 256, float(alone.min()))
    grid = lo * GRID ** np.arange(int(np.log(top / lo) / np.log(GRID)) + 1)
    bounds = np.unique(np.concatenate([[0.0], cuts, grid[grid < top]]))
    keep = np.concatenate([[True], np.diff(bounds) > 1e-12 * top])
    # each boundary a hair below its value: a height equal to a cut (k sequences filling a group
    # exactly) falls in the class above, so the class below may charge them as not fitting
    bounds = np.concatenate([bounds[keep] * (1 - EDGE), [top]])
    n_cls = bounds.size - 1
    hi = bounds[1:]  # charges at the top of each class

    # per distinct length: charges (in ranks) per class
    count = count.astype(np.float64)
    t_u, a_u, m_u = time[rows], alone[rows], mem[rows]
    tim = np.full((uniq.size, n_cls), np.inf)
    for k in range(n_deg):
        room = hi - lat[k]  # [C]
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.where((a_u[:, k:k + 1] < hi[None, :]) & (room[None, :] > 0),
                         t_u[:, k:k + 1] / room[None, :], np.inf)
        u = _dff_rows(x, count)
        tim = np.minimum(tim, width[k] * u)
    mm = np.full((uniq.size, n_cls), np.inf)
    for k in range(n_deg):
        ok = (a_u[:, k:k + 1] < hi[None, :])
        mm = np.minimum(mm, np.where(ok, m_u[:, k:k + 1] / capacity * SHRINK, np.inf))
    # pool into types: charges per token, the least ratio of the members
    n_typ = len(groups)
    size = np.zeros(n_typ)
    charge = [np.full((n_typ, n_cls), np.inf) for _ in range(2)]
    for g, members in enumerate(groups):
        r = np.array([pos[v] for v in members])
        toks = np.array(members, dtype=np.float64)
        size[g] = float((count[r] * toks).sum())
        for c, table in enumerate((tim, mm)):
            charge[c][g] = (table[r] / toks[:, None]).min(axis=0) * size[g]
    # a class charging exactly what the class below it charges costs more for nothing: drop it
    same = np.all([np.all(ch[:, 1:] == ch[:, :-1], axis=0) for ch in charge], axis=0)
    live = np.concatenate([[True], ~same])
    charge = [ch[:, live] for ch in charge]
    bounds = np.concatenate([bounds[:-1][live], [top]])
    if int(np.all([np.isfinite(ch) for ch in charge], axis=0).sum()) > MAX_SHARES:
        return 0.0, False  # too many (type, class) pairs to solve in time: the MILP bound covers it
    return _solve(charge, bounds[:-1], overhead, n_ranks, min(float(lengths.size), upper / overhead
                                                          if overhead > 0 else np.inf), time_limit)


def _solve(charge, cost_lo, overhead, n_ranks, steps_max, time_limit) -> tuple[float, bool]:
    """min sum_c n_c (b_c + overhead) s.t. each type's share sums to 1 over its classes, each
    charge row of class c fits n_c x N ranks, and a class holding any share has a step (a DFF
    may charge a small sequence nothing)."""
    Bounds, LinearConstraint, milp, coo_matrix = _scipy()
    n_typ, n_cls = charge[0].shape
    ok = np.all([np.isfinite(c) for c in charge], axis=0)  # [T, C]
    ti, ci = np.nonzero(ok)
    n_x = ti.size
    n_var = n_x + n_cls  # x (shares), then n (integer step counts)
    r, c, v, lo, hi = [], [], [], [], []
    for t in range(n_typ):  # each type fully placed
        cols = np.flatnonzero(ti == t)
        r += [len(lo)] * cols.size
        c += cols.tolist()
        v += [1.0] * cols.size
        lo.append(1.0)
        hi.append(1.0)
    for table in charge:
        for k in range(n_cls):
            cols = np.flatnonzero(ci == k)
            row = len(lo)
            r += [row] * (cols.size + 1)
            c += cols.tolist() + [n_x + k]
            v += table[ti[cols], k].tolist() + [-float(n_ranks)]
            lo.append(-np.inf)
            hi.append(0.0)
    for k in range(n_cls):  # sum of shares in class k <= (number of types) x n_k
        cols = np.flatnonzero(ci == k)
        row = len(lo)
        r += [row] * (cols.size + 1)
        c += cols.tolist() + [n_x + k]
        v += [1.0] * cols.size + [-float(max(1, cols.size))]
        lo.append(-np.inf)
        hi.append(0.0)
    a = coo_matrix((v, (r, c)), shape=(len(lo), n_var)).tocsr()
    obj = np.concatenate([np.zeros(n_x), np.asarray(cost_lo) + overhead])
    integrality = np.concatenate([np.zeros(n_x), np.ones(n_cls)])
    # an optimal plan has at most one step per sequence and (upper / overhead) steps
    ub = np.concatenate([np.ones(n_x), np.full(n_cls, np.floor(max(1.0, steps_max) + 1e-9))])
    with _quiet_stdout():
        res = milp(obj, constraints=LinearConstraint(a, np.asarray(lo), np.asarray(hi)),
                   integrality=integrality, bounds=Bounds(np.zeros(n_var), ub),
                   options={"time_limit": max(0.05, float(time_limit)), "presolve": True})
    dual = getattr(res, "mip_dual_bound", None)
    if res.status == 0 and dual is None:
        dual = res.fun
    value = float(dual) if dual is not None and np.isfinite(dual) else 0.0
    return max(0.0, value), res.status == 0
