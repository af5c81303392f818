"""The planner's lower bound: never above the true optimum, which brute force finds on small batches.

Brute force enumerates every plan the executor could run -- every split of the batch into
micro-steps, of each step into groups, every power-of-two degree per group whose memory holds its
sequences, at most N ranks per step (aligned power-of-two blocks fit iff their degrees sum to <= N)
-- and prices it with the cost model, independently of the planner and of the bound's code. Then
bound <= optimum <= the planner's plan, on random instances across rank counts, capacities and
cost models, with the MILP on and off and with few sequences placed by binaries (the divisible
path) as well as all of them.
"""
from __future__ import annotations

import functools
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from loomtrain.parallel.hetero import CostModel, plan_batch
from loomtrain.parallel.hetero.bound import lower_bound

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COSTS = (CostModel(), CostModel(gpus_per_node=2, recompute=True, step_overhead_s=0.0),
         CostModel(step_overhead_s=0.3, inter_bw=5e9, gpus_per_node=1))


def partitions(items):
    """Every set partition of `items` (a tuple), each as a tuple of tuples."""
    if not items:
        yield ()
        return
    first, rest = items[0], items[1:]
    for part in partitions(rest):
        yield ((first,),) + part
        for j in range(len(part)):
            yield part[:j] + ((first,) + part[j],) + part[j + 1:]


