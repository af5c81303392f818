"""Gradient accumulation reduces gradients once per step, not once per micro-batch.

One 2-rank gloo launch (tests/accum_worker.py) trains every ZeRO stage with 4 micro-batches per
rank and step, and counts each step's collectives from torch's flight recorder
(`loomtrain.runtime.collectives`). The counts must be exactly what reducing once implies, and the
losses and final parameters must still equal one process's (which runs 8 micro-batches).
`parallel.grad_sync=micro_batch` (reduce after every micro-batch, the old behaviour) runs in the
same launch: it shows that the counter sees the difference and that both give the same numbers.
"""
import json
import os

import pytest

from harness import assert_parity, case, load_result, reference, run_cases

M = 4  # micro-batches per rank and step: 8 sequences / (2 ranks x 1)
LAYERS = 2  # TINY llama
UNITS = LAYERS + 1  # FSDP units: one per decoder block, and the root (embeddings, norm, head)
SMALL_FSDP = 3  # the step's own all-reduces: token count (+FLOPs), loss, gradient norm
SMALL_DDP = 2  # no gradient-norm all-reduce: DDP gradients are whole on every rank
SKIP = 2  # DDP rebuilds its buckets once, in step 2 (two broadcasts): count steps 3-5
ACCUM = ["data.micro_batch_size=1"]
HETERO = ["parallel.sequence_scheduler=hetero", "data.seq_len=128", "data.global_batch_size=16"]
AG, AR = "gloo:all_gather", "gloo:all_reduce"  # FSDP2's reduce-scatter is an all-reduce on gloo
BC = "gloo:broadcast"
WORLD = 2


def _cases() -> dict[str, list[str]]:
    cases = {f"z{z}": case("llama", *ACCUM, f"parallel.zero={z}") for z in (0, 1, 2, 3)}
    cases.update({f"z{z}_mb": case("llama", *ACCUM, f"parallel.zero={z}", "parallel.grad_sync=micro_batch")
                  for z in (0, 2, 3)})
    for sync in ("step", "micro_batch"):
        cases[f"z2_bf16_{sync}"] = case("llama", *ACCUM, "parallel.zero=2", "model.dtype=bfloat16",
                                        f"parallel.grad_sync={sync}")
        cases[f"hetero_z2_{sync}"] = case("llama", *HETERO, "parallel.zero=2", "parallel.hetero_tokens_per_rank=64",
                                          f"parallel.grad_sync={sync}")
    return cases


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return str(tmp_path_factory.mktemp("grad_accum"))


@pytest.fixture(scope="module")
def refs(out):
    return {"llama": reference(case("llama", *ACCUM), os.path.join(out, "ref")),
            "hetero": reference(case("llama", *HETERO), os.path.join(out, "ref_hetero"))}


@pytest.fixture(scope="module")
def four_ranks(out):
    """Pipeline (2 stages x 2 data-parallel ranks, 4 micro-batches through 1F1B) and HSDP 2x2
    (2 micro-batches), ZeRO-2, each reducing once or after every micro-batch."""
    cases = {}
    for sync in ("step", "micro_batch"):
        cases[f"pp2_z2_{sync}"] = case("llama", *ACCUM, "parallel.pp=2", "parallel.zero=2",
                                       f"parallel.grad_sync={sync}")
        cases[f"hsdp_z2_{sync}"] = case("llama", *ACCUM, "parallel.dp_replicate=2", "parallel.dp_shard=2",
                                        "parallel.zero=2", f"parallel.grad_sync={sync}")
    path = os.path.join(out, "four")
    run_cases(4, cases, path, worker="accum_worker.py")
    return path


@pytest.fixture(scope="module")
def two_ranks(out):
    path = os.path.join(out, "two")
    run_cases(2, _cases(), path, worker="accum_worker.py")
    return path


def _counts(path: str, name: str) -> list[dict]:
    with open(os.path.join(path, f"{name}.counts.json"), encoding="utf-8") as fh:
        counts = json.load(fh)
    assert len(counts) == 5 and all(c["complete"] for c in counts), counts
    return counts[SKIP:]


def _assert_ops(path: str, name: str, expected: dict[str, int]) -> None:
    for step, c in enumerate(_counts(path, name), start=SKIP + 1):
        got = {op: c["by_op"].get(op, 0) for op in expected}
        assert got == expected, f"{name} step {step}: collectives {c['by_op']} (total {c['total']}), expected {expected}"


EXPECTED = {
    # DDP: one bucket (the tiny model fits one), all-reduced once per step.
    "z0": {AR: 1 + SMALL_DDP},
    # ZeRO-1: DDP's, plus the sharded optimizer's updated parameters, one flat bucket broadcast per
    # rank (`parameters_as_bucket_view`), not one broadcast per parameter (21 on this model).
    "z1": {AR: 1 + SMALL_DDP, BC: WORLD},
    # ZeRO-2: parameters gathered once (first forward) and kept; gradients reduce-scattered once.
    "z2": {AG: UNITS, AR: UNITS + SMALL_FSDP},
    # ZeRO-3: gathered for every forward and (all but the last block) every backward; reduced once.
    "z3": {AG: M * (2 * UNITS - 1), AR: UNITS + SMALL_FSDP},
    # grad_sync=micro_batch: the behaviour before, reducing after every micro-batch's backward.
    "z0_mb": {AR: M + SMALL_DDP},
    "z2_mb": {AG: M * UNITS, AR: M * UNITS + SMALL_FSDP},
    "z3_mb": {AG: M * (2 * UNITS - 1), AR: M * UNITS + SMALL_FSDP},
}


