"""Mixture-of-experts models (tiny Mixtral and Qwen3-MoE): the load-balancing loss is HF's, FLOPs
count active parameters, and every layout -- ZeRO-3 over two ranks, expert parallelism alone and
with FSDP of each rank's experts, with tensor parallelism, pipelines -- trains the same curve as
one process, auxiliary loss included; checkpoints resume across ep degrees."""
from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from harness import BASE, LOSS_RTOL, PARAM_ATOL, assert_parity, load_result, reference, run_cases
from loomtrain.config import load_config
from loomtrain.errors import ConfigError
from loomtrain.launch import cli
from loomtrain.models.build import build_meta_model, find_blocks
from loomtrain.models.flops import flop_model
from loomtrain.models.moe import MoeAux, MoeSpec
from loomtrain.parallel.pipeline_moe import carry_router_stats, split_stats
from loomtrain.parallel.tensor import layer_plan
from loomtrain.runtime.preflight import preflight

_GEOMETRY = ["model.config.hidden_size=64", "model.config.num_hidden_layers=2",
             "model.config.num_attention_heads=4", "model.config.num_key_value_heads=2",
             "model.config.num_experts_per_tok=2", "model.config.output_router_logits=true",
             # 50x HF's default weight, so that a wrong auxiliary loss shows in the 1e-5 comparison
             "model.config.router_aux_loss_coef=0.05"]
MODELS = {
    "mixtral": ["model.architecture=mixtral", "model.config.intermediate_size=96",
                "model.config.num_local_experts=4", *_GEOMETRY],
    "qwen3_moe": ["model.architecture=qwen3_moe", "model.config.intermediate_size=96",
                  "model.config.moe_intermediate_size=48", "model.config.num_experts=4",
                  "model.config.norm_topk_prob=true", *_GEOMETRY],
}
# Layouts checked against one process: (ranks, overrides)
LAYOUTS = {
    "zero3_dp2": (2, ["parallel.zero=3"]),
    "ep2": (2, ["parallel.ep=2"]),
    "ep2_dp_shard4": (4, ["parallel.ep=2"]),
    # context parallel splits every row: the ranks of a micro-batch share its router statistics
    "cp2": (2, ["parallel.cp=2"]),
    # ZeRO-2 and recomputation: the recomputed forward exchanges tokens again, in the same order
    "ep2_zero2_ac": (2, ["parallel.ep=2", "parallel.zero=2", "parallel.activation_checkpointing=full"]),
    # tp: attention tensor-parallel as the model's plan says, the MoE layers replicated over tp
    # (plain TP, no SP); Qwen3-MoE's plan entries for a dense MLP its sparse blocks lack dropped
    "ep2_tp2": (4, ["parallel.ep=2", "parallel.tp=2", "parallel.sequence_parallel=false"]),
    "tp2_dp2": (4, ["parallel.tp=2", "parallel.sequence_parallel=false"]),
    # HSDP: experts sharded over ep, replicated over dp_replicate
    "ep2_hsdp": (4, ["parallel.ep=2", "parallel.dp_replicate=2", "parallel.dp_shard=2"]),
    # cp splits every row: its ranks pool the router statistics and send their own tokens
    "ep2_cp2": (4, ["parallel.ep=2", "parallel.cp=2"]),
}


def _case(model: str, *extra: str) -> list[str]:
    return MODELS[model] + BASE + list(extra)


def _hf(model: str):
    if model == "mixtral":
        return MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=128,
                             output_router_logits=True, router_aux_loss_coef=0.05)
    return Qwen3MoeConfig(hidden_size=64, intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                          num_experts_per_tok=2, vocab_size=128, output_router_logits=True,
                          router_aux_loss_coef=0.05)


