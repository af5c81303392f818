"""The fused linear + cross-entropy (`loomtrain.kernels.fused_loss`) against `lm_head` +
`F.cross_entropy`: the kernel alone (odd sizes, ignored labels, scale, soft-capping, bias), the
model path (`kernels.head_loss`) on a tiny HF model of every family it serves, tied and untied,
the selection rules, and real multi-process gloo runs: the kernel over a tp2 vocabulary-split
head, and training with a fused loss under tp2 (with and without sequence parallelism), dp2
(ZeRO-1, 2 and 3), ring cp2 and tp2 x dp2 (FSDP over a vocabulary-parallel head, 4 ranks) against
one process training with the stock loss."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, Gemma2Config, GPT2Config, LlamaConfig, MixtralConfig

from fused_loss_worker import kernel_inputs, kernel_spec
from harness import assert_parity, case, load_result, reference, run_cases
from loomtrain.config import load_config
from loomtrain.errors import ConfigError
from loomtrain.kernels.fused_loss import LogitTransform, fused_linear_cross_entropy
from loomtrain.kernels.head_loss import fused_model_loss
from loomtrain.kernels.loss_select import LIGER, STOCK, TORCH, choose_loss
from loomtrain.models.loss import token_loss_sum
from loomtrain.runtime.preflight import preflight

LOSS_RTOL, GRAD_RTOL = 1e-6, 1e-5


def stock_loss(hidden, weight, labels, bias=None, transform=LogitTransform()):
    z = F.linear(hidden, weight, bias).float() * transform.scale
    if transform.softcap:
        z = transform.softcap * torch.tanh(z / transform.softcap)
    return F.cross_entropy(z.flatten(0, -2), labels.flatten(), ignore_index=-100, reduction="sum")


def close(got: torch.Tensor, ref: torch.Tensor, rtol: float, what: str) -> None:
    """Largest difference within rtol of the reference's largest magnitude."""
    scale = max(ref.abs().max().item(), 1e-30)
    diff = (got.float() - ref.float()).abs().max().item()
    assert diff <= rtol * scale, f"{what}: differs by {diff:.3g} (reference magnitude {scale:.3g})"


def grads_of(fn, *tensors):
    for t in tensors:
        if t is not None:
            t.grad = None
    loss = fn()
    (loss * 0.37).backward()  # an arbitrary upstream scale, as the step's 1 / global tokens
    return loss.detach(), [None if t is None else t.grad.clone() for t in tensors]


@pytest.mark.parametrize("shape,vocab,chunk,transform,bias", [
    ((37,), 1001, 8, LogitTransform(), False),  # odd tokens, odd vocab, chunk not dividing the tokens
    ((3, 13), 257, 0, LogitTransform(scale=0.7, softcap=3.0), True),  # auto chunk, Cohere/Gemma-style logits
    ((5, 7), 130, 1, LogitTransform(scale=1 / 8.0), False),  # one token per chunk, Granite-style scaling
])
def test_kernel_equals_lm_head_plus_cross_entropy(shape, vocab, chunk, transform, bias):
    g = torch.Generator().manual_seed(vocab)
    hidden = torch.randn(*shape, 24, generator=g, requires_grad=True)
    weight = (torch.randn(vocab, 24, generator=g) * 0.5).requires_grad_(True)
    b = torch.randn(vocab, generator=g).requires_grad_(True) if bias else None
    labels = torch.randint(0, vocab, shape, generator=g)
    labels.view(-1)[::4] = -100
    args = (hidden, weight, b)
    ref, ref_grads = grads_of(lambda: stock_loss(hidden, weight, labels, b, transform), *args)
    got, got_grads = grads_of(lambda: fused_linear_cross_entropy(hidden, weight, labels, bias=b, transform=transform,
                                                                  chunk_tokens=chunk), *args)
    close(got, ref, LOSS_RTOL, "loss")
    for name, a, r in zip(("hidden", "weight", "bias"), got_grads, ref_grads):
        if r is not None:
            close(a, r, GRAD_RTOL, f"grad of {name}")


def test_kernel_with_every_label_ignored_is_zero_with_zero_gradients():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    loss = fused_linear_cross_entropy(hidden, weight, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0


# Per-family settings a 203-token tiny model needs (head sizes, special ids inside the vocabulary).
_EXTRA = {"gemma2": {"head_dim": 8, "final_logit_softcapping": 2.0, "query_pre_attn_scalar": 8},
          "gemma3_text": {"head_dim": 8, "final_logit_softcapping": 2.0, "query_pre_attn_scalar": 8},
          "cohere": {"logit_scale": 0.25}, "granite": {"logits_scaling": 4.0},
          "gemma": {"head_dim": 8}, "qwen3": {"head_dim": 8}, "glm4": {"head_dim": 8, "pad_token_id": 0, "eos_token_id": 1},
          "phi3": {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1}, "olmo2": {"pad_token_id": 0},
          "gpt_neox": {"rotary_pct": 0.5}}


def _tiny(kind: str, tie: bool):
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=203, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tie)
    else:
        cfg = AutoConfig.for_model(kind, vocab_size=203, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                                   **_EXTRA.get(kind, {}))
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).train()


