"""The single-process runtime against independent computations: the first loss by hand with a
plain HF model, a whole run against a hand-written AdamW loop, loading from `model.path` and from
a model instance, HF's own deterministic initialisation, activation checkpointing and bf16, and
torch.compile per block. Everything here runs in this process with no process group (the
config/preflight errors are in test_preflight_errors.py).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from harness import BASE, case
from loomtrain.config import load_config
from loomtrain.errors import LoomError
from loomtrain.data.loader import IGNORE_INDEX, DataLoader
from loomtrain.models.build import find_blocks
from loomtrain.runtime.trainer import Trainer


def config(tmp_path, model: str = "llama", *extra: str):
    return load_config(None, case(model, f"train.output_dir={tmp_path / 'run'}", *extra))


def hf_copy(trainer: Trainer, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain HF model of the trainer's config holding `state` (nothing of loomtrain's inside)."""
    model = AutoModelForCausalLM.from_config(trainer.hf_config)
    model.load_state_dict(state, strict=True)
    return model


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter by name, tied ones under each of their names."""
    return {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}


def ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[rows, S] losses, 0 where the label is ignored."""
    return F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")


def valid(labels: torch.Tensor) -> int:
    return int((labels != IGNORE_INDEX).sum())


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def assert_same_params(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), f"{what}: names differ: {sorted(set(got) ^ set(want))}"
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), f"{what}: {name} differs"


# ------------------------------------------------------------------ 1. the first loss, by hand
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_first_loss_equals_hand_computation_on_packed_documents(tmp_path, family):
    # A wider init than HF's default 0.02 makes the logits depend visibly on the context, so that
    # attending across a document boundary changes the numbers (it is still HF's own init).
    extra = ["data.seq_len=512", "train.max_steps=1", "model.config.initializer_range=0.1"]
    if family == "gpt2":
        extra.append("model.config.n_positions=512")
    cfg = config(tmp_path, family, *extra)
    trainer = Trainer(cfg).setup()
    model = hf_copy(trainer, trainer.full_state_dict()).eval()
    micro_batches = DataLoader(cfg.data, seed=cfg.train.seed).next_step()
    assert len(micro_batches) == cfg.data.global_batch_size // cfg.data.micro_batch_size

    # The rows really are packed: a document starts inside most of them (position id back to 0).
    pos = torch.cat([mb.position_ids for mb in micro_batches])
    starts_inside = (pos[:, 1:] == 0).sum(dim=1)
    assert (starts_inside >= 1).sum() >= pos.shape[0] // 2 and starts_inside.sum() >= pos.shape[0], starts_inside
    n_valid = sum(valid(mb.labels) for mb in micro_batches)
    # One label is masked per document boundary inside a row (EOS must not predict the next doc).
    assert n_valid == pos.numel() - int(starts_inside.sum())

    with torch.no_grad():
        packed = sum(ce_sum(model(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False).logits,
                            mb.labels).item() for mb in micro_batches) / n_valid
        plain_causal, first_doc_diff, later_doc_diff = 0.0, 0.0, 0.0
        for mb in micro_batches:
            with_pos = token_losses(model(input_ids=mb.input_ids, position_ids=mb.position_ids,
                                          use_cache=False).logits, mb.labels)
            without = token_losses(model(input_ids=mb.input_ids, use_cache=False).logits, mb.labels)
            plain_causal += without.sum().item()
            # Up to the first boundary a row is one causal document either way; after it, HF sees
            # the previous documents only when position ids do not tell it where documents start.
            first_doc = (mb.position_ids == 0).long().cumsum(dim=1) == 1
            first_doc_diff = max(first_doc_diff, (with_pos - without)[first_doc].abs().max().item())
            later_doc_diff = max(later_doc_diff, (with_pos - without)[~first_doc].abs().max().item())
        plain_causal /= n_valid
        # The same number without packing at all: every document segment run alone from position 0.
        alone = 0.0
        for mb in micro_batches:
            for r in range(mb.input_ids.shape[0]):
                bounds = [0] + [t for t in range(1, cfg.data.seq_len) if mb.position_ids[r, t] == 0]
                bounds.append(cfg.data.seq_len)
                for a, b in zip(bounds[:-1], bounds[1:]):
                    logits = model(input_ids=mb.input_ids[r:r + 1, a:b], use_cache=False).logits
                    alone += ce_sum(logits, mb.labels[r:r + 1, a:b]).item()
        alone /= n_valid

    got = trainer.fit().losses[0]
    assert math.isfinite(got)
    assert rel(got, packed) <= 1e-6, (got, packed)
    assert rel(packed, alone) <= 1e-5, (packed, alone)
    # Without position ids HF sees one causal sequence per row: documents attend across boundaries
    # (and positions run on), which gives a clearly different loss.
    assert rel(plain_causal, packed) > 1e-4, (plain_causal, packed)
    assert first_doc_diff <= 1e-4 and later_doc_diff > 1e-2, (first_doc_diff, later_doc_diff)
    # At random init the loss is close to ln(V): a sanity check that nothing is normalised wrongly.
    assert abs(got - math.log(trainer.hf_config.vocab_size)) < 0.5, got