# --------------------------------------------------------------------------- model-level math
@pytest.mark.parametrize("model", list(MODELS))
def test_aux_loss_is_hf_load_balancing_loss(model):
    """One micro-batch, one rank: loomtrain's term is exactly HF's aux_loss (times its coefficient)."""
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(_hf(model))
    ids = torch.randint(0, 128, (3, 16))
    out = hf(input_ids=ids, output_router_logits=True)
    spec = MoeSpec.of(hf.config)
    aux = MoeAux(spec, 1)
    term = aux.term(out.router_logits, token_ranks=1)
    ref = load_balancing_loss_func(out.router_logits, spec.num_experts, spec.top_k)
    assert torch.allclose(term, spec.aux_coef * ref, rtol=1e-6, atol=0), (term, ref)
    assert out.aux_loss is not None and torch.allclose(out.aux_loss, ref)
    # The gradient flows into the router (f carries none, P does).
    term.backward()
    router = next(p for n, p in hf.named_parameters() if n.endswith("mlp.gate.weight"))
    assert router.grad is not None and router.grad.abs().sum() > 0
    assert aux.finish(None, torch.device("cpu")) == pytest.approx(spec.aux_coef * float(ref), rel=1e-6)
    counts = aux.metrics["moe_tokens_per_expert"]
    assert sum(counts) == 2 * 3 * 16 * spec.top_k  # layers x rows x top-k assignments


@pytest.mark.parametrize("model", list(MODELS))
def test_aux_loss_carried_stage_by_stage_is_hf_loss(model):
    """Pipeline stages pass running router statistics on (`pipeline_moe`): the last stage's term,
    finished from sums carried over two "stages" of two layers each, is HF's loss of all four
    layers, value and router gradients (HF's loss is a product of means over all layers, not a
    sum of per-layer terms)."""
    torch.manual_seed(0)
    cfg = _hf(model)
    cfg.num_hidden_layers = 4
    hf = AutoModelForCausalLM.from_config(cfg)
    spec = MoeSpec.of(hf.config)
    ids = torch.randint(0, 128, (3, 16))
    routers = [p for n, p in hf.named_parameters() if n.endswith("mlp.gate.weight")]

    def router_grads(loss):
        hf.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in routers]

    logits = hf(input_ids=ids, output_router_logits=True).router_logits
    ref = load_balancing_loss_func(logits, spec.num_experts, spec.top_k)
    ref_grads = router_grads(spec.aux_coef * ref)
    logits = hf(input_ids=ids, output_router_logits=True).router_logits
    first = carry_router_stats(spec, (), logits[:2])
    stats, prob_sum = carry_router_stats(spec, first, logits[2:])
    assert not stats.requires_grad and prob_sum.requires_grad
    aux = MoeAux(spec, 1)
    term = aux.term_of(*split_stats(stats)[:1], prob_sum, split_stats(stats)[1], token_ranks=1, defer=True)
    assert torch.allclose(term, spec.aux_coef * ref, rtol=1e-6, atol=0), (term, ref)
    for got, want in zip(router_grads(term), ref_grads):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-9)
    aux.keep_last(1)  # the deferred micro-batch counts once kept
    assert aux.finish(None, torch.device("cpu")) == pytest.approx(spec.aux_coef * float(ref), rel=1e-6)
    assert sum(aux.metrics["moe_tokens_per_expert"]) == 4 * 3 * 16 * spec.top_k


@pytest.mark.parametrize("model", list(MODELS))
def test_flops_count_active_expert_parameters(model):
    cfg = _hf(model)
    fm = flop_model(cfg)
    hf = AutoModelForCausalLM.from_config(cfg)
    assert fm.total_params == sum(p.numel() for p in hf.parameters())
    inter = 96 if model == "mixtral" else 48
    attn = 64 * 64 + 2 * 64 * 32 + 64 * 64  # q, k and v (2 KV heads of 16), o
    experts = 4 * (2 * inter * 64 + 64 * inter)
    router = 4 * 64
    per_layer = attn + experts * 2 // 4 + router  # top-2 of 4 experts
    assert fm.matmul_params == 2 * per_layer + 128 * 64  # + lm_head
    assert fm.inactive_params == 2 * experts // 2
    assert fm.palm_params == fm.total_params - fm.embedding_params - fm.inactive_params


# --------------------------------------------------------------------------- layouts vs one process
@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return str(tmp_path_factory.mktemp("moe"))


@pytest.fixture(scope="module")
def refs(out):
    return {m: reference(_case(m), os.path.join(out, f"ref_{m}")) for m in MODELS}


