"""Optimizer-state offload against no offload, in real gloo launches.

`cpu` and `interleaved` (device share 0, 0.3, 0.7, 1 and auto; without a GPU the device path is
the host stand-in of `offload.paths`, with its own buffers, copies and thread) train the same
curve as plain AdamW at ZeRO-0/1/2/3 and pp2 on 2 ranks and at tp2 x dp2 on 4 ranks: loss within 1e-6
relative at every step, parameters within 1e-5. The comparison is with the no-offload run of the
same layout in the same launch. `offload.params` (FSDP2 CPUOffloadPolicy, ZeRO-3) alone and with
`cpu` / `interleaved`, at dp2, tp2 x dp2, pp2 x dp2 and under the hetero scheduler, matches too,
and its checkpoints resume without it (and the reverse). A checkpoint saved with offload resumes without it, and the
reverse, continuing the uninterrupted curve, with the same tensor names in both checkpoints.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from harness import case, load_result, run_cases

LOSS_RTOL = 1e-6
PARAM_ATOL = 1e-5
PARAMS = ["offload.params=true"]
SPLITS = {"cpu": ["offload.optimizer=cpu", "offload.group_size=3000"],
          "i0": ["offload.optimizer=interleaved", "offload.gpu_fraction=0", "offload.group_size=1000"],
          "i03": ["offload.optimizer=interleaved", "offload.gpu_fraction=0.3", "offload.group_size=1000"],
          "i07": ["offload.optimizer=interleaved", "offload.gpu_fraction=0.7", "offload.group_size=777"],
          "i1": ["offload.optimizer=interleaved", "offload.gpu_fraction=1", "offload.group_size=1000"]}

OPTIM = {"none": [], "cpu": SPLITS["cpu"],
         "i05": ["offload.optimizer=interleaved", "offload.gpu_fraction=0.5", "offload.group_size=1000"]}
HETERO = ["parallel.sequence_scheduler=hetero", "data.seq_len=128", "data.global_batch_size=16",
          "parallel.hetero_tokens_per_rank=64", "parallel.zero=3"]


def _compare(got: tuple, ref: tuple, what: str) -> None:
    losses, params = got
    ref_losses, ref_params = ref
    assert len(losses) == len(ref_losses) == 5, what
    for step, (a, b) in enumerate(zip(losses, ref_losses), start=1):
        assert abs(a - b) <= LOSS_RTOL * abs(b), f"{what}: step {step} loss {a!r} vs no offload {b!r}"
    assert set(params) == set(ref_params)
    for name, ref_t in ref_params.items():
        diff = (params[name] - ref_t).abs().max().item()
        assert diff <= PARAM_ATOL, f"{what}: parameter {name} differs by {diff:.3g}"
    assert ref_losses[-1] < ref_losses[0], f"{what}: the loss did not fall: {ref_losses}"


def _ckpt_dir(out: str, name: str) -> str:
    return os.path.join(out, f"ckpt_{name}")


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return str(tmp_path_factory.mktemp("offload"))


@pytest.fixture(scope="module")
def two_ranks(out):
    cases = {}
    for zero in (1, 2, 3):
        cases[f"z{zero}_none"] = case("llama", f"parallel.zero={zero}")
        cases.update({f"z{zero}_{k}": case("llama", f"parallel.zero={zero}", *v) for k, v in SPLITS.items()})
    cases["z0_none"] = case("llama", "parallel.zero=0")
    cases["z0_i07"] = case("llama", "parallel.zero=0", *SPLITS["i07"])
    cases["z3_auto"] = case("llama", "parallel.zero=3", "offload.optimizer=interleaved", "offload.group_size=2000")
    # sub-group size planned too (offload.group_size=0): a drift re-plan may re-cut the state mid-run
    cases["z2_plan"] = case("llama", "parallel.zero=2", "offload.optimizer=interleaved", "offload.replan_drift=0.01")
    cases["pp2_none"] = case("llama", "parallel.pp=2")
    cases["pp2_i05"] = case("llama", "parallel.pp=2", "offload.optimizer=interleaved", "offload.gpu_fraction=0.5",
                            "offload.group_size=1000")
    cases["z3_bf16_i05"] = case("llama", "parallel.zero=3", "model.dtype=bfloat16", "offload.optimizer=interleaved",
                                "offload.gpu_fraction=0.5", "offload.group_size=1000")
    # save at step 3 with offload (and train on to 5), resume that step-3 checkpoint without it
    # (ZeRO-3); and the reverse (ZeRO-3, ZeRO-1)
    # offload.params too: saved from host-held parameters, resumed into device-held ones, and back
    for name, zero, save, resume in (("off", 3, SPLITS["i03"], []), ("none", 3, [], SPLITS["i07"]),
                                     ("z1none", 1, [], SPLITS["cpu"]), ("params", 3, PARAMS + SPLITS["i03"], []),
                                     ("toparams", 3, [], PARAMS + SPLITS["cpu"])):
        cases[f"save_{name}"] = case("llama", f"parallel.zero={zero}", f"checkpoint.dir={_ckpt_dir(out, name)}",
                                     "checkpoint.every=3", *save)
        cases[f"resume_{name}"] = case("llama", f"parallel.zero={zero}", "checkpoint.resume=" + os.path.join(
            _ckpt_dir(out, name), "step_00000003"), *resume)
    # offload.params (FSDP2 CPUOffloadPolicy) alone and with each optimizer mode; the hetero
    # scheduler with offload (ZeRO-3, and with offload.params)
    for k in ("none", "cpu", "i05"):
        cases[f"z3p_{k}"] = case("llama", "parallel.zero=3", *PARAMS, *OPTIM[k])
    cases["het_none"] = case("llama", *HETERO)
    cases["het_i05"] = case("llama", *HETERO, *OPTIM["i05"])
    cases["hetp_i05"] = case("llama", *HETERO, *PARAMS, *OPTIM["i05"])
    path = os.path.join(out, "two")
    run_cases(2, cases, path, timeout=1800, worker="offload_worker.py")
    return path


@pytest.fixture(scope="module")
def four_ranks(out):
    tp = ["parallel.tp=2", "parallel.dp_shard=2"]
    cases = {"tp2z3_none": case("llama", *tp, "parallel.zero=3")}
    cases.update({f"tp2z3_{k}": case("llama", *tp, "parallel.zero=3", *v) for k, v in SPLITS.items()})
    cases["tp2z2_none"] = case("llama", *tp, "parallel.zero=2")
    cases["tp2z2_i07"] = case("llama", *tp, "parallel.zero=2", *SPLITS["i07"])
    cases["tp2z3p_i05"] = case("llama", *tp, "parallel.zero=3", *PARAMS, *OPTIM["i05"])
    cases["pp2z3_none"] = case("llama", "parallel.pp=2", "parallel.dp_shard=2", "parallel.zero=3")
    cases["pp2z3p_i05"] = case("llama", "parallel.pp=2", "parallel.dp_shard=2", "parallel.zero=3", *PARAMS,
                               *OPTIM["i05"])
    path = os.path.join(out, "four")
    run_cases(4, cases, path, timeout=1800, worker="offload_worker.py")
    return path


@pytest.mark.parametrize("zero", [1, 2, 3])
@pytest.mark.parametrize("split", list(SPLITS))
def test_offload_matches_no_offload_two_ranks(two_ranks, zero, split):
    _compare(load_result(two_ranks, f"z{zero}_{split}"), load_result(two_ranks, f"z{zero}_none"),
             f"ZeRO-{zero} {split}")


@pytest.mark.parametrize("name, ref", [("z0_i07", "z0_none"), ("z3_auto", "z3_none"), ("z2_plan", "z2_none")])
def test_offload_ddp_and_auto(two_ranks, name, ref):
    _compare(load_result(two_ranks, name), load_result(two_ranks, ref), name)


def test_offload_pipeline_stages(two_ranks):
    _compare(load_result(two_ranks, "pp2_i05"), load_result(two_ranks, "pp2_none"), "pp2 interleaved 0.5")


def test_offload_bf16_keeps_fp32_master_weights(two_ranks):
    """bf16 parameters with fp32 master weights and moments on the host: the curve stays within 1%
    of fp32 training (plain bf16 AdamW has no master copy, so it is not the reference here)."""
    losses, _ = load_result(two_ranks, "z3_bf16_i05")
    ref, _ = load_result(two_ranks, "z3_none")
    assert losses[-1] < losses[0]
    assert all(abs(a - b) <= 1e-2 * b for a, b in zip(losses, ref)), (losses, ref)


@pytest.mark.parametrize("name, ref", [(f"tp2z3_{k}", "tp2z3_none") for k in SPLITS] + [("tp2z2_i07", "tp2z2_none")])
def test_offload_matches_no_offload_tp2_dp2(four_ranks, name, ref):
    _compare(load_result(four_ranks, name), load_result(four_ranks, ref), f"tp2 x dp2 {name}")


def _fsdp_units(path: str, name: str) -> list[dict]:
    with open(os.path.join(path, f"{name}.fsdp.json"), encoding="utf-8") as fh:
        return json.load(fh)


@pytest.mark.parametrize("name", ["z3p_none", "z3p_cpu", "z3p_i05", "hetp_i05"])
def test_offload_params_matches_no_offload(two_ranks, name):
    """offload.params=true: every FSDP unit has CPUOffloadPolicy (every parameter marked for the
    host) and the curve is ZeRO-3's without offload. On CPU the host is the device: the
    host<->device copies, pinning and the gloo side of the grad norm on a CUDA mesh are not run."""
    ref = "het_none" if name.startswith("het") else "z3_none"
    _compare(load_result(two_ranks, name), load_result(two_ranks, ref), name)
    units = _fsdp_units(two_ranks, name)
    assert len(units) >= 3  # two blocks and the root
    assert all(u["policy"] == "CPUOffloadPolicy" and all(u["params_on_host"]) for u in units), units
    assert all(u["policy"] == "OffloadPolicy" and not any(u["params_on_host"])
               for u in _fsdp_units(two_ranks, ref))


def test_hetero_scheduler_with_offload(two_ranks):
    _compare(load_result(two_ranks, "het_i05"), load_result(two_ranks, "het_none"), "hetero interleaved 0.5")


def test_offload_params_tp2_dp2(four_ranks):
    _compare(load_result(four_ranks, "tp2z3p_i05"), load_result(four_ranks, "tp2z3_none"), "tp2 x dp2 params+i05")
    units = _fsdp_units(four_ranks, "tp2z3p_i05")
    assert units and all(u["policy"] == "CPUOffloadPolicy" for u in units)


def test_offload_params_pp2_dp2(four_ranks):
    """pp2 x dp2 (ZeRO-3 per stage) with offload.params and interleaved 0.5: every stage's FSDP
    units offload (rank 0 holds the first stage) and the curve is the one without offload."""
    _compare(load_result(four_ranks, "pp2z3p_i05"), load_result(four_ranks, "pp2z3_none"), "pp2 x dp2 params+i05")
    units = _fsdp_units(four_ranks, "pp2z3p_i05")
    assert units and all(u["policy"] == "CPUOffloadPolicy" for u in units)


def _metrics(two_ranks: str, name: str) -> list[dict]:
    with open(os.path.join(two_ranks, name, "metrics.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_metrics_report_the_update(two_ranks):
    rows = _metrics(two_ranks, "z2_i07")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for r in rows:
        assert r["update_s"] > 0 and r["update_pred_s"] > 0 and r["peak_host_gb"] > 0
        assert abs(r["offload_gpu_fraction"] - 0.7) < 0.05
    assert all(r["offload_gpu_fraction"] == 0 for r in _metrics(two_ranks, "z2_cpu"))
    assert "update_s" not in _metrics(two_ranks, "z2_none")[0]


@pytest.mark.parametrize("name, full", [("off", "z3_none"), ("none", "z3_none"), ("z1none", "z1_none"),
                                        ("params", "z3_none"), ("toparams", "z3_none")])
def test_resume_switches_offload(two_ranks, name, full):
    """Steps 4-5 after a resume at step 3 continue the uninterrupted curve, whichever side offloads."""
    rows = _metrics(two_ranks, f"resume_{name}")
    assert [r["step"] for r in rows] == [4, 5]  # its own output_dir: the steps it ran, numbered on
    full_losses, full_params = load_result(two_ranks, full)
    _compare(load_result(two_ranks, f"save_{name}"), (full_losses, full_params), f"save_{name}")
    losses, params = load_result(two_ranks, f"resume_{name}")
    assert len(losses) == 2
    for a, b in zip(losses, full_losses[3:]):
        assert abs(a - b) <= LOSS_RTOL * abs(b), f"resume_{name}: {losses} vs {full_losses[3:]}"
    for key, ref_t in full_params.items():
        assert (params[key] - ref_t).abs().max().item() <= PARAM_ATOL, f"resume_{name}: {key}"
    # the resumed run offloads iff the saver did not
    assert ("update_s" in rows[0]) == (name not in ("off", "params"))


def test_checkpoint_names_do_not_depend_on_offload(out, two_ranks):
    def entries(name: str) -> dict:
        step = os.path.join(_ckpt_dir(out, name), "step_00000003")
        md = FileSystemReader(step).read_metadata().state_dict_metadata
        return {k: tuple(v.size) for k, v in md.items() if hasattr(v, "size")}
    with_offload, without = entries("off"), entries("none")
    assert with_offload == without == entries("params")
    assert any(k.startswith("optim.state.") and k.endswith(".exp_avg_sq") for k in with_offload)
    assert torch.Size(with_offload["optim.state.model.embed_tokens.weight.exp_avg"]) == \
        torch.Size(with_offload["model.model.embed_tokens.weight"])
