"""Tensor, sequence and pipeline parallelism against one process, alone and composed into
2-D and 3-D layouts (pp x dp x tp on 8 ranks), for Llama and the other supported families.

All models here have 4 decoder layers so that every pipeline schedule (including interleaved
and ZBV with two stages per rank) has a block per stage.
"""
import os

import pytest

from harness import assert_parity, case, load_result, reference, run_cases

L4 = {"llama": ["model.config.num_hidden_layers=4"], "mistral": ["model.config.num_hidden_layers=4"],
      "qwen2": ["model.config.num_hidden_layers=4"],
      "gpt2": ["model.config.n_layer=4", "model.config.tie_word_embeddings=false"]}
SCHEDULES = ["GPipe", "1F1B", "Interleaved1F1B", "ZBVZeroBubble"]
KV1 = ["model.config.num_key_value_heads=1"]  # multi-query attention: fewer KV heads than tp


def c4(model, *extra):
    return case(model, *L4[model], *extra)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return str(tmp_path_factory.mktemp("parity_tp_pp"))


@pytest.fixture(scope="module")
def refs(out):
    refs = {m: reference(c4(m), os.path.join(out, f"ref_{m}")) for m in L4}
    refs["llama_kv1"] = reference(c4("llama", *KV1), os.path.join(out, "ref_llama_kv1"))
    return refs


@pytest.fixture(scope="module")
def two_ranks(out):
    cases = {"tp2": c4("llama", "parallel.tp=2", "parallel.sequence_parallel=false"),
             "tp2_sp": c4("llama", "parallel.tp=2", "parallel.sequence_parallel=true")}
    cases.update({f"pp2_{s}": c4("llama", "parallel.pp=2", f"parallel.pp_schedule={s}",
                                 "parallel.pp_virtual_stages=2") for s in SCHEDULES})
    for family in ("mistral", "qwen2", "gpt2"):
        cases[f"{family}_tp2"] = c4(family, "parallel.tp=2")
        cases[f"{family}_pp2"] = c4(family, "parallel.pp=2")
    cases["tp2_kv1"] = c4("llama", *KV1, "parallel.tp=2")
    path = os.path.join(out, "two")
    run_cases(2, cases, path)
    return path


@pytest.fixture(scope="module")
def four_ranks(out):
    cases = {"tp2_dp2": c4("llama", "parallel.tp=2", "parallel.zero=3"),
             "pp2_dp2": c4("llama", "parallel.pp=2", "parallel.zero=3"),
             "pp2_tp2": c4("llama", "parallel.pp=2", "parallel.tp=2")}
    path = os.path.join(out, "four")
    run_cases(4, cases, path)
    return path


@pytest.mark.parametrize("name", ["tp2", "tp2_sp"])
def test_tensor_parallel(two_ranks, refs, name):
    assert_parity(load_result(two_ranks, name), refs["llama"], name)


def test_tensor_parallel_replicates_too_few_kv_heads(two_ranks, refs):
    assert_parity(load_result(two_ranks, "tp2_kv1"), refs["llama_kv1"], "tp2 with 1 KV head")


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pipeline_schedules(two_ranks, refs, schedule):
    assert_parity(load_result(two_ranks, f"pp2_{schedule}"), refs["llama"], f"pp2 {schedule}")


@pytest.mark.parametrize("name", [f"{m}_{p}" for m in ("mistral", "qwen2", "gpt2") for p in ("tp2", "pp2")])
def test_families(two_ranks, refs, name):
    assert_parity(load_result(two_ranks, name), refs[name.split("_")[0]], name)


@pytest.mark.parametrize("name", ["tp2_dp2", "pp2_dp2", "pp2_tp2"])
def test_two_dimensional_layouts(four_ranks, refs, name):
    assert_parity(load_result(four_ranks, name), refs["llama"], name)


def test_pp2_dp2_tp2_on_8_ranks(out, refs):
    path = os.path.join(out, "eight")
    run_cases(8, {"pp2_dp2_tp2": c4("llama", "parallel.pp=2", "parallel.tp=2", "parallel.zero=3")}, path)
    assert_parity(load_result(path, "pp2_dp2_tp2"), refs["llama"], "pp2 x dp2 x tp2")