def _ckpt(where: str, name: str, step: int = 3) -> str:
    return f"checkpoint.resume={os.path.join(where, name, 'checkpoints', f'step_{step:08d}')}"


def _six(*extra: str) -> list[str]:
    """The resume runs: mixtral, 6 steps (the continuous curve is a 6-step one-process run)."""
    return _case("mixtral", "train.max_steps=6", *extra)


def _deep(model: str, *extra: str) -> list[str]:
    """The pipeline runs: 4 layers (2 per stage), auxiliary loss on -- the stages pass the router
    statistics on and the last one finishes HF's loss (`parallel.pipeline_moe`)."""
    return _case(model, "model.config.num_hidden_layers=4", *extra)


# Pipeline layouts checked against one 4-layer process: (ranks, overrides)
PIPELINES = {"pp2": (2, ["parallel.pp=2"]), "pp2_ep2": (4, ["parallel.pp=2", "parallel.ep=2"])}


@pytest.fixture(scope="module")
def launches(out):
    """Two launches: 4 ranks (ep2 x dp_shard_mod_ep2, ep2 x tp2, tp2 x dp2 and pp2 x ep2 parity; an
    ep4 writer), then 2 ranks (ZeRO-3, cp2, ep2 and pp2 parity; ep4 -> ep2 resume; an ep2 writer,
    then ep2 -> ZeRO-3 without ep)."""
    four, two = os.path.join(out, "n4"), os.path.join(out, "n2")

    def parity(n: int) -> dict[str, list[str]]:
        return {**{f"{m}_{name}": _case(m, *extra) for m in MODELS for name, (k, extra) in LAYOUTS.items() if k == n},
                **{f"{m}_{name}": _deep(m, *extra) for m in MODELS for name, (k, extra) in PIPELINES.items() if k == n}}

    run_cases(4, {**parity(4), "ep4_writer": _six("parallel.ep=4", "checkpoint.every=3")}, four, timeout=1500)
    run_cases(2, {**parity(2),
                  "ep4_to_ep2": _six("parallel.ep=2", _ckpt(four, "ep4_writer")),
                  "ep2_writer": _six("parallel.ep=2", "checkpoint.every=3"),
                  "ep2_to_zero3": _six("parallel.zero=3", _ckpt(two, "ep2_writer"))}, two, timeout=900)
    return {"n2": two, "n4": four}


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_match_one_process(launches, refs, model, layout):
    got = load_result(launches[f"n{LAYOUTS[layout][0]}"], f"{model}_{layout}")
    assert_parity(got, refs[model], f"{model} {layout}")


@pytest.fixture(scope="module")
def deep_refs(out):
    return {m: reference(_deep(m), os.path.join(out, f"ref_deep_{m}")) for m in MODELS}


def _aux_losses(run_dir: str) -> list[float]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line)["aux_loss"] for line in fh]


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("layout", list(PIPELINES))
def test_pipelines_with_aux_loss_match_one_process(launches, deep_refs, out, model, layout):
    """pp2 and pp2 x ep2 with the auxiliary loss on: the loss (aux included), the final weights
    and the logged aux loss itself follow one process."""
    where = launches[f"n{PIPELINES[layout][0]}"]
    assert_parity(load_result(where, f"{model}_{layout}"), deep_refs[model], f"{model} {layout}")
    got = _aux_losses(os.path.join(where, f"{model}_{layout}"))
    want = _aux_losses(os.path.join(out, f"ref_deep_{model}"))
    assert len(got) == len(want) and all(w > 0 for w in want)
    for step, (a, b) in enumerate(zip(got, want), start=1):
        assert abs(a - b) <= LOSS_RTOL * b, f"{model} {layout}: step {step} aux loss {a!r} vs {b!r}"


@pytest.fixture(scope="module")
def continuous(out):
    return reference(_six(), os.path.join(out, "ref_six"))


