"""The family matrix: tiny configs of many HF causal-LM families (tests/families.py), each trained
for 3 steps under ZeRO-3 dp2, tp2 and pp2 and compared with one process, or refused before launch.

Every (family, layout) either matches one process (loss within 1e-5 relative at every step,
parameters within 1e-4) or is refused by preflight with a one-line message; nothing trains with
a silent mismatch. All 2-rank cases run in ONE torchrun launch (process start-up dominates).
"""
import math

import pytest
from transformers import CONFIG_MAPPING

from families import FAMILIES
from loomtrain.config import load_config
from loomtrain.models.build import build_hf_config
from loomtrain.models.flops import FlopModel, flop_model
from loomtrain.parallel.pipeline import split_costs
from loomtrain.runtime.metrics import step_record


def _hf_config(family: str):
    cfg = load_config(None, FAMILIES[family])
    return build_hf_config(cfg.model, vocab_size=258, seq_len=32, eos_id=256)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_flops_counted_for_every_family(family):
    hf = _hf_config(family)
    fm = flop_model(hf)
    assert fm.known, f"{family}: {fm.reason}"
    assert fm.palm_flops_per_token(32) > 6 * (fm.total_params - fm.embedding_params) > 0


def test_flops_counted_with_eager_attention_when_sdpa_is_refused():
    hf = _hf_config("gemma2")
    hf._attn_implementation = "sdpa"  # Gemma-2 refuses to be built with sdpa
    fm = flop_model(hf)
    assert fm.known and fm.source == "meta" and fm.total_params > 0
    assert hf._attn_implementation == "sdpa"  # the caller's config is left alone


def test_uncountable_config_gives_unknown_mfu_not_a_refusal():
    hf = CONFIG_MAPPING["vit"](hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
    fm = flop_model(hf)  # AutoModelForCausalLM has no model for this config
    assert not fm.known and "vit" in fm.reason
    assert math.isnan(fm.palm_step_flops(64, 32)) and math.isnan(fm.exact_step_flops([3, 5]))
    assert split_costs(hf, fm) == (1.0, 0.0, 0.0)  # a pipeline is split by blocks alone
    rec = step_record(step=1, loss=1.0, grad_norm=1.0, lr=1.0, tokens=64, step_time_s=0.1, flops_palm=None,
                      flops_exact=None, world_size=1, peak_flops_per_device=1e12, peak_mem_gb=0.0)
    assert rec["mfu"] is None and rec["tflops"] is None
    assert FlopModel.unknown("x").known is False
