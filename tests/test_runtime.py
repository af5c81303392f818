"""The single-process runtime against independent computations: the first loss by hand with a
plain HF model, a whole run against a hand-written AdamW loop, loading from `model.path` and from
a model instance, HF's own deterministic initialisation, activation checkpointing and bf16, and
the config/preflight errors (in process, and three of them through the CLI).

Everything here runs in this process with no process group, except the CLI checks, which start
`python -m loomtrain.launch run` and stop in the launcher's preflight (no worker is spawned).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from harness import BASE, ROOT, case
from loomtrain.config import load_config
from loomtrain.errors import ConfigError, DataError, LoomError
from loomtrain.runtime.data import IGNORE_INDEX, DataLoader
from loomtrain.runtime.model import find_blocks
from loomtrain.runtime.preflight import preflight
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


# -------------------------------------------------------------------- 7. config/preflight errors
def _raises(exc_type, fn, *needles):
    with pytest.raises(exc_type) as err:
        fn()
    msg = str(err.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


def test_tp_not_dividing_heads():
    cfg = load_config(None, case("llama", "parallel.tp=3"))
    _raises(ConfigError, lambda: preflight(cfg, 3), "parallel.tp=3", "does not divide", "num_attention_heads=4")


def test_pp_larger_than_layers():
    cfg = load_config(None, case("llama", "parallel.pp=4"))
    _raises(ConfigError, lambda: preflight(cfg, 4), "parallel.pp=4", "num_hidden_layers=2")


def test_degrees_product_not_world_size():
    cfg = load_config(None, case("llama", "parallel.dp_shard=2", "parallel.tp=2"))
    _raises(ConfigError, lambda: preflight(cfg, 2), "1*2*2*1*1 = 4", "world size is 2")
    cfg = load_config(None, case("llama", "parallel.tp=2"))
    _raises(ConfigError, lambda: preflight(cfg, 3), "world size 3", "tp", "= 2")


def test_global_batch_not_divisible_by_dp_times_micro_batch():
    cfg = load_config(None, case("llama", "data.global_batch_size=8", "data.micro_batch_size=2"))
    assert preflight(cfg, 2)["dp_shard"] == 2  # 8 = 2 x 2 x 2 is fine
    _raises(ConfigError, lambda: preflight(cfg, 3), "data.global_batch_size=8", "data-parallel size 3",
            "data.micro_batch_size=2", "= 6")
    _raises(ConfigError, lambda: load_config(None, case("llama", "data.global_batch_size=7")),
            "data.global_batch_size=7", "data.micro_batch_size=2")


def test_unknown_model_config_field_and_architecture():
    cfg = load_config(None, case("llama", "model.config.hidden_sise=64"))
    _raises(ConfigError, lambda: preflight(cfg, 1), "model.config.hidden_sise", "'hidden_size'")
    cfg = load_config(None, case("llama", "model.architecture=lama"))
    _raises(ConfigError, lambda: preflight(cfg, 1), "model.architecture='lama'", "llama")


def test_empty_data_sources(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = load_config(None, case("llama", f"data.source={empty}"))
    _raises(DataError, lambda: preflight(cfg, 1), "data.source", str(empty), "contains no")
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text("")
    cfg = load_config(None, case("llama", f"data.source={blank}"))
    _raises(DataError, lambda: preflight(cfg, 1), "data.source", str(blank), "contains no documents")


def test_data_source_smaller_than_one_sample(tmp_path):
    src = tmp_path / "tiny"
    src.mkdir()
    (src / "a.txt").write_text("hi")
    cfg = load_config(None, case("llama", f"data.source={src}", f"train.output_dir={tmp_path / 'run'}"))
    tokens = len("hi".encode()) + 1  # byte tokens + the EOS closing the document
    _raises(DataError, lambda: Trainer(cfg).setup(), str(src), f"{tokens} tokens",
            f"data.seq_len+1 = {cfg.data.seq_len + 1}")


def test_model_path_without_config_json(tmp_path):
    _raises(ConfigError, lambda: load_config(None, case("llama", f"model.path={tmp_path}")),
            "model.path", "config.json", str(tmp_path))


def test_seq_len_beyond_gpt2_positions():
    cfg = load_config(None, case("gpt2", "data.seq_len=128"))  # tiny GPT-2 has n_positions=64
    _raises(ConfigError, lambda: preflight(cfg, 1), "data.seq_len=128", "(64)", "n_positions")


# ------------------------------------------------------------ the same errors through the CLI
_TORCHRUN_ENV = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "RANK", "WORLD_SIZE", "GROUP_RANK",
                 "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOOMTRAIN_LAUNCHER")


@pytest.fixture(scope="module")
def cli_errors(tmp_path_factory):
    """Start the three launches at once (each is mostly interpreter and import time)."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "empty").mkdir()
    (tmp / "nomodel").mkdir()
    out = f"train.output_dir={tmp / 'run'}"
    runs = {
        "empty_data": ["run", "-", *case("llama", f"data.source={tmp / 'empty'}", out)],
        "tp3": ["run", "-", *case("llama", "parallel.tp=3", out), "--nproc-per-node", "3"],
        "model_path": ["run", "-", *case("llama", f"model.path={tmp / 'nomodel'}", out)],
    }
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_ENV and not k.startswith("PET_")}
    env.update(PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    procs = {name: subprocess.Popen([sys.executable, "-m", "loomtrain.launch", *argv], cwd=str(tmp), env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, argv in runs.items()}
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        results[name] = (proc.returncode, stdout, stderr)
    return tmp, results


@pytest.mark.parametrize("name,needles", [
    ("empty_data", ["data.source", "empty", "contains no"]),
    ("tp3", ["parallel.tp=3", "does not divide", "num_attention_heads=4"]),
    ("model_path", ["model.path", "config.json", "nomodel"]),
])
def test_cli_errors_are_one_line(cli_errors, name, needles):
    tmp, results = cli_errors
    code, stdout, stderr = results[name]
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2, stderr
    assert "Traceback" not in stdout + stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("loomtrain: error:"), stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    if name != "tp3":
        assert str(tmp) in lines[0], lines[0]


# --- tensor / pipeline parallel configurations that must be refused up front ---------------------

@pytest.mark.parametrize("overrides, world, needles", [
    (["model.architecture=falcon", "model.config.hidden_size=64", "model.config.num_attention_heads=4",
      "model.config.num_hidden_layers=2", "parallel.tp=2"], 2, ["query_key_value", "fused QKV", "parallel.tp=1"]),
    (["model.architecture=gpt2", "model.config.n_embd=64", "model.config.n_head=4", "model.config.n_layer=2",
      "parallel.pp=2"], 2, ["tie_word_embeddings=false"]),
    (["model.config.num_hidden_layers=2", "parallel.pp=2", "parallel.pp_schedule=Interleaved1F1B",
      "parallel.pp_virtual_stages=2"], 2, ["4 stages", "num_hidden_layers=2"]),
    (["parallel.tp=2", "parallel.zero=1"], 4, ["parallel.zero=1", "zero=2 or 3"]),
    (["parallel.pp=2", "parallel.zero=0"], 4, ["parallel.zero=0", "zero=2 or 3"]),
    (["parallel.pp=2", "data.global_batch_size=4", "data.micro_batch_size=4"], 2, ["at least 2 micro-batches"]),
    (["parallel.tp=2", "model.config.hidden_size=192", "model.config.num_attention_heads=6",
      "model.config.num_key_value_heads=3"], 2, ["num_key_value_heads=3", "parallel.tp=2"]),
    (["parallel.tp=2", "data.seq_len=33"], 2, ["data.seq_len=33", "parallel.tp=2"]),
    (["parallel.sequence_scheduler=hetero", "data.seq_len=128", "parallel.hetero_tokens_per_rank=48"], 2,
     ["data.seq_len=128", "2 ranks x parallel.hetero_tokens_per_rank=48", "at least 64"]),
    (["parallel.sequence_scheduler=hetero", "data.global_batch_size=12"], 3, ["power-of-two", "got 3"]),
    (["parallel.sequence_scheduler=hetero", "parallel.cp=2"], 4, ["parallel.cp=1"]),
])
def test_parallel_layout_errors(overrides, world, needles):
    from loomtrain.config import load_config
    from loomtrain.errors import ConfigError
    from loomtrain.runtime.preflight import preflight

    cfg = load_config(None, ["data.source=synthetic"] + overrides)
    with pytest.raises(ConfigError) as info:
        preflight(cfg, world)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


# --- torch.compile per block (the one compile test: a cold compile takes ~30-60 s on CPU) -------

def test_compile_per_block_matches_eager(tmp_path):
    """`parallel.compile=true` compiles every decoder block in place: parameter names keep no
    `_orig_mod.` prefix, and 3 steps give the eager losses and weights (to reduction order)."""
    from harness import assert_parity, reference

    eager = reference(case("llama", "train.max_steps=3"), str(tmp_path / "eager"))
    compiled = reference(case("llama", "train.max_steps=3", "parallel.compile=true"), str(tmp_path / "compiled"))
    assert not any("_orig_mod" in name for name in compiled[1])
    assert_parity(compiled, eager, "compiled blocks vs eager")
