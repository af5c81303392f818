"""`resilience.straggler=rebalance`: a reported straggler's groups get less work from the next
step on (`loomtrain.resilience.rebalance`, `loomtrain.parallel.hetero.speeds`).

The plan pass is checked on random batches (every sequence placed once, memory respected, aligned
groups covering every rank, never a slower predicted step, the slow rank's share down). The real
run is 4 gloo ranks under the heterogeneous scheduler with rank 2 50% slower: the straggler is
reported, a rebalance event is written, rank 2's predicted work share per step drops after it, and
the losses and final weights equal the same run without the fault -- rebalancing changes which
rank computes which sequence, not the sum. Robust at a load average of 15: the assertions are on
work shares, which the plans fix given the factors, never on wall time.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from harness import ROOT, assert_parity, case, load_result, run_cases
from loomtrain.config import load_config
from loomtrain.errors import ConfigError
from loomtrain.parallel.hetero import CostModel, PlanError, aligned_blocks, plan_batch
from loomtrain.parallel.hetero.speeds import apply_speeds, effective_time, work_shares
from loomtrain.resilience.rebalance import speed_factors


# ------------------------------------------------------------------------------ the plan pass
def _check(plan, lengths, capacity):
    placed = sorted(s for st in plan.steps for g in st.groups for s in g.seqs)
    assert placed == list(range(len(lengths)))
    blocks = set(aligned_blocks(plan.n_ranks)) | {(r, 1) for r in range(plan.n_ranks)}
    for st in plan.steps:
        assert any(g.seqs for g in st.groups)
        assert sorted(r for g in st.groups for r in range(g.start, g.start + g.degree)) == list(range(plan.n_ranks))
        for g in st.groups:
            assert (g.start, g.degree) in blocks
            assert g.tokens == sum(-(-lengths[s] // g.degree) for s in g.seqs) <= capacity


@pytest.mark.parametrize("seed", range(6))
def test_speeds_move_work_off_the_slow_rank(seed):
    rng = np.random.default_rng(seed)
    n = (4, 8)[seed % 2]
    capacity = 512
    lengths = [int(x) for x in rng.integers(8, 400, size=6 * n)]
    cost = CostModel()
    plan = plan_batch(lengths, n, capacity, cost)
    speeds = [1.0] * n
    speeds[seed % n] = 1.5
    out = apply_speeds(plan, speeds, cost)
    _check(out, lengths, capacity)
    assert out.time <= effective_time(plan, speeds, cost) + 1e-12
    assert out.time == pytest.approx(effective_time(out, speeds, cost))
    assert work_shares(out)[seed % n] < work_shares(plan)[seed % n]
    # the same input gives the same plan: every rank computes it for itself
    assert apply_speeds(plan, speeds, cost).fingerprint == out.fingerprint


def test_equal_speeds_keep_the_plan_and_bad_ones_are_one_error():
    cost = CostModel()
    plan = plan_batch([100, 50, 30, 20], 4, 128, cost)
    assert apply_speeds(plan, [1.3] * 4, cost) is plan
    with pytest.raises(PlanError, match="speed factors for 3 ranks"):
        apply_speeds(plan, [1.0] * 3, cost)
    with pytest.raises(PlanError, match="finite and positive"):
        apply_speeds(plan, [1.0, 0.0, 1.0, 1.0], cost)


def test_speed_factors_are_relative_to_the_median_and_snap_noise_to_one():
    assert speed_factors([1.0, 1.05, 1.6, 0.97], snap=0.15) == [1.0, 1.0, 1.561, 1.0]  # median 1.025
    assert speed_factors([float("nan")] * 3, snap=0.1) == [1.0] * 3


def test_config_takes_rebalance_with_the_hetero_scheduler_only():
    assert load_config(None, ["resilience.straggler=rebalance",
                              "parallel.sequence_scheduler=hetero"]).resilience.straggler == "rebalance"
    with pytest.raises(ConfigError, match="heterogeneous scheduler only"):
        load_config(None, ["resilience.straggler=rebalance"])
    with pytest.raises(ConfigError, match="restart: not built yet"):
        load_config(None, ["resilience.straggler=restart"])


# ------------------------------------------------------------------------------ a real run
WINDOW, STEPS = 8, 64
# sequences up to 128 tokens with room for 256 per rank and micro-step: plans with slack to move
# work into (a plan whose groups are all full of memory has nowhere to put it)
HETERO = ["parallel.sequence_scheduler=hetero", "data.seq_len=128", "data.global_batch_size=16",
          "parallel.hetero_tokens_per_rank=256", f"train.max_steps={STEPS}", "resilience.straggler=rebalance",
          f"resilience.window_steps={WINDOW}", "resilience.min_slowdown=0.15"]


@pytest.fixture(scope="module")
def rebalance_runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("rebalance"))
    run_cases(4, {"slow": case("llama", *HETERO, "fault.slow_rank=2", "fault.slow_factor=1.5"),
                  "clean": case("llama", *HETERO)}, out, timeout=1500)
    return out


def _jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_a_straggler_gets_less_work_and_the_losses_do_not_change(rebalance_runs):
    run = os.path.join(rebalance_runs, "slow")
    events = _jsonl(os.path.join(run, "events.jsonl"))
    straggler = next(e for e in events if e["event"] == "straggler")
    assert straggler["rank"] == 2, events
    rebalance = next(e for e in events if e["event"] == "rebalance")
    assert rebalance["step"] == straggler["step"] and rebalance["from_step"] == straggler["step"] + 1
    assert rebalance["factors"][2] > 1.15 and rebalance["speeds"][2] == rebalance["factors"][2], rebalance
    assert rebalance["work_share_after"][2] < rebalance["work_share_before"][2], rebalance
    # rank 2's share of each step's predicted work, before the re-plan and from it on
    shares: dict[int, float] = {}
    for w in _jsonl(os.path.join(run, "straggler_windows.jsonl")):
        for j, step in enumerate(w["steps"]):
            work = [row[j] for row in w["step_work"]]
            shares[step] = work[2] / sum(work)
    before = [v for s, v in shares.items() if s <= rebalance["step"]]
    after = [v for s, v in shares.items() if s >= rebalance["from_step"]]
    assert len(after) >= WINDOW, (rebalance, STEPS)
    assert np.mean(after) < 0.92 * np.mean(before), (np.mean(before), np.mean(after))
    assert_parity(load_result(rebalance_runs, "slow"), load_result(rebalance_runs, "clean"), "rebalanced run")

    proc = subprocess.run([sys.executable, "-m", "loomtrain.launch", "report", run], cwd=run,
                          env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and f"step {rebalance['step']}: rebalanced the heterogeneous plan" in proc.stdout, \
        proc.stdout + proc.stderr
