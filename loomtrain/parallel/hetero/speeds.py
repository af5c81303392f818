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


def apply_speeds(plan: Plan, speeds: Sequence[float], cost: CostModel, budget: int = 2000) -> Plan:
    """The plan with work moved off slow ranks (see the module docstring); `plan` itself when
    every factor is equal or nothing can move."""
    speeds = check_speeds(speeds, plan.n_ranks)
    if len(set(speeds)) <= 1 or not plan.steps:
        return plan
    lengths = plan.lengths
    # groups as mutable rows: [step, start, degree, seqs, tokens, time]
    rows = [[m, g.start, g.degree, list(g.seqs), g.tokens, g.time] for m, s in enumerate(plan.steps) for g in s.groups]
    slow = [max(speeds[r[1]:r[1] + r[2]]) for r in rows]

    var: dict[tuple[int, int], float] = {}

    def added(length: int, row) -> float:
        """Seconds a sequence adds to a group: its own, plus the group's fixed cost if it was empty."""
        key = (length, row[2])
        if key not in var:
            var[key] = cost.seq_time(length, row[2]) - cost.group_overhead(row[2])
        return var[key] + (0.0 if row[3] else cost.group_overhead(row[2]))

    def eff(i: int, time: float | None = None) -> float:
        return (rows[i][5] if time is None else time) * slow[i]

    n_steps = len(plan.steps)
    members = [[i for i, r in enumerate(rows) if r[0] == m] for m in range(n_steps)]
    height = [max(eff(i) for i in members[m]) for m in range(n_steps)]
    moved = False
    for m in sorted(range(n_steps), key=lambda m: (-height[m], m)):
        while budget > 0:
            g = min(members[m], key=lambda i: (-eff(i), i))  # the group holding the step up
            if not rows[g][3]:
                break
            best = None  # (effective time after, -length, destination, sequence, time after, tokens after)
            for s in sorted(rows[g][3], key=lambda s: (-lengths[s], s)):
                for d, row in enumerate(rows):
                    if d == g:
                        continue
                    degree = row[2]
                    tokens = row[4] + -(-lengths[s] // degree)
                    if tokens > plan.capacity:
                        continue
                    after = row[5] + added(lengths[s], row)
                    limit = eff(g) - EPS if row[0] == m else height[row[0]] + EPS
                    if eff(d, after) <= limit:
                        cand = (eff(d, after), -lengths[s], d, s, after, tokens)
                        best = cand if best is None or cand < best else best
                if best is not None:
                    break  # the longest sequence that can move
            if best is None:
                break
            _, _, d, s, after, tokens = best
            rows[g][3].remove(s)
            rows[g][4] -= -(-lengths[s] // rows[g][2])
            rows[g][5] = cost.group_time([lengths[x] for x in rows[g][3]], rows[g][2])
            rows[d][3].append(s)
            rows[d][4], rows[d][5] = tokens, after
            for k in {m, rows[d][0]}:
                height[k] = max(eff(i) for i in members[k])
            budget -= 1
            moved = True
    if not moved:
        return plan
    return _to_plan(plan, rows, speeds, cost)


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