@pytest.mark.parametrize("name", ["z0", "z1", "z2", "z3"])
def test_reduce_once_per_step_matches_one_process(two_ranks, refs, name):
    _assert_ops(two_ranks, name, EXPECTED[name])
    assert_parity(load_result(two_ranks, name), refs["llama"], f"{name}, 4 micro-batches, 2 ranks")


@pytest.mark.parametrize("name", ["z0_mb", "z2_mb", "z3_mb"])
def test_reduce_every_micro_batch_still_available(two_ranks, refs, name):
    _assert_ops(two_ranks, name, EXPECTED[name])
    assert_parity(load_result(two_ranks, name), refs["llama"], f"{name}, 4 micro-batches, 2 ranks")


def test_zero2_as_few_collectives_as_deepspeed_zero2(two_ranks):
    """DeepSpeed ZeRO-2 issues about 9 per step on this model; we issue exactly 9, a third of the
    per-micro-batch count."""
    once = [c["total"] for c in _counts(two_ranks, "z2")]
    every = [c["total"] for c in _counts(two_ranks, "z2_mb")]
    assert once == [2 * UNITS + SMALL_FSDP] * 3, once
    assert all(e >= 3 * o for e, o in zip(every, once)), (every, once)


def test_bf16_accumulates_in_fp32(two_ranks):
    """Under bf16 FSDP2 accumulates the unsharded gradients in its fp32 reduce dtype: reducing
    once gives the numbers of reducing every micro-batch (in fp32), up to summation order."""
    losses, params = load_result(two_ranks, "z2_bf16_step")
    ref_losses, ref_params = load_result(two_ranks, "z2_bf16_micro_batch")
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(losses, ref_losses)), (losses, ref_losses)
    for name, t in ref_params.items():
        assert (params[name].float() - t.float()).abs().max().item() <= 1e-4, name
    _assert_ops(two_ranks, "z2_bf16_step", EXPECTED["z2"])


def test_hetero_scheduler_reduces_once(two_ranks, refs):
    """The heterogeneous scheduler's micro-steps (whatever their number) reduce once too."""
    assert_parity(load_result(two_ranks, "hetero_z2_step"), refs["hetero"], "hetero ZeRO-2, grad_sync=step")
    assert_parity(load_result(two_ranks, "hetero_z2_micro_batch"), refs["hetero"], "hetero ZeRO-2, micro_batch")
    # On the data-parallel group (the default one here): the parameters gathered once plus the
    # plan's fingerprint check; gradients reduced once plus the loss and gradient-norm sums. The
    # Ulysses groups' own all-to-alls and all-gathers run on groups of their own.
    for c in _counts(two_ranks, "hetero_z2_step"):
        dp = c["by_group"]["default_pg"]
        assert (dp.get(AG, 0), dp.get(AR, 0)) == (UNITS + 1, UNITS + 2), c
    once = sum(c["total"] for c in _counts(two_ranks, "hetero_z2_step"))
    every = sum(c["total"] for c in _counts(two_ranks, "hetero_z2_micro_batch"))
    assert once < every, (once, every)


def test_pipeline_stages_reduce_once(four_ranks, refs):
    """Under pipeline parallelism torch's schedule runs the micro-batches; each stage's full
    backward runs in the same accumulation context, so a stage (one block and the root's
    embeddings or head: 2 FSDP units with parameters) gathers and reduces once per step."""
    for sync in ("step", "micro_batch"):
        assert_parity(load_result(four_ranks, f"pp2_z2_{sync}"), refs["llama"], f"pp2 x dp2 ZeRO-2, {sync}")
    stage_units = 2
    for name, times in (("pp2_z2_step", 1), ("pp2_z2_micro_batch", M)):
        for c in _counts(four_ranks, name):
            fsdp = c["by_group"]["mesh_dp_shard_cp"]
            # reduce-scatters, plus the gradient norm's sum over the shards
            assert (fsdp.get(AG, 0), fsdp.get(AR, 0)) == (times * stage_units, times * stage_units + 1), (name, c)


def test_hsdp_reduces_once(four_ranks, refs):
    """HSDP 2x2: sharded over one pair, replicated across pairs; reduced once either way."""
    for sync in ("step", "micro_batch"):
        assert_parity(load_result(four_ranks, f"hsdp_z2_{sync}"), refs["llama"], f"HSDP 2x2 ZeRO-2, {sync}")
    once = [c["by_op"] for c in _counts(four_ranks, "hsdp_z2_step")]
    every = [c["by_op"] for c in _counts(four_ranks, "hsdp_z2_micro_batch")]
    assert all(o.get(AG, 0) == UNITS for o in once), once
    assert all(e.get(AG, 0) == 2 * UNITS for e in every), every  # 2 micro-batches per rank here
    assert all(e.get(AR, 0) > o.get(AR, 0) for e, o in zip(every, once)), (every, once)
