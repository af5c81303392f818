"""The planner's linear memory model: bytes grow linearly in tokens, capacity inverts it, state
shards as ZeRO says, and plans sized by it never give a rank more than fits.

Pure arithmetic and planning: no process groups. The training-run side (the scheduler picking the
capacity) is covered by the hetero parity and resume tests, which run on CPU where the default
capacity stays `data.seq_len`.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from loomtrain.config import Config, replace
from loomtrain.errors import ConfigError
from loomtrain.parallel.hetero import CostModel, plan_batch
from loomtrain.parallel.hetero.memory import MemoryModel, resolve_capacity

GB = 1e9
P7B = 6_738_415_616  # Llama-2-7B parameters


def test_bytes_are_linear_in_tokens():
    for cost in (CostModel(), CostModel(recompute=True), CostModel(hidden=64, layers=2, vocab=256)):
        m = MemoryModel(params=P7B, state_shards=64, cost=cost)
        b0, b1, b2, b64k = (m.bytes_for(t) for t in (0, 1 << 14, 1 << 15, 1 << 16))
        assert b0 == m.fixed_bytes
        assert b2 - b1 == pytest.approx(b1 - b0, rel=1e-12)  # no quadratic term
        assert (b64k - b0) == pytest.approx(4 * (b1 - b0), rel=1e-12)


def test_bf16_matches_the_cost_models_per_token_bytes():
    """At 2-byte activations the memory model and the cost model's capacity agree per token."""
    for cost in (CostModel(), CostModel(recompute=True)):
        m = MemoryModel(params=P7B, state_shards=64, act_bytes=2, cost=cost)
        assert m.bytes_per_token == pytest.approx(cost.act_bytes_per_token, rel=1e-12)


def test_capacity_inverts_the_model():
    m = MemoryModel(params=P7B, state_shards=64, act_bytes=2, reserve_bytes=8 * GB)
    for dev in (16 * GB, 40 * GB, 80 * GB, 141 * GB):
        cap = m.tokens_per_rank(dev)
        assert cap > 0
        assert m.bytes_for(cap) <= dev < m.bytes_for(cap + 1)
    assert m.tokens_per_rank(m.fixed_bytes) == 0
    assert m.tokens_per_rank(1.0) == 0


def test_state_shards_as_zero_says():
    n = 1_000_000
    full = MemoryModel(params=n, state_shards=8, zero=0, gathered_layers=0).state_bytes
    assert full == 16 * n  # fp32 master + fp32 grads + two fp32 moments, unsharded
    assert MemoryModel(params=n, state_shards=8, zero=1).state_bytes == (4 + 4 + 8 / 8) * n
    assert MemoryModel(params=n, state_shards=8, zero=2).state_bytes == (4 + 12 / 8) * n
    z3 = MemoryModel(params=n, state_shards=8, zero=3, gathered_layers=0).state_bytes
    assert z3 == pytest.approx(16 * n / 8)
    # more shards, more room; recomputation and a 2-byte dtype hold more tokens too
    base = MemoryModel(params=P7B, state_shards=8, act_bytes=2)
    dev = 80 * GB
    assert MemoryModel(params=P7B, state_shards=64, act_bytes=2).tokens_per_rank(dev) > base.tokens_per_rank(dev)
    assert base.with_cost(CostModel(recompute=True)).tokens_per_rank(dev) > 5 * base.tokens_per_rank(dev)
    assert dataclasses.replace(base, act_bytes=4).tokens_per_rank(dev) < base.tokens_per_rank(dev)
    with pytest.raises(ConfigError):
        MemoryModel(params=1, zero=4)


def test_for_run_reads_zero_dtype_and_shards():
    cfg = replace(Config(), parallel={"zero": 1}, model={"dtype": "bfloat16"})
    m = MemoryModel.for_run(cfg, CostModel(), params=1000, data_ranks=4, reserve_bytes=5.0)
    assert (m.zero, m.act_bytes, m.state_shards, m.reserve_bytes) == (1, 2, 4, 5.0)
    assert MemoryModel.for_run(Config(), CostModel(), 1000, 0).state_shards == 1


def test_resolve_capacity():
    m = MemoryModel(params=P7B, state_shards=64, act_bytes=2, reserve_bytes=8 * GB)
    assert resolve_capacity(4096, 256, "cuda", m, 80 * GB) == 4096  # configured wins
    assert resolve_capacity(0, 256, "cpu", m, None) == 256  # CPU: the run's sequence length
    assert resolve_capacity(0, 256, "cuda", m, 80 * GB) == m.tokens_per_rank(80 * GB) > 256
    with pytest.raises(ConfigError, match="hetero_tokens_per_rank") as err:
        resolve_capacity(0, 256, "cuda", MemoryModel(params=P7B, zero=0), 80 * GB)  # 108 GB of state
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("dev_gb,recompute", [(24, False), (80, False), (80, True)])
def test_plans_sized_by_the_model_fit_every_rank(dev_gb, recompute):
    """No group of any plan holds more tokens per rank than the device's memory fits."""
    cost = CostModel(recompute=recompute)
    m = MemoryModel(params=P7B, state_shards=64, act_bytes=2, reserve_bytes=4 * GB, cost=cost)
    dev = dev_gb * GB
    cap = m.tokens_per_rank(dev)
    rng = np.random.default_rng(dev_gb + recompute)
    for _ in range(15):
        n_ranks = int(rng.choice([8, 16, 64]))
        lengths = np.minimum(rng.lognormal(np.log(cap / 3), 1.5, int(rng.integers(1, 200))), n_ranks * cap)
        lengths = [max(1, int(x)) for x in lengths]
        plan = plan_batch(lengths, n_ranks, cap, cost)
        for step in plan.steps:
            for g in step.groups:
                per_rank = sum(-(-lengths[s] // g.degree) for s in g.seqs)
                assert per_rank <= cap and m.bytes_for(per_rank) <= dev, (g, per_rank, cap)
