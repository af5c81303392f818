"""`kernels.rmsnorm` / `kernels.swiglu`: Liger's modules in place of HF's, selected per run.

Only the CPU side is tested here (no GPU in the session that built it; the Liger path itself is
untested): `auto` keeps HF's own modules and numbers, `off` likewise, and `on` where Liger cannot
run (no CUDA, no liger-kernel, an unknown family, tensor parallelism) is refused in one line,
at preflight, before anything starts.
"""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from harness import case
from loomtrain.config import load_config
from loomtrain.errors import ConfigError
from loomtrain.kernels.modules import apply_module_kernels, choose_module_kernels
from loomtrain.runtime.preflight import preflight
from loomtrain.runtime.trainer import Trainer


def _tiny() -> torch.nn.Module:
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=101)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


def _kinds(model) -> list[str]:
    return [type(m).__name__ for m in model.modules()]


@pytest.mark.parametrize("mode", ["auto", "off", False])
def test_auto_and_off_keep_hf_modules_on_cpu(mode):
    model = _tiny()
    choice = choose_module_kernels(mode, mode, model.config, device_type="cpu", tensor_parallel=False)
    assert not choice.rmsnorm and not choice.swiglu
    assert "rmsnorm hf" in choice.reason and "swiglu hf" in choice.reason
    before = _kinds(model)
    ids = torch.randint(0, 101, (2, 9))
    ref = model(input_ids=ids).logits
    assert apply_module_kernels(model, choice, model.config) == 0
    assert _kinds(model) == before and "LlamaRMSNorm" in before and "LlamaMLP" in before
    assert torch.equal(model(input_ids=ids).logits, ref)


@pytest.mark.parametrize("key", ["rmsnorm", "swiglu"])
@pytest.mark.parametrize("hf_config,device,tp,gap", [
    (LlamaConfig(), "cpu", False, "cpu (Liger's kernels are Triton, CUDA only)"),
    (GPT2Config(), "cpu", False, "model type gpt2"),
    (LlamaConfig(), "cpu", True, "tensor parallelism"),
])
def test_on_where_liger_cannot_run_is_one_line(key, hf_config, device, tp, gap):
    kwargs = {"rmsnorm": "off", "swiglu": "off", key: "on"}
    with pytest.raises(ConfigError) as err:
        choose_module_kernels(kwargs["rmsnorm"], kwargs["swiglu"], hf_config, device_type=device, tensor_parallel=tp)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"kernels.{key}=on needs Liger on CUDA") and gap in msg, msg


def test_on_is_refused_at_preflight_and_bad_values_at_load(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal checked here is the CPU one")
    for key in ("rmsnorm", "swiglu"):
        cfg = load_config(None, case("llama", f"kernels.{key}=on", f"train.output_dir={tmp_path}"))
        with pytest.raises(ConfigError) as err:
            preflight(cfg, 1)
        assert f"kernels.{key}=on" in str(err.value) and "\n" not in str(err.value)
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"kernels.{key}=maybe"])
        assert f"kernels.{key}" in str(err.value)
    assert load_config(None, ["kernels.rmsnorm=off"]).kernels.rmsnorm is False  # YAML's off


def test_training_with_auto_keeps_hf_modules(tmp_path, capsys):
    trainer = Trainer(load_config(None, case("llama", "train.max_steps=2", f"train.output_dir={tmp_path}")))
    losses = trainer.fit().losses
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    kinds = _kinds(trainer.model)
    assert "LlamaRMSNorm" in kinds and "LlamaMLP" in kinds and not any("Liger" in k for k in kinds)
    banner = [line for line in capsys.readouterr().out.splitlines() if "rmsnorm " in line]
    assert banner and "rmsnorm hf (auto), swiglu hf (auto)" in banner[0]