@pytest.mark.parametrize("writer,reader", [("ep4_writer", "ep4_to_ep2"), ("ep2_writer", "ep2_to_zero3")])
def test_resume_across_ep_degrees_continues_the_curve(launches, continuous, writer, reader):
    """A checkpoint written at ep4 resumes at ep2, one written at ep2 under ZeRO-3 without ep;
    writers and readers both follow the one-process 6-step curve."""
    ref_losses, ref_params = continuous
    where = launches["n4"] if writer == "ep4_writer" else launches["n2"]
    assert_parity(load_result(where, writer), continuous, writer)
    losses, params = load_result(launches["n2"], reader)
    assert len(losses) == 3, losses  # steps 4..6
    for step, (a, b) in enumerate(zip(losses, ref_losses[3:]), start=4):
        assert abs(a - b) <= LOSS_RTOL * abs(b), f"{reader}: step {step} loss {a!r} vs continuous {b!r}"
    for name, value in ref_params.items():
        assert (params[name] - value).abs().max() <= PARAM_ATOL, f"{reader}: {name}"


def test_metrics_carry_expert_load_and_aux_loss(refs, out):
    with open(os.path.join(out, "ref_mixtral", "metrics.jsonl"), encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh]
    for rec in records:
        counts = rec["moe_tokens_per_expert"]
        # every token of the step, in every one of the 2 MoE layers, goes to top-2 experts
        assert sum(counts) == 8 * 32 * 2 * 2
        assert rec["moe_imbalance"] >= 1.0 and rec["aux_loss"] > 0


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("extra,world,match", [
    (["parallel.ep=2", "parallel.zero=1"], 2, "needs parallel.zero=2 or 3"),
    (["parallel.ep=3", "data.global_batch_size=12"], 3, "does not divide the model.s 4 experts"),
    (["parallel.ep=4"], 2, "does not divide parallel.dp_shard=2"),
    (["parallel.ep=0"], 2, "parallel.ep=0: must be at least 1"),
    (["parallel.sequence_scheduler=hetero"], 2, "hetero with a mixture-of-experts model"),
    (["parallel.ep=2", "parallel.tp=2"], 4, "needs parallel.sequence_parallel=false"),
    (["parallel.tp=2"], 2, "mixture-of-experts model needs parallel.sequence_parallel=false"),
])
def test_bad_moe_layouts_are_refused_before_launch(extra, world, match):
    with pytest.raises(ConfigError, match=match):
        preflight(load_config(None, _case("mixtral", *extra)), world)


@pytest.mark.parametrize("extra,dense_mlp", [([], False), (["model.config.mlp_only_layers=[1]"], True)])
def test_qwen3_moe_tp_plan_is_what_its_blocks_hold(extra, dense_mlp):
    """Qwen3-MoE's plan also names a dense MLP (for `mlp_only_layers`) and the experts: the plan
    applied keeps attention, drops the experts (ep or replicated) and keeps the dense-MLP entries
    only when some block has a dense MLP (where only those blocks get them)."""
    cfg = load_config(None, _case("qwen3_moe", "parallel.tp=2", "parallel.sequence_parallel=false", *extra))
    preflight(cfg, 2)
    hf_config = _hf("qwen3_moe")
    hf_config.mlp_only_layers = [1] if dense_mlp else []
    meta = build_meta_model(hf_config)
    paths = {e.path for e in layer_plan(meta, find_blocks(meta))}
    attention = {f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")}
    dense = {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert paths == (attention | dense if dense_mlp else attention)


def test_ep_on_a_dense_model_is_refused_before_launch():
    with pytest.raises(ConfigError, match="has no experts"):
        preflight(load_config(None, BASE + ["model.architecture=llama", "parallel.ep=2"]), 2)


def test_ep_checkpoint_exports_to_hf_bit_identical(launches, tmp_path):
    """The ep2 run's last checkpoint, exported offline, loads with from_pretrained as the run's
    final parameters, bit for bit (HF names, global shapes)."""
    hf_dir = str(tmp_path / "hf")
    assert cli.main(["ckpt", "export-hf", os.path.join(launches["n2"], "ep2_writer", "checkpoints"), hf_dir]) == 0
    hf, info = AutoModelForCausalLM.from_pretrained(hf_dir, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    _, params = load_result(launches["n2"], "ep2_writer")
    loaded = hf.state_dict()
    assert set(params) == set(loaded)
    for name, value in params.items():
        assert torch.equal(loaded[name], value), name