@pytest.mark.parametrize("kind,tie", [("llama", False), ("llama", True), ("gemma2", True), ("cohere", True),
                                      ("granite", False), ("gpt2", True)]
                         + [(k, False) for k in ("mistral", "qwen2", "qwen3", "gemma", "gemma3_text", "phi3",
                                                 "olmo2", "glm4", "starcoder2", "gpt_neox")])
def test_model_path_equals_the_models_own_logits(kind, tie):
    model = _tiny(kind, tie)
    choice = choose_loss("on", 5, model.config, device_type="cpu", vocab_parallel=False, hetero=False)
    assert choice.path == TORCH
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 203, (2, 19), generator=g)
    pos = torch.arange(19).expand(2, 19)
    labels = torch.randint(0, 203, (2, 19), generator=g)
    labels[:, :3] = -100
    params = list(model.parameters())

    def stock():
        return token_loss_sum(model(input_ids=ids, position_ids=pos, use_cache=False).logits, labels)

    def fused():
        return fused_model_loss(model, model, choice, input_ids=ids, position_ids=pos, labels=labels)

    ref, ref_grads = grads_of(stock, *params)
    got, got_grads = grads_of(fused, *params)
    close(got, ref, LOSS_RTOL, f"{kind} loss")
    for (name, _), a, r in zip(model.named_parameters(), got_grads, ref_grads):
        close(a, r, GRAD_RTOL, f"{kind} grad of {name}")


def test_selection():
    llama = LlamaConfig()
    sel = lambda mode, **kw: choose_loss(mode, 0, kw.pop("cfg", llama), **{  # noqa: E731
        "device_type": "cpu", "vocab_parallel": False, "hetero": False, **kw})
    assert sel("off").path == STOCK and sel(False).path == STOCK
    assert sel("auto").path == STOCK and sel(True).path == TORCH and sel("on").path == TORCH
    assert sel("auto", vocab_parallel=True, device_type="cuda").path == TORCH  # liger cannot span shards
    assert sel("auto", device_type="cuda").path in (TORCH, LIGER)
    gemma = sel("on", cfg=Gemma2Config(final_logit_softcapping=30.0))
    assert gemma.path == TORCH and gemma.transform.softcap == 30.0
    for kw, gap in (({"hetero": True}, "hetero"), ({"cfg": MixtralConfig()}, "mixtral")):
        auto = sel("auto", **kw)
        assert auto.path == STOCK and gap in auto.reason
        with pytest.raises(ConfigError) as err:
            sel("on", **kw)
        assert gap in str(err.value) and "\n" not in str(err.value)


def test_on_where_it_is_not_built_is_refused_before_launch():
    for extra, gap in ((["parallel.sequence_scheduler=hetero"], "hetero"), (["model.architecture=mixtral"], "mixtral")):
        cfg = load_config(None, case("llama", "kernels.fused_loss=on", *extra))
        with pytest.raises(ConfigError) as err:
            preflight(cfg, 1)
        assert gap in str(err.value) and "\n" not in str(err.value)
    for built, world in ((["parallel.tp=2"], 2), (["parallel.pp=2"], 2), (["parallel.pp=2", "parallel.tp=2"], 4)):
        preflight(load_config(None, case("llama", "kernels.fused_loss=on", *built)), world)  # built: passes


def test_config_section():
    assert load_config(None, ["kernels.fused_loss=off"]).kernels.fused_loss is False  # YAML's off
    assert load_config(None, ["kernels.loss_chunk_tokens=512"]).kernels.loss_chunk_tokens == 512
    for bad in (["kernels.fused_loss=maybe"], ["kernels.loss_chunk_tokens=-1"]):
        with pytest.raises(ConfigError) as err:
            load_config(None, bad)
        assert bad[0].split("=")[0] in str(err.value)


# ---------------------------------------------------------------- multi-process (gloo)
KERNEL_CASES = {"kernel_odd": ["tokens=37", "dim=24", "vocab=1001", "chunk=8"],
                "kernel_capped": ["tokens=20", "dim=16", "vocab=257", "chunk=0", "scale=0.7", "softcap=3.0"]}
ON, OFF = ["kernels.fused_loss=on"], ["kernels.fused_loss=off"]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fused_loss"))


