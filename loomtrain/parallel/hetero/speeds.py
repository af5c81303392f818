"""Per-rank speed factors applied to a heterogeneous plan: a slow rank's groups get less work.

The planner (`plan_batch`) treats every rank alike: groups are aligned blocks, and which block
a sequence lands in does not change its predicted time. When one rank computes slower (a
straggler: thermal throttling, a noisy neighbour, a weaker chip), every group it belongs to takes
its time times that rank's factor, and so does every micro-step it is in. `apply_speeds` takes the
planner's plan and moves sequences off the groups whose *effective* time (predicted seconds x the
slowest member's factor) holds a micro-step up, into groups with room -- in the same micro-step
below the slow group's time, or in another micro-step without raising it -- the longest first,
into the group it finishes earliest in. No micro-step gets slower, so the effective plan time
never grows; a micro-step left with no work is dropped. Memory is respected per group (tokens
per rank within the plan's capacity), degrees stay aligned blocks, and every rank still runs the
same number of micro-steps, so the executor runs the result as it runs any plan.

What changes is only which ranks compute which sequences: the loss (a token-weighted sum over
the whole batch) and the gradient are the same up to floating-point summation order.

`Group.time` stays the cost model's prediction for the group (what the straggler monitor divides a
rank's compute time by, so a slow rank still measures slow per unit of work); `Plan.time` becomes
the speed-aware prediction of the step. Plain data in, ties broken by position: every rank that
holds the same plan and factors computes the same result (`Plan.fingerprint64` checks it).
"""
from __future__ import annotations

from typing import Sequence

from loomtrain.parallel.hetero.costmodel import CostModel
from loomtrain.parallel.hetero.plan_types import Group, MicroStep, Plan, PlanError

EPS = 1e-12


def check_speeds(speeds: Sequence[float], n_ranks: int) -> tuple[float, ...]:
    """Factors per pool rank (1.0 typical, 1.5 = takes 1.5x as long); one clear error otherwise."""
    out = tuple(float(s) for s in speeds)
    if len(out) != n_ranks:
        raise PlanError(f"speed factors for {len(out)} ranks, but the plan has {n_ranks}")
    if not all(0 < s < float("inf") for s in out):
        raise PlanError(f"speed factors must be finite and positive, got {list(out)}")
    return out


def work_shares(plan: Plan) -> list[float]:
    """Each rank's share of the plan's predicted rank-seconds (a degree-d group counts for each of
    its d ranks): what the speed factors move off a slow rank."""
    work = [0.0] * plan.n_ranks
    for step in plan.steps:
        for g in step.groups:
            for r in range(g.start, g.start + g.degree):
                work[r] += g.time
    total = sum(work)
    return [w / total if total > 0 else 1.0 / plan.n_ranks for w in work]


def effective_time(plan: Plan, speeds: Sequence[float], cost: CostModel) -> float:
    """Predicted step seconds with each group slowed to its slowest member."""
    speeds = check_speeds(speeds, plan.n_ranks)
    return (sum(max(g.time * max(speeds[g.start:g.start + g.degree]) for g in s.groups) for s in plan.steps)
            + len(plan.steps) * cost.step_overhead_s)


