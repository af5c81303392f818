"""Tied input/output embeddings under pipeline parallelism (parallel/tied.py), on 2 gloo ranks.

A tied Llama and a tied Qwen3 train at pp2 with one process's loss curve and final weights; the
gradient norm counts the shared weight once; a tied Qwen3 checkpoint written at pp2 resumes into
ZeRO-3 dp2, and one written at dp2 resumes into pp2, each continuing the continuous curve.
(pp2 x dp2 runs in the family matrix's 4-rank launch.)
"""
import json
import os

import pytest

from families import STEPS, family_case, run_matrix
from harness import LOSS_RTOL, load_result, reference
from test_family_matrix import _assert_matches

TIED = ["model.config.tie_word_embeddings=true"]
SIX = ["train.max_steps=6", "checkpoint.every=3"]


def tied(family, layout="1proc", *extra):
    return family_case(family, layout, *TIED, *extra)


def ckpt(base, name, step=3):
    return f"checkpoint.resume={os.path.join(base, name, 'checkpoints', f'step_{step:08d}')}"


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tied_pipeline"))


@pytest.fixture(scope="module")
def two_ranks(out):
    path = os.path.join(out, "two")
    run_matrix(2, {
        "llama_pp2": tied("llama", "pp2"),
        "qwen3_pp2": tied("qwen3", "pp2", *SIX),
        "qwen3_dp2": tied("qwen3", "zero3_dp2", *SIX),
        "qwen3_pp2_to_dp2": tied("qwen3", "zero3_dp2", "train.max_steps=6", ckpt(path, "qwen3_pp2")),
        "qwen3_dp2_to_pp2": tied("qwen3", "pp2", "train.max_steps=6", ckpt(path, "qwen3_dp2")),
    }, path)
    return path


@pytest.fixture(scope="module")
def refs(out):
    return {"llama": reference(tied("llama"), os.path.join(out, "ref_llama")),
            "qwen3": reference(tied("qwen3", "1proc", "train.max_steps=6"), os.path.join(out, "ref_qwen3"))}


def _result(path, name):
    error = os.path.join(path, f"{name}.error")
    if os.path.exists(error):
        with open(error, encoding="utf-8") as fh:
            pytest.fail(f"{name} raised {fh.read()}")
    return load_result(path, name)


def test_models_are_tied(refs):
    for family, (_, params) in refs.items():
        assert params["lm_head.weight"].equal(params["model.embed_tokens.weight"]), family


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_tied_pp2_matches_one_process(two_ranks, refs, family):
    name = f"{family}_pp2"
    _assert_matches(_result(two_ranks, name), refs[family], f"tied {family} pp2")


def test_shared_weight_counts_once_in_grad_norm(out, two_ranks, refs):
    with open(os.path.join(two_ranks, "llama_pp2.json"), encoding="utf-8") as fh:
        norms = json.load(fh)["grad_norms"]
    with open(os.path.join(out, "ref_llama", "metrics.jsonl"), encoding="utf-8") as fh:
        ref_norms = [json.loads(line)["grad_norm"] for line in fh]
    assert len(norms) == len(ref_norms) == STEPS
    for a, b in zip(norms, ref_norms):
        assert abs(a - b) <= 1e-5 * b, (norms, ref_norms)


@pytest.mark.parametrize("name", ["qwen3_pp2_to_dp2", "qwen3_dp2_to_pp2"])
def test_resume_between_pipeline_and_plain_layouts(two_ranks, refs, name):
    losses, params = _result(two_ranks, name)
    continuous = refs["qwen3"][0][3:]
    assert len(losses) == 3, losses
    for step, (a, b) in enumerate(zip(losses, continuous), start=4):
        assert abs(a - b) <= LOSS_RTOL * abs(b), f"{name}: step {step} loss {a!r} vs continuous {b!r}"
    assert set(params) == set(refs["qwen3"][1])