def brute_force(lengths, n_ranks, capacity, cost):
    """The least step time of any plan (see the module docstring)."""
    degrees = [1 << k for k in range(n_ranks.bit_length())]

    def group_options(group):  # (degree, load) of each feasible degree for one group
        out = []
        for d in degrees:
            if sum(-(-lengths[i] // d) for i in group) <= capacity:
                out.append((d, cost.group_time([lengths[i] for i in group], d)))
        return out

    @functools.lru_cache(maxsize=None)
    def step_height(seqs):
        best = np.inf
        for groups in partitions(seqs):
            options = [group_options(g) for g in groups]
            for pick in itertools.product(*options):
                if sum(d for d, _ in pick) <= n_ranks:
                    best = min(best, max(t for _, t in pick))
        return best

    return min(sum(step_height(tuple(sorted(s))) + cost.step_overhead_s for s in steps)
               for steps in partitions(tuple(range(len(lengths)))))


def instances(count, seed):
    rng = np.random.default_rng(seed)
    for case in range(count):
        n_ranks = int(rng.choice([1, 2, 4, 8]))
        capacity = int(rng.choice([1024, 4096, 16384]))
        n = int(rng.integers(1, 6))
        if rng.random() < 0.5:  # long-tailed: a few long ones among short ones
            lengths = np.minimum(rng.lognormal(np.log(capacity / 4), 1.2, n), n_ranks * capacity)
        else:
            lengths = rng.integers(1, n_ranks * capacity + 1, n)
        lengths = [max(1, int(x)) for x in lengths]
        yield case, lengths, n_ranks, capacity, COSTS[case % len(COSTS)]


def test_bound_never_exceeds_the_brute_force_optimum():
    """120 random instances: analytic bound <= MILP bound variants (few or all sequences placed
    with binaries; the big-M from the trivial plan or from the planner's) <= optimum <= plan."""
    checked = tight = 0
    for case, lengths, n_ranks, capacity, cost in instances(120, seed=10):
        opt = brute_force(lengths, n_ranks, capacity, cost)
        plan = plan_batch(lengths, n_ranks, capacity, cost)
        assert plan.time >= opt * (1 - 1e-9), (case, lengths, n_ranks, capacity, plan.time, opt)
        analytic = lower_bound(lengths, n_ranks, capacity, cost, seconds=0)
        assert analytic.milp is None and analytic.value <= opt * (1 + 1e-9), (case, analytic, opt)
        for long_max, upper in ((1, None), (2, None), (40, None), (40, plan.time)):
            b = lower_bound(lengths, n_ranks, capacity, cost, seconds=5, long_max=long_max, upper=upper)
            assert b.value <= opt * (1 + 1e-9), (case, lengths, n_ranks, capacity, long_max, b, opt)
            assert b.classes is not None and b.classes <= opt * (1 + 1e-9), (case, lengths, b, opt)
            assert b.value >= analytic.value
            assert b.n_long <= max(1, long_max)
            checked += 1
        tight += b.value >= opt * 0.98
    assert checked == 480
    assert tight >= 80, f"the bound is within 2% of the optimum on only {tight} of 120 instances"


def shaped_instances(count, seed):
    """Equal lengths (many copies of one length: the step-height bound's exact case), and
    lengths uniform over the whole range, across rank counts, capacities and cost models."""
    rng = np.random.default_rng(seed)
    for case in range(count):
        n_ranks = int(rng.choice([2, 4, 8]))
        capacity = int(rng.choice([1024, 4096, 16384]))
        if case % 2 == 0:
            n = int(rng.integers(2, 7))
            lengths = [int(rng.integers(1, n_ranks * capacity + 1))] * n
        else:
            n = int(rng.integers(2, 6))
            lengths = [int(x) for x in rng.integers(1, n_ranks * capacity + 1, n)]
        yield case, lengths, n_ranks, capacity, COSTS[case % len(COSTS)]


def test_step_height_bound_on_equal_and_uniform_lengths():
    """bound <= optimum <= plan for the step-height class bound (and the combined bound) on equal
    and uniform lengths; on equal lengths it is within 2% of the optimum in most instances."""
    tight = equal = 0
    for case, lengths, n_ranks, capacity, cost in shaped_instances(60, seed=11):
        opt = brute_force(lengths, n_ranks, capacity, cost)
        plan = plan_batch(lengths, n_ranks, capacity, cost)
        assert plan.time >= opt * (1 - 1e-9), (case, lengths, n_ranks, capacity, plan.time, opt)
        for upper in (None, plan.time):
            b = lower_bound(lengths, n_ranks, capacity, cost, seconds=5, upper=upper)
            assert b.classes <= opt * (1 + 1e-9), (case, lengths, n_ranks, capacity, b, opt)
            assert b.value <= opt * (1 + 1e-9), (case, lengths, n_ranks, capacity, b, opt)
        if len(set(lengths)) == 1:
            equal += 1
            tight += b.classes >= opt * 0.98
    assert equal == 30
    assert tight >= 20, f"the step-height bound is within 2% of the optimum on {tight} of 30 equal batches"


def test_bound_of_trivial_batches_is_exact():
    cost = CostModel()
    assert lower_bound([], 4, 4096, cost).value == 0.0
    one = lower_bound([3000], 4, 4096, cost)  # one sequence: its fastest degree, one step
    assert one.value == pytest.approx(min(cost.seq_time(3000, d) for d in (1, 2, 4)) + cost.step_overhead_s,
                                      rel=1e-6)
    assert one.solved


def test_plan_json_reports_the_gap(tmp_path):
    lengths = tmp_path / "lengths.txt"
    rng = np.random.default_rng(1)
    lengths.write_text("\n".join(str(int(x)) for x in rng.lognormal(7, 1.5, 2000) + 1))
    out = subprocess.run([sys.executable, "-m", "loomtrain.launch", "plan", "--lengths", str(lengths),
                          "--gpus", "16", "--context-len", "65536", "--batches", "3", "--json",
                          "--bound-seconds", "0.5"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert 0.0 <= r["optimality_gap_mean"] <= r["optimality_gap_max"]
    assert 0.0 < r["bound_step_time_s"] <= r["step_time_s"]["hetero"]
    assert r["bound_solved"] in range(0, 4)
    assert r["optimality_gap_max"] < 1.0  # a sanity ceiling, far above what the planner reaches
    text = subprocess.run([sys.executable, "-m", "loomtrain.launch", "plan", "--lengths", str(lengths),
                           "--gpus", "16", "--context-len", "65536", "--batches", "2",
                           "--bound-seconds", "0"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert text.returncode == 0, text.stderr
    assert "optimality gap" in text.stdout


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_bad_bound_seconds_is_one_line(tmp_path, value):
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("100\n200\n")
    out = subprocess.run([sys.executable, "-m", "loomtrain.launch", "plan", "--lengths", str(lengths),
                          "--gpus", "4", "--context-len", "1024", "--bound-seconds", value],
                         capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode != 0
    assert "--bound-seconds" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_memory_beside_a_time_bound_long_sequence_counts():
    """A batch that nearly fills 64 ranks' memory, with long documents whose attention fills a
    narrow group's time: the MILP's raw-memory row (memory such groups cannot use) raises the
    bound, and it stays below the planner's plan (validity on small instances: brute force above)."""
    from loomtrain.parallel.hetero.bound import tables
    from loomtrain.parallel.hetero.milp import milp_bound

    cost, n_ranks = CostModel(), 64
    capacity = cost.max_tokens_per_gpu()
    rng = np.random.default_rng(8)
    lengths: list[int] = []
    while sum(lengths) < 0.97 * n_ranks * capacity:
        lengths.append(int(min(262_144, max(1, rng.lognormal(np.log(2048), 1.5)))))
    lengths = lengths[:-1]
    plan = plan_batch(lengths, n_ranks, capacity, cost)
    t = tables(lengths, n_ranks, capacity, cost)
    long = [int(i) for i in np.argsort(-np.asarray(lengths), kind="stable")[:12]]
    big = t.per_rank * 2 > capacity
    args = (t.time, t.lat, t.mem, t.feasible, big, long, n_ranks, capacity, cost.step_overhead_s, 20.0, plan.time)
    without = milp_bound(*args)
    with_rows = milp_bound(*args, per_rank=t.per_rank)
    assert without.solved and with_rows.solved
    assert without.value * 1.01 < with_rows.value <= plan.time, (without.value, with_rows.value, plan.time)