# ------------------------------------------------------------- 2. the trainer is a plain loop
def test_trainer_equals_plain_adamw_loop(tmp_path):
    steps = 5
    cfg = config(tmp_path, "llama", "optim.weight_decay=0", "optim.schedule=constant", "optim.warmup_steps=0",
                 "optim.grad_clip=0", f"train.max_steps={steps}")
    trainer = Trainer(cfg).setup()
    init = trainer.full_state_dict()
    result = trainer.fit()
    final = trainer.full_state_dict()

    model = hf_copy(trainer, init).train()
    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=0.0)
    loader = DataLoader(cfg.data, seed=cfg.train.seed)
    losses = []
    for _ in range(steps):
        micro_batches = loader.next_step()
        n_valid = sum(valid(mb.labels) for mb in micro_batches)
        total = 0.0
        for mb in micro_batches:
            logits = model(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False).logits
            loss = ce_sum(logits, mb.labels)
            (loss / n_valid).backward()
            total += loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total / n_valid)

    assert result.steps == steps and len(result.losses) == steps
    for step, (got, want) in enumerate(zip(result.losses, losses), start=1):
        assert rel(got, want) <= 1e-5, f"step {step}: trainer {got!r} vs plain loop {want!r}"
    assert losses[-1] < losses[0], losses  # training did something, or the comparison proves little
    mine = params(model)
    assert set(final) == set(mine)
    moved = max((final[n] - init[n]).abs().max().item() for n in final)
    assert moved > 1e-3, moved
    for name, want in mine.items():
        diff = (final[name] - want).abs().max().item()
        assert diff <= 1e-4, f"{name} differs from the plain loop by {diff:.3g}"


# ------------------------------------------------------------------- 3./4. model.path, instance
def tiny_hf(family: str, seed: int = 0) -> torch.nn.Module:
    """A small random HF model, every parameter perturbed away from HF's init (norms included),
    so that matching it cannot happen by initialising the same way."""
    if family == "llama":
        hf_cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    else:
        hf_cfg = GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if family == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight
    return model


def path_config(tmp_path, path):
    return load_config(None, BASE + [f"model.path={path}", f"train.output_dir={tmp_path / 'run'}"])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_model_path_loads_exact_weights(tmp_path, family):
    model = tiny_hf(family)
    path = tmp_path / "hf"
    model.save_pretrained(str(path), safe_serialization=True)
    assert (path / "model.safetensors").is_file()
    trainer = Trainer(path_config(tmp_path, path)).setup()
    assert trainer.hf_config.model_type == family
    assert_same_params(trainer.full_state_dict(), params(model), f"{family} from model.path")
    if family == "gpt2":
        assert trainer.model.lm_head.weight is trainer.model.transformer.wte.weight


def test_model_path_without_safetensors(tmp_path):
    path = tmp_path / "config_only"
    tiny_hf("llama").config.save_pretrained(str(path))
    assert (path / "config.json").is_file() and not list(path.glob("*.safetensors"))
    with pytest.raises(LoomError) as err:
        Trainer(path_config(tmp_path, path)).setup()
    assert str(path) in str(err.value) and "safetensors" in str(err.value)


