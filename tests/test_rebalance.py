"""`resilience.straggler=rebalance`: a reported straggler's groups get less work from the next
step on (`loomtrain.resilience.rebalance`, `loomtrain.parallel.hetero.speeds`).

The plan pass is checked on random batches (every sequence placed once, memory respected, aligned
groups covering every rank, never a slower predicted step, the slow rank's share down). The real
run is 4 gloo ranks under the heterogeneous scheduler with rank 2 50% slower: the straggler is
reported, a rebalance event is written, rank 2's predicted work share per step drops after it, and
the losses and final weights equal the same run without the fault -- rebalancing changes which
rank computes which sequence, not the sum. A third run's rank 2 recovers after step 32
(`fault.slow_until_step`): its factor goes back to 1 within 3 windows and its work share comes
back, again with the same losses. Robust at a load average of 15: the assertions are on
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
from loomtrain.resilience.rebalance import eased_factors, speed_factors


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


def test_a_recovered_rank_goes_halfway_back_to_one_each_window():
    # measured clearly below its factor: halfway between 1 and the measurement
    assert eased_factors([1.0, 1.5, 1.0, 1.5], [1.0, 1.39, 1.0, 1.5], snap=0.15) == [1.0, 1.195, 1.0, 1.5]
    assert eased_factors([1.0, 1.6, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], snap=0.15) == [1.0, 1.0, 1.0, 1.0]
    assert eased_factors([1.0, 1.8, 1.0, 1.0], [1.0, 1.5, 1.0, 1.0], snap=0.15) == [1.0, 1.25, 1.0, 1.0]
    assert eased_factors([1.0, 1.2, 1.0, 1.0], [1.0, 1.1, 1.0, 1.0], snap=0.15) == [1.0] * 4  # 1.05: snapped
    assert eased_factors([1.0, 1.5], [1.0, 1.45], snap=0.15) is None  # within snap / 2 of its factor: kept
    assert eased_factors([1.0, 1.5], [1.0, 1.64], snap=0.15) is None  # still slow: kept
    assert eased_factors([1.0, 1.0], [1.0, 1.0], snap=0.15) is None


def test_config_takes_rebalance_with_the_hetero_scheduler_only():
    assert load_config(None, ["resilience.straggler=rebalance",
                              "parallel.sequence_scheduler=hetero"]).resilience.straggler == "rebalance"
    with pytest.raises(ConfigError, match="heterogeneous scheduler only"):
        load_config(None, ["resilience.straggler=rebalance"])
    assert load_config(None, ["resilience.straggler=restart",
                              "checkpoint.every=50"]).resilience.straggler == "restart"
    with pytest.raises(ConfigError, match="set checkpoint.every"):
        load_config(None, ["resilience.straggler=restart"])
    with pytest.raises(ConfigError, match="restart_cost_s=-1"):
        load_config(None, ["resilience.restart_cost_s=-1"])


# ------------------------------------------------------------------------------ a real run
WINDOW, STEPS = 8, 64
RECOVER = 32  # the "recovers" run's rank 2 is slow up to this step
# sequences up to 128 tokens with room for 256 per rank and micro-step: plans with slack to move
# work into (a plan whose groups are all full of memory has nowhere to put it)
HETERO = ["parallel.sequence_scheduler=hetero", "data.seq_len=128", "data.global_batch_size=16",
          "parallel.hetero_tokens_per_rank=256", f"train.max_steps={STEPS}", "resilience.straggler=rebalance",
          f"resilience.window_steps={WINDOW}", "resilience.min_slowdown=0.15"]


@pytest.fixture(scope="module")
def rebalance_runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("rebalance"))
    run_cases(4, {"slow": case("llama", *HETERO, "fault.slow_rank=2", "fault.slow_factor=1.5"),
                  "recovers": case("llama", *HETERO, "fault.slow_rank=2", "fault.slow_factor=1.5",
                                   f"fault.slow_until_step={RECOVER}"),
                  "clean": case("llama", *HETERO)}, out, timeout=1800)
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


def _shares(run: str, rank: int) -> dict[int, float]:
    """step -> `rank`'s share of the step's predicted work."""
    shares: dict[int, float] = {}
    for w in _jsonl(os.path.join(run, "straggler_windows.jsonl")):
        for j, step in enumerate(w["steps"]):
            work = [row[j] for row in w["step_work"]]
            shares[step] = work[rank] / sum(work)
    return shares


def test_a_recovered_rank_gets_its_factor_and_its_work_back(rebalance_runs):
    run = os.path.join(rebalance_runs, "recovers")
    events = [e for e in _jsonl(os.path.join(run, "events.jsonl")) if e["event"] == "rebalance"]
    first = events[0]
    assert first["reason"] == "straggler" and first["step"] <= RECOVER and first["factors"][2] > 1.15, events
    # after the recovery, rank 2's factor comes down to exactly 1 within 3 windows
    reset = next((e for e in events if e["step"] > RECOVER and e["factors"][2] == 1.0), None)
    assert reset is not None and reset["step"] <= RECOVER + 3 * WINDOW, events
    assert all(f == 1.0 for f in reset["factors"]) and reset["speeds"] == [1.0] * 4, reset
    later = [e for e in events if e["step"] > reset["step"]]
    assert not later, events
    shares = _shares(run, 2)
    rebalanced = [v for s, v in shares.items() if first["from_step"] < s <= RECOVER]
    restored = [v for s, v in shares.items() if s > reset["from_step"]]
    assert rebalanced and len(restored) >= WINDOW // 2, (first, reset, sorted(shares))
    assert np.mean(restored) > np.mean(rebalanced) / 0.92, (np.mean(rebalanced), np.mean(restored))
    assert_parity(load_result(rebalance_runs, "recovers"), load_result(rebalance_runs, "clean"), "recovered run")