@pytest.fixture(scope="module")
def two_ranks(out):
    cases = dict(KERNEL_CASES)
    cases.update({
        "tp2": case("llama", *ON, "parallel.tp=2", "parallel.sequence_parallel=false"),
        "tp2_sp": case("llama", *ON, "parallel.tp=2", "parallel.sequence_parallel=true"),
        "dp2_zero1": case("llama", *ON, "parallel.zero=1"),
        "dp2_zero2": case("llama", *ON, "parallel.zero=2"),
        "dp2_zero3": case("llama", *ON, "parallel.zero=3"),
        "gpt2_tp2_tied": case("gpt2", *ON, "parallel.tp=2"),
        "cp2_ring": case("llama", *ON, "parallel.cp=2", "parallel.cp_impl=ring"),
        # pipeline: the last stage returns hidden states, the schedule's loss applies the head
        "pp2": case("llama", *ON, "parallel.pp=2"),
        "gpt2_pp2_tied": case("gpt2", *ON, "parallel.pp=2"),
    })
    path = os.path.join(out, "two")
    run_cases(2, cases, path, worker="fused_loss_worker.py")
    return path


@pytest.mark.parametrize("name", sorted(KERNEL_CASES))
def test_tp2_vocab_parallel_kernel_equals_one_process(two_ranks, name):
    spec = kernel_spec(KERNEL_CASES[name])
    hidden, weight, labels = kernel_inputs(spec)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    ref, (ref_h, ref_w) = grads_of(lambda: stock_loss(hidden, weight, labels, transform=spec["transform"]),
                                   hidden, weight)
    ref_h, ref_w = ref_h / 0.37 * 0.5, ref_w / 0.37 * 0.5  # the worker back-propagates loss * 0.5
    shards = []
    for rank in range(2):
        got = load_file(os.path.join(two_ranks, f"{name}.rank{rank}.safetensors"))
        close(got["loss"][0], ref, LOSS_RTOL, f"rank {rank} loss")
        close(got["grad_hidden"], ref_h, GRAD_RTOL, f"rank {rank} grad of hidden")
        start = int(got["start"][0])
        close(got["grad_weight"], ref_w[start:start + got["grad_weight"].shape[0]], GRAD_RTOL,
              f"rank {rank} grad of its head rows")
        shards.append(got["grad_weight"])
    assert sum(s.shape[0] for s in shards) == spec["vocab"]


@pytest.fixture(scope="module")
def refs(out):
    return {m: reference(case(m, *OFF), os.path.join(out, f"ref_{m}")) for m in ("llama", "gpt2")}


@pytest.mark.parametrize("name", ["tp2", "tp2_sp", "dp2_zero1", "dp2_zero2", "dp2_zero3", "gpt2_tp2_tied",
                                  "cp2_ring", "pp2", "gpt2_pp2_tied"])
def test_fused_training_matches_one_process_stock(two_ranks, refs, name):
    model = "gpt2" if name.startswith("gpt2") else "llama"
    assert_parity(load_result(two_ranks, name), refs[model], f"{name} fused vs one process stock")
    _assert_fused_ran(two_ranks, name, 2)


def _assert_fused_ran(path: str, name: str, world: int) -> None:
    """Every rank ran the fused path; under pipelining the last stage returned hidden states."""
    ranks = []
    for rank in range(world):
        with open(os.path.join(path, f"{name}.loss.rank{rank}.json"), encoding="utf-8") as fh:
            ranks.append(json.load(fh))
    assert all(r["path"] == "torch" for r in ranks), ranks
    if "pp2" in name:
        last = [flag for r in ranks for flag in r["last_stage_hidden"]]
        assert last and all(last) and len(last) == world // 2, ranks


@pytest.fixture(scope="module")
def four_ranks(out):
    path = os.path.join(out, "four")
    run_cases(4, {"tp2_dp2_zero3": case("llama", *ON, "parallel.tp=2", "parallel.zero=3"),
                  # the last stage's head is vocabulary-parallel over tp: the fused loss spans the shards
                  "pp2_tp2": case("llama", *ON, "parallel.pp=2", "parallel.tp=2"),
                  # ZeRO-3 inside each stage: the loss function unshards the last stage's head
                  "pp2_dp2_zero3": case("llama", *ON, "parallel.pp=2", "parallel.zero=3")}, path,
              worker="fused_loss_worker.py")
    return path


@pytest.mark.parametrize("name", ["tp2_dp2_zero3", "pp2_tp2", "pp2_dp2_zero3"])
def test_fused_four_ranks_matches_one_process_stock(four_ranks, refs, name):
    assert_parity(load_result(four_ranks, name), refs["llama"], f"{name} fused vs one process stock")
    _assert_fused_ran(four_ranks, name, 4)
