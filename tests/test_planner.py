"""Heterogeneous SP planner: plan invariants (property-based), the cost model, `loomtrain plan`.

No process groups here: the planner is plain data in, plain data out, and every rank runs it, so
its guarantees (coverage, alignment, memory, same micro-step count, determinism, never slower than
one degree) are checked directly over random batches. Speed is a benchmark figure
(`benchmarks/plan_wikipedia.py`), not a timed assertion on a shared 2-core machine.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loomtrain.errors import ConfigError, LoomError
from loomtrain.launch import cli
from loomtrain.parallel.hetero import (CostModel, PlanError, aligned_blocks, calibrate, compare_plans,
                                       plan_batch, plan_homogeneous, verify_same_plan)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COST = CostModel()
# small nodes (groups cross them early), recomputation, and no per-step overhead at all
COSTS = (COST, CostModel(gpus_per_node=2, recompute=True), CostModel(step_overhead_s=0.0, inter_bw=5e9))


def check_plan(plan, lengths, n_ranks, capacity, cost=COST):
    """Every invariant the executor relies on, checked from scratch (not via the planner)."""
    assert plan.n_ranks == n_ranks and plan.lengths == tuple(lengths)
    seen = Counter()
    for step in plan.steps:
        cursor = 0
        for g in step.groups:  # sorted, disjoint, covering [0, n): each starts where the last ended
            assert g.start == cursor, (g, cursor)
            assert g.degree >= 1 and g.degree & (g.degree - 1) == 0, g
            assert g.start % g.degree == 0, f"group {g.start}+{g.degree} not aligned"
            cursor += g.degree
            per_rank = sum(-(-lengths[s] // g.degree) for s in g.seqs)
            assert per_rank == g.tokens <= capacity, (g, capacity)
            if g.empty:
                assert g.degree == 1 and g.time == 0.0
            else:
                assert math.isclose(g.time, cost.group_time([lengths[s] for s in g.seqs], g.degree),
                                    rel_tol=1e-9)
            seen.update(g.seqs)
        assert cursor == n_ranks
        assert any(not g.empty for g in step.groups), "an all-empty micro-step was kept"
    assert seen == Counter(range(len(lengths))), "a sequence is missing or assigned twice"
    slots = [plan.for_rank(r) for r in range(n_ranks)]
    assert {len(s) for s in slots} == {len(plan.steps)}, "ranks disagree on the micro-step count"
    for r, mine in enumerate(slots):
        for i, slot in enumerate(mine):
            assert slot.step == i and slot.start <= r < slot.start + slot.degree
    expected = sum(s.time for s in plan.steps) + len(plan.steps) * cost.step_overhead_s
    assert math.isclose(plan.time, expected, rel_tol=1e-9, abs_tol=1e-12)
    assert {(g.start, g.degree) for s in plan.steps for g in s.groups if g.degree > 1} \
        <= set(aligned_blocks(n_ranks))


@st.composite
def batches(draw):
    n_ranks = 2 ** draw(st.integers(0, 5))
    capacity = draw(st.sampled_from([512, 2048, 8192]))
    tail = draw(st.sampled_from([1.2, 2.0, 4.0]))  # Pareto-ish long tails, plus uniform picks
    count = draw(st.integers(1, 120))
    seed = draw(st.integers(0, 2 ** 16))
    rng = np.random.default_rng(seed)
    raw = (rng.pareto(tail, count) * 200 + 1).astype(np.int64)
    lengths = np.minimum(raw, n_ranks * capacity).tolist()
    if draw(st.booleans()):  # edge lengths: exactly at a degree's capacity, and one past it
        edge = capacity * draw(st.sampled_from([1, 2])) + draw(st.integers(0, 1))
        lengths[0] = min(n_ranks * capacity, edge)
    cost = draw(st.sampled_from(COSTS))
    return lengths, n_ranks, capacity, cost


@settings(max_examples=int(os.environ.get("PLANNER_EXAMPLES", 80)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_plan_invariants_and_portfolio(batch):
    lengths, n_ranks, capacity, cost = batch
    result = compare_plans(lengths, n_ranks, capacity, cost)
    check_plan(result.best, lengths, n_ranks, capacity, cost)
    check_plan(result.best_homogeneous, lengths, n_ranks, capacity, cost)
    assert result.best_homogeneous.strategy == "homogeneous"
    assert {g.degree for s in result.best_homogeneous.steps for g in s.groups if not g.empty} \
        <= {result.best_homogeneous.degree}
    # never slower than any single degree (checks the bound-based pruning too)
    d = 1
    while d * capacity < max(lengths):
        d *= 2
    while d <= n_ranks:
        homog = plan_homogeneous(lengths, n_ranks, capacity, d, cost)
        check_plan(homog, lengths, n_ranks, capacity, cost)
        assert result.best.time <= homog.time + 1e-12
        assert result.best_homogeneous.time <= homog.time + 1e-12
        d *= 2
    # deterministic: the same plan and fingerprint again, as every rank must compute
    again = plan_batch(list(lengths), n_ranks, capacity, cost)
    assert again == result.best and again.fingerprint == result.best.fingerprint
    verify_same_plan(again, [result.best.fingerprint64] * n_ranks)


def test_long_tail_batch_mixes_degrees_and_beats_static():
    rng = np.random.default_rng(0)
    lengths = (rng.pareto(1.1, 400) * 300 + 1).astype(int).clip(max=8000).tolist()
    lengths[:2] = [60_000, 30_000]  # two long documents among many short ones
    capacity = 8192
    result = compare_plans(lengths, 32, capacity, COST, static_degree=8)
    best = result.best
    check_plan(best, lengths, 32, capacity)
    assert best.strategy == "hetero"
    degrees = {g.degree for s in best.steps for g in s.groups if not g.empty}
    assert 1 in degrees and max(degrees) >= 8, degrees  # short on one rank, long ones wide
    where = best.assignment()
    longest_group = next(g for g in best.steps[where[0][0]].groups if g.start == where[0][1])
    assert longest_group.degree >= 8
    assert best.time < result.best_homogeneous.time <= result.static.time


def test_too_long_and_bad_inputs_are_clear_errors():
    with pytest.raises(PlanError, match=r"sequence 1 has 40,000 tokens.*4 ranks x 8,192"):
        plan_batch([10, 40_000], 4, 8192)
    with pytest.raises(PlanError, match="power of two"):
        plan_batch([10], 6, 8192)
    with pytest.raises(PlanError, match=">= 1"):
        plan_batch([10, 0], 4, 8192)
    with pytest.raises(PlanError, match="static degree 2"):
        compare_plans([20_000], 8, 8192, static_degree=2)
    plan = plan_batch([5, 6], 2, 100)
    with pytest.raises(PlanError, match=r"rank\(s\) \[1\]"):
        verify_same_plan(plan, [plan.fingerprint64, plan.fingerprint64 ^ 1])
    assert plan_batch([], 4, 100).steps == ()
    assert len(aligned_blocks(8)) == 4 + 2 + 1


# ------------------------------------------------------------------------------ cost model
def test_cost_model_is_monotonic_and_sensible_in_degree():
    lengths = np.array([1, 100, 1000, 4096, 32_768, 262_144])
    for d in (1, 2, 8, 16, 64):
        t = COST.seq_times(lengths, d)
        assert np.all(np.diff(t) > 0), d
    assert COST.comm_split(1) == (0.0, 0.0) and COST.group_overhead(1) == 0.0
    # a long sequence gets faster on wider groups; a short one costs more GPU-time there
    assert all(COST.seq_time(262_144, d) > COST.seq_time(262_144, 2 * d) for d in (1, 2, 4, 8, 16, 32))
    gpu_time = [d * COST.seq_time(512, d) for d in (1, 2, 4, 8, 16, 32, 64)]
    assert gpu_time == sorted(gpu_time)
    # crossing a node boundary costs more per token than staying inside one
    intra, inter = COST.comm_split(8), COST.comm_split(16)
    assert inter[1] > 0 == intra[1] and sum(inter) > sum(intra)
    # attention is quadratic: 8x the length, > 8x the time on one GPU
    assert COST.seq_time(262_144, 1) > 8 * COST.seq_time(32_768, 1)
    # memory: recomputation trades time for a larger per-GPU capacity
    ckpt = dataclasses.replace(COST, recompute=True)
    assert ckpt.max_tokens_per_gpu() > 4 * COST.max_tokens_per_gpu() > 0
    assert ckpt.seq_time(4096, 1) > COST.seq_time(4096, 1)
    text = COST.describe()
    assert "TFLOP/s" in text and f"{COST.max_tokens_per_gpu():,} tokens per GPU" in text


def test_cost_model_overrides_and_config():
    cm = CostModel.from_json('{"inter_bw": 50e9, "gpus_per_node": 4}')
    assert cm.inter_bw == 50e9 and cm.gpus_per_node == 4
    with pytest.raises(ConfigError, match="did you mean 'inter_bw'"):
        CostModel.from_dict({"inter_bwidth": 1})
    with pytest.raises(ConfigError, match="power of two"):
        CostModel(gpus_per_node=6)
    with pytest.raises(ConfigError, match="must be int"):
        CostModel.from_dict({"layers": 2.5})
    from loomtrain.config import load_config

    cfg = load_config(None, ["model.config.hidden_size=64", "model.config.num_hidden_layers=2",
                             "model.config.num_attention_heads=4", "model.config.num_key_value_heads=2",
                             "parallel.activation_checkpointing=full"])
    tiny = CostModel.from_config(cfg, inter_bw=10e9)
    assert (tiny.hidden, tiny.layers, tiny.heads, tiny.kv_heads, tiny.recompute, tiny.inter_bw) \
        == (64, 2, 4, 2, True, 10e9)

    class HFConfig:  # what the trainer passes: an HF config object (anything with to_dict)
        def to_dict(self):
            return {"model_type": "gpt2", "n_embd": 128, "n_layer": 3, "n_head": 4, "n_inner": None,
                    "vocab_size": 1000}
    gpt2 = CostModel.from_config(HFConfig())
    assert (gpt2.hidden, gpt2.layers, gpt2.kv_heads, gpt2.ffn, gpt2.gated_mlp) == (128, 3, 4, 512, False)


def test_calibration_recovers_the_coefficients():
    truth = dataclasses.replace(COST, matmul_flops_per_s=310e12, attn_flops_per_s=250e12,
                                intra_bw=220e9, inter_bw=41e9, intra_latency=9e-6,
                                inter_latency=55e-6)
    samples = [(L, d, truth.seq_time(L, d)) for L in (2048, 8192, 65_536, 262_144)
               for d in (1, 2, 8, 16, 64)]
    fitted = calibrate(samples, base=COST)
    for name in ("matmul_flops_per_s", "attn_flops_per_s", "intra_bw", "inter_bw"):
        assert math.isclose(getattr(fitted, name), getattr(truth, name), rel_tol=1e-3), name
    # only what the samples exercise is fitted: no cross-node sample, inter-node stays put
    inside = calibrate([s for s in samples if s[1] <= 8], base=COST)
    assert inside.inter_bw == COST.inter_bw and math.isclose(inside.intra_bw, 220e9, rel_tol=1e-3)
    with pytest.raises(ConfigError):
        calibrate([(100, 3, 1.0)])


# ----------------------------------------------------------------------------- the CLI
def _lengths_file(tmp_path, as_json=False):
    rng = np.random.default_rng(1)
    lengths = (rng.pareto(1.1, 3000) * 300 + 1).astype(int).tolist()
    path = tmp_path / ("lengths.json" if as_json else "lengths.txt")
    path.write_text(json.dumps(lengths) if as_json else "\n".join(map(str, lengths)) + "\n")
    return str(path)


@pytest.mark.parametrize("as_json", [False, True])
def test_plan_cli_json(tmp_path, capsys, as_json):
    path = _lengths_file(tmp_path, as_json)
    argv = ["plan", "--lengths", path, "--gpus", "16", "--context-len", "65536", "--batches", "3",
            "--coeffs", '{"gpu_mem_gb": 40}', "--json"]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("speedup_vs_static", "speedup_vs_best_homogeneous", "planner_ms_per_batch",
                "step_time_s", "static_degree", "cost_model"):
        assert key in report, key
    assert report["speedup_vs_best_homogeneous"] >= 1.0
    assert report["speedup_vs_static"] >= report["speedup_vs_best_homogeneous"]
    assert report["cost_model"]["gpu_mem_gb"] == 40
    assert set(report["step_time_s"]) == {"static", "best_homogeneous", "hetero"}
    assert report["static_degree"] * report["capacity"] >= 65536
    assert cli.main(argv) == 0  # same seed, same batches, same predictions
    again = json.loads(capsys.readouterr().out)
    assert again["step_time_s"] == report["step_time_s"]


def test_plan_cli_table_and_errors(tmp_path):
    path = _lengths_file(tmp_path)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "loomtrain.launch", "plan", *args], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120)

    ok = run("--lengths", path, "--gpus", "8", "--context-len", "16384", "--batch-size", "64",
             "--batches", "2", "--gpus-per-node", "4")
    assert ok.returncode == 0, ok.stderr
    assert "cost model" in ok.stdout and "static SP, degree" in ok.stdout and "planner:" in ok.stdout
    bad = tmp_path / "bad.txt"
    bad.write_text("12\n\n7\nseven\n")
    for args, needle in [
        (["--lengths", str(tmp_path / "nope.txt"), "--gpus", "8", "--context-len", "1024"], "no such file"),
        (["--lengths", str(bad), "--gpus", "8", "--context-len", "1024"],
         "bad.txt:4: not a positive integer"),
        (["--lengths", path, "--gpus", "12", "--context-len", "1024"], "--gpus 12: must be a power of two"),
        (["--lengths", path, "--gpus", "2", "--context-len", "10000000"], "needs"),
        (["--lengths", path, "--gpus", "8", "--context-len", "1024", "--coeffs", '{"bw": 1}'],
         "unknown coefficient"),
    ]:
        proc = run(*args)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith("loomtrain: error:") and needle in lines[0], lines[0]


def test_read_lengths_rejects_bad_json(tmp_path):
    from loomtrain.launch.plan_command import read_lengths

    path = tmp_path / "l.json"
    path.write_text("[3, 4, -1]")
    with pytest.raises(LoomError, match="item 2 is not a positive 64-bit integer: -1"):
        read_lengths(str(path))


def _lognormal_batch(seed: int, n_ranks: int, capacity: int) -> list[int]:
    """Documents of a lognormal law (median 2K, sigma 1.5) up to 256K, as many as fit in N x
    capacity tokens (as `loomtrain plan` samples batches): memory then forces two or three
    micro-steps."""
    rng = np.random.default_rng(seed)
    lengths: list[int] = []
    while True:
        length = int(min(262_144, max(1, rng.lognormal(np.log(2048), 1.5))))
        if sum(lengths) + length > n_ranks * capacity:
            return lengths
        lengths.append(length)


def test_thorough_candidates_help_memory_tight_batches(monkeypatch):
    """Batches that nearly fill the ranks' memory (<= THOROUGH_MAX sequences): `_tall_first` and
    `local_search.descend` never make the plan slower, and make some >= 2% faster (a tall step
    with the long documents on narrow groups, then a short one, instead of two balanced steps)."""
    from loomtrain.parallel.hetero import planner

    capacity = COST.max_tokens_per_gpu()
    batches = [_lognormal_batch(seed, 64, capacity) for seed in range(8)]
    with_them = [plan_batch(b, 64, capacity, COST) for b in batches]
    monkeypatch.setattr(planner, "DESCEND_MAX", 0)
    monkeypatch.setattr(planner, "TALL_TARGETS", 0)
    without = [plan_batch(b, 64, capacity, COST) for b in batches]
    for b, p, q in zip(batches, with_them, without):
        check_plan(p, b, 64, capacity)
        assert p.time <= q.time + 1e-12, (p.time, q.time)
    assert sum(p.time < q.time * 0.98 for p, q in zip(with_them, without)) >= 2, \
        [(p.time, q.time) for p, q in zip(with_them, without)]


def test_descend_keeps_only_faster_degree_changes_within_its_budget():
    """From deliberately poor degrees (the longest sequences on every rank), `descend` returns a
    faster plan, never a slower one, and packs at most `budget` times."""
    from loomtrain.parallel.hetero.local_search import descend
    from loomtrain.parallel.hetero.packer import candidate, pack_groups, prepare

    capacity = COST.max_tokens_per_gpu()
    b = prepare(_lognormal_batch(3, 64, capacity), 64, capacity, COST)
    calls = []

    def pack(m, kreq):
        calls.append(m)
        return candidate(b, pack_groups(b, list(kreq), m, 0), "hetero", None)

    kreq = b.kmin.copy()
    kreq[b.order[:4]] = 6  # the four longest on all 64 ranks
    start = pack(2, kreq)
    calls.clear()
    best, m, k = descend(b, start, 2, kreq, pack, budget=40)
    assert len(calls) <= 40 and best.time < start.time
    assert pack(m, k).time == best.time  # the degrees and step count returned are the plan's