def apply_speeds(plan: Plan, speeds: Sequence[float], cost: CostModel, budget: int = 2000,
                 evaluations: int = 60_000) -> Plan:
    """The plan with work moved off slow ranks (see the module docstring); `plan` itself when
    every factor is equal or nothing can move. At most `budget` changes and `evaluations`
    candidate changes looked at (about 0.1 s of Python: it runs every step, on every rank;
    a count, not a clock, so every rank stops at the same point)."""
    speeds = check_speeds(speeds, plan.n_ranks)
    if len(set(speeds)) <= 1 or not plan.steps:
        return plan
    lengths = plan.lengths
    # groups as mutable rows: [step, start, degree, seqs, tokens, time]
    rows = [[m, g.start, g.degree, list(g.seqs), g.tokens, g.time] for m, s in enumerate(plan.steps) for g in s.groups]
    slow = [max(speeds[r[1]:r[1] + r[2]]) for r in rows]

    var: dict[tuple[int, int], float] = {}

    def tau(length: int, degree: int) -> float:
        """Seconds a sequence adds to a non-empty group of this degree (without its fixed cost)."""
        key = (length, degree)
        if key not in var:
            var[key] = cost.seq_time(length, degree) - cost.group_overhead(degree)
        return var[key]

    def tok(length: int, degree: int) -> int:
        return -(-length // degree)

    def eff(i: int, time: float | None = None) -> float:
        return (rows[i][5] if time is None else time) * slow[i]

    n_steps = len(plan.steps)
    members = [[i for i, r in enumerate(rows) if r[0] == m] for m in range(n_steps)]
    height = [max(eff(i) for i in members[m]) for m in range(n_steps)]
    moved, left = False, [evaluations]
    for m in sorted(range(n_steps), key=lambda m: (-height[m], m)):
        while budget > 0:
            g = min(members[m], key=lambda i: (-eff(i), i))  # the group holding the step up
            if not rows[g][3]:
                break
            best = _best_change(rows, g, m, eff, tau, tok, height, lengths, plan.capacity, cost, left)
            if best is None:
                break
            _, d, s, t = best
            for src, dst, x in ((g, d, s), (d, g, t)):
                if x is None:
                    continue
                rows[src][3].remove(x)
                rows[dst][3].append(x)
            for i in (g, d):
                rows[i][4] = sum(tok(lengths[x], rows[i][2]) for x in rows[i][3])
                rows[i][5] = cost.group_time([lengths[x] for x in rows[i][3]], rows[i][2])
            for k in {m, rows[d][0]}:
                height[k] = max(eff(i) for i in members[k])
            budget -= 1
            moved = True
    if not moved:
        return plan
    return _to_plan(plan, rows, speeds, cost)


def _best_change(rows, g, m, eff, tau, tok, height, lengths, capacity, cost, left):
    """The best way to shorten group `g`, which holds micro-step `m` up: move one of its sequences
    `s` to group d, or swap it with a shorter sequence `t` of d. Scored by the longer of the two
    groups afterwards when d is in the same micro-step (must end below g's time now), by g alone
    when not (then d must stay within its own micro-step's time). Returns (score, d, s, t) or None;
    None too once `left[0]` candidates have been looked at."""
    kg, limit = rows[g][2], eff(g) - EPS
    best = None
    for d, row in enumerate(rows):
        if d == g:
            continue
        kd, same = row[2], row[0] == m
        cap_d = height[row[0]] + EPS
        base_d = row[5] + (0.0 if row[3] else cost.group_overhead(kd))
        for s in rows[g][3]:
            left[0] -= len(row[3]) + 1
            if left[0] < 0:
                return None
            ls = lengths[s]
            gone = tau(ls, kg) + (cost.group_overhead(kg) if len(rows[g][3]) == 1 else 0.0)
            for t in [None] + [x for x in row[3] if lengths[x] < ls]:
                lt = 0 if t is None else lengths[t]
                if t is None:
                    g_time, d_time = rows[g][5] - gone, base_d + tau(ls, kd)
                    d_tok = row[4] + tok(ls, kd)
                    g_tok = 0
                else:
                    g_time = rows[g][5] - tau(ls, kg) + tau(lt, kg)
                    d_time = row[5] - tau(lt, kd) + tau(ls, kd)
                    d_tok = row[4] - tok(lt, kd) + tok(ls, kd)
                    g_tok = rows[g][4] - tok(ls, kg) + tok(lt, kg)
                if d_tok > capacity or g_tok > capacity:
                    continue
                eg, ed = eff(g, g_time), eff(d, d_time)
                score = max(eg, ed) if same else eg
                if score >= limit or (not same and ed > cap_d):
                    continue
                cand = (score, d, s, t)
                if best is None or (score, -ls, lt, d, s) < (best[0], -lengths[best[2]],
                                                            0 if best[3] is None else lengths[best[3]],
                                                            best[1], best[2]):
                    best = cand
    return best


def _to_plan(plan: Plan, rows, speeds, cost: CostModel) -> Plan:
    """Rows back into a Plan: a wide group left empty becomes single-rank zero-weight slots, a
    micro-step where nobody works is dropped."""
    steps = []
    for m in range(len(plan.steps)):
        groups = []
        for _, start, degree, seqs, tokens, time in (r for r in rows if r[0] == m):
            if seqs:
                groups.append(Group(start, degree, tuple(sorted(seqs)), tokens, time))
            else:
                groups += [Group(r, 1, (), 0, 0.0) for r in range(start, start + degree)]
        if any(g.seqs for g in groups):
            steps.append(MicroStep(tuple(sorted(groups, key=lambda g: g.start))))
    out = Plan(plan.n_ranks, plan.capacity, plan.lengths, tuple(steps), plan.strategy, plan.degree, 0.0)
    return Plan(out.n_ranks, out.capacity, out.lengths, out.steps, out.strategy, out.degree,
                effective_time(out, speeds, cost))