def test_model_path_with_a_missing_tensor(tmp_path):
    path = tmp_path / "hf"
    tiny_hf("llama").save_pretrained(str(path), safe_serialization=True)
    tensors = load_file(str(path / "model.safetensors"))
    dropped = [k for k in tensors if k.endswith("layers.1.mlp.down_proj.weight")]
    assert len(dropped) == 1, sorted(tensors)
    del tensors[dropped[0]]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LoomError) as err:
        Trainer(path_config(tmp_path, path)).setup()
    assert "model.layers.1.mlp.down_proj.weight" in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_model_instance_weights_are_used(tmp_path, family):
    model = tiny_hf(family, seed=3)
    want = params(model)
    cfg = load_config(None, BASE + [f"train.output_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg, model=model).setup()
    assert trainer.model is not model
    assert_same_params(trainer.full_state_dict(), want, f"{family} instance")


# ------------------------------------------------------------------------------ 5. initialisation
def test_init_is_deterministic_per_seed(tmp_path):
    a = Trainer(config(tmp_path, "llama")).setup().full_state_dict()
    b = Trainer(config(tmp_path, "llama")).setup().full_state_dict()
    c = Trainer(config(tmp_path, "llama", "train.seed=99")).setup().full_state_dict()
    assert_same_params(a, b, "same seed")
    assert set(c) == set(a)
    for name, tensor in a.items():
        assert not torch.isnan(tensor).any(), name
        if name.endswith("norm.weight"):
            assert torch.equal(tensor, torch.ones_like(tensor)) and torch.equal(c[name], tensor), name
        else:  # every random matrix depends on the seed
            assert not torch.equal(tensor, c[name]), f"{name} is the same under another train.seed"


def test_llama_init_is_hf_normal_with_initializer_range(tmp_path):
    trainer = Trainer(config(tmp_path, "llama", "model.config.hidden_size=128",
                             "model.config.intermediate_size=256")).setup()
    std = trainer.hf_config.initializer_range
    sd = trainer.full_state_dict()
    matrices = [n for n in sd if n.endswith(("proj.weight", "lm_head.weight"))]
    assert len(matrices) == 2 * 7 + 1
    for name in matrices:  # >= 8192 samples each: 5% is > 6 standard errors of the sample std
        w = sd[name]
        assert abs(w.std().item() - std) <= 0.05 * std, (name, w.std().item())
        assert abs(w.mean().item()) <= 0.1 * std, (name, w.mean().item())
    q = sd["model.layers.0.self_attn.q_proj.weight"]
    assert q.shape == (128, 128) and abs(q.std().item() - 0.02) <= 0.002
    assert not torch.equal(sd["model.layers.0.self_attn.q_proj.weight"], sd["model.layers.1.self_attn.q_proj.weight"])
    for name in [n for n in sd if n.endswith("norm.weight")]:
        assert torch.equal(sd[name], torch.ones_like(sd[name])), name


def test_gpt2_scaled_residual_init_and_tied_head(tmp_path):
    cfg = config(tmp_path, "gpt2", "model.config.n_layer=4", "train.max_steps=1")
    trainer = Trainer(cfg).setup()
    hf = trainer.hf_config
    assert (hf.n_layer, hf.n_embd, hf.n_positions) == (4, 64, 64)  # the user's values, not defaults
    sd = trainer.full_state_dict()
    scaled = hf.initializer_range / math.sqrt(2 * hf.n_layer)
    for layer in range(hf.n_layer):
        for name, want in ((f"transformer.h.{layer}.attn.c_proj.weight", scaled),
                           (f"transformer.h.{layer}.mlp.c_proj.weight", scaled),
                           (f"transformer.h.{layer}.attn.c_attn.weight", hf.initializer_range),
                           (f"transformer.h.{layer}.mlp.c_fc.weight", hf.initializer_range)):
            assert abs(sd[name].std().item() - want) <= 0.1 * want, (name, sd[name].std().item(), want)
        assert torch.equal(sd[f"transformer.h.{layer}.attn.c_attn.bias"],
                           torch.zeros_like(sd[f"transformer.h.{layer}.attn.c_attn.bias"]))
    model = trainer.model
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"])
    trainer.fit()
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied after an optimizer step
    after = trainer.full_state_dict()
    assert not torch.equal(after["transformer.wte.weight"], sd["transformer.wte.weight"])


# ------------------------------------------------------- 6. activation checkpointing and bf16
def _run_counting(tmp_path, name: str, *extra: str):
    """Train the 4-layer Llama; count how often each block's MLP runs (a recomputed block runs it
    again in backward)."""
    cfg = config(tmp_path / name, "llama", "model.config.num_hidden_layers=4", *extra)
    trainer = Trainer(cfg).setup()
    blocks = find_blocks(trainer.model)
    calls = [0] * len(blocks)
    for i, block in enumerate(blocks):
        # A pre-hook: recomputation stops early once the last saved activation is back, so a
        # post-forward hook of the block's last module would not see it.
        block.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    result = trainer.fit()
    return trainer, blocks, calls, result


@pytest.fixture(scope="module")
def no_checkpointing(tmp_path_factory):
    return _run_counting(tmp_path_factory.mktemp("ac"), "none", "train.max_steps=3")


@pytest.mark.parametrize("mode,chosen", [("full", [0, 1, 2, 3]), ("every:2", [0, 2])])
def test_activation_checkpointing_same_losses(tmp_path, no_checkpointing, mode, chosen):
    ref_trainer, ref_blocks, ref_calls, ref = no_checkpointing
    trainer, blocks, calls, result = _run_counting(
        tmp_path, "ac", "train.max_steps=3", f"parallel.activation_checkpointing={mode}")
    micro_steps = 3 * trainer.cfg.data.global_batch_size // trainer.cfg.data.micro_batch_size
    assert trainer.par.checkpointed_blocks == chosen
    assert [b.gradient_checkpointing for b in blocks] == [i in chosen for i in range(4)]
    assert not any(b.gradient_checkpointing for b in ref_blocks)
    assert ref_calls == [micro_steps] * 4
    assert calls == [2 * micro_steps if i in chosen else micro_steps for i in range(4)]
    for step, (a, b) in enumerate(zip(result.losses, ref.losses), start=1):
        assert rel(a, b) <= 1e-6, f"{mode} step {step}: {a!r} vs {b!r}"
    ref_sd, sd = ref_trainer.full_state_dict(), trainer.full_state_dict()
    for name in ref_sd:
        assert (sd[name] - ref_sd[name]).abs().max().item() <= 1e-6, name


def test_bf16_single_process(tmp_path, no_checkpointing):
    fp32 = no_checkpointing[3].losses
    trainer = Trainer(config(tmp_path, "llama", "model.config.num_hidden_layers=4", "model.dtype=bfloat16",
                             "train.max_steps=5")).setup()
    assert trainer.par.autocast_dtype == torch.bfloat16
    losses = trainer.fit().losses
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses), losses
    assert rel(losses[0], fp32[0]) <= 0.02, (losses[0], fp32[0])
    assert losses[0] != fp32[0]  # bf16 arithmetic really happened
    assert losses[-1] < losses[0], losses
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # fp32 master weights


# --- torch.compile per block (the one compile test: a cold compile takes ~30-60 s on CPU) -------

def test_compile_per_block_matches_eager(tmp_path):
    """`parallel.compile=true` compiles every decoder block in place: parameter names keep no
    `_orig_mod.` prefix, and 3 steps give the eager losses and weights (to reduction order)."""
    from harness import assert_parity, reference

    eager = reference(case("llama", "train.max_steps=3"), str(tmp_path / "eager"))
    compiled = reference(case("llama", "train.max_steps=3", "parallel.compile=true"), str(tmp_path / "compiled"))
    assert not any("_orig_mod" in name for name in compiled[1])
    assert_parity(compiled, eager, "compiled blocks vs eager")
