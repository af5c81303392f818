"""`model.attn_implementation`: auto picks the packed kernel unless the model needs what it lacks,
an impossible explicit choice is refused before training in one line, the banner names the
attention, and a training run on the packed kernel follows the sdpa run's loss curve."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

from harness import case
from loomtrain.config import load_config
from loomtrain.errors import ConfigError
from loomtrain.kernels import hf as packed_hf
from loomtrain.kernels.select import PACKED, choose_attention
from loomtrain.runtime.preflight import preflight


def test_auto_prefers_the_packed_kernel():
    assert choose_attention("auto", LlamaConfig(), 4096).name == PACKED
    assert choose_attention("auto", Qwen2Config(), 4096).name == PACKED  # use_sliding_window=False
    assert choose_attention("auto", MistralConfig(sliding_window=4096), 4096).name == PACKED
    assert choose_attention("auto", GPT2Config(attn_pdrop=0.0), 1024).name == PACKED


@pytest.mark.parametrize("hf_config,gap", [
    (LlamaConfig(attention_dropout=0.1), "attention_dropout=0.1"),
    (GPT2Config(), "attn_pdrop=0.1"),
    (MistralConfig(sliding_window=128), "sliding_window=128 < data.seq_len=256"),
])
def test_auto_falls_back_to_sdpa_for_what_the_kernel_lacks(hf_config, gap):
    choice = choose_attention("auto", hf_config, 256)
    assert choice.name == "sdpa" and gap in choice.reason
    with pytest.raises(ConfigError) as err:
        choose_attention(PACKED, hf_config, 256)
    assert "\n" not in str(err.value) and gap in str(err.value)


def test_softcapping_falls_back_to_eager():
    """sdpa cannot soft-cap (HF refuses to build Gemma 2 with it), so auto must pick eager."""
    cfg = LlamaConfig()
    cfg.attn_logit_softcapping = 50.0
    assert choose_attention("auto", cfg, 64).name == "eager"
    both = LlamaConfig(attention_dropout=0.1)
    both.attn_logit_softcapping = 50.0
    assert choose_attention("auto", both, 64).name == "eager"


def test_gemma2_trains_with_the_default_attention(tmp_path, capsys):
    """A tiny Gemma 2 (soft-capping on) trains with no attention key given, on eager."""
    from families import family_case
    from loomtrain.runtime.trainer import Trainer

    args = family_case("gemma2", "1proc", f"train.output_dir={tmp_path}", "train.max_steps=2")
    assert not any(a.startswith("model.attn_implementation=") for a in args)
    losses = Trainer(load_config(None, args)).fit().losses
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    banner = [line for line in capsys.readouterr().out.splitlines() if "attention" in line]
    assert banner and "attention eager (auto: the packed kernel lacks attn_logit_softcapping" in banner[0]


def test_explicit_choices_pass_through():
    assert choose_attention("eager", LlamaConfig(attention_dropout=0.1), 64).name == "eager"
    assert choose_attention("sdpa", LlamaConfig(), 64).name == "sdpa"


def test_preflight_refuses_packed_with_dropout_and_cp_with_dropout(tmp_path):
    bad = load_config(None, case("llama", f"train.output_dir={tmp_path}", "model.config.attention_dropout=0.2",
                                 f"model.attn_implementation={PACKED}"))
    with pytest.raises(ConfigError, match="attention_dropout=0.2"):
        preflight(bad, 1)
    cp = load_config(None, case("llama", f"train.output_dir={tmp_path}", "model.config.attention_dropout=0.2",
                                "parallel.cp=2"))
    with pytest.raises(ConfigError, match="context parallelism"):
        preflight(cp, 2)
    fine = load_config(None, case("llama", f"train.output_dir={tmp_path}", "model.config.attention_dropout=0.2"))
    preflight(fine, 1)  # auto: falls back to sdpa


def test_hf_model_with_packed_kernel_matches_sdpa_and_builds_no_mask():
    """A HF Llama with GQA on packed rows: loomtrain_packed logits and gradients equal sdpa's dense
    document-mask path; transformers builds no 4-D mask for it."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=50, max_position_embeddings=128)
    cfg._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(cfg).double()
    ids = torch.randint(0, 50, (2, 40))
    pos = torch.cat([torch.cat([torch.arange(n) for n in lengths])[None] for lengths in ([7, 1, 32], [19, 21])])
    ref = model(input_ids=ids, position_ids=pos, use_cache=False).logits  # a cache turns off HF packing
    ref.sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    packed_hf.use_packed(model)
    masks = []
    hook = model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda m, args, kwargs: masks.append(kwargs.get("attention_mask")), with_kwargs=True)
    out = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    hook.remove()
    assert masks == [None]
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    out.sum().backward()
    for p, want in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, want, atol=1e-10, rtol=1e-10)


def test_training_on_the_packed_kernel_follows_sdpa_and_banner_names_it(tmp_path, capsys):
    from loomtrain.runtime.trainer import Trainer

    losses = {}
    for impl in ("auto", "sdpa"):
        trainer = Trainer(load_config(None, case("llama", "train.max_steps=3", f"model.attn_implementation={impl}",
                                                 f"train.output_dir={tmp_path / impl}")))
        losses[impl] = trainer.fit().losses
        banner = [line for line in capsys.readouterr().out.splitlines() if "attention " in line]
        assert banner and (f"attention {PACKED} (auto)" in banner[0] if impl == "auto" else
                           "attention sdpa (requested)" in banner[0])
    for got, want in zip(losses["auto"], losses["sdpa"]):
        assert abs(got - want) <= 1e-5 * abs(want)
