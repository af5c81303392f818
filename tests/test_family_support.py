"""Mechanisms that let families outside the matrix's first fifteen build and parallelise, each
checked without a launch (the family matrix trains the families themselves against one process):

- loomtrain's own config defaults are set only on config classes that have the key (CodeGen has
  no pad_token_id);
- `model.attn_implementation=auto` on a model whose attention bypasses transformers' attention
  interface (Bloom's ALiBi) or that asks for ALiBi picks what the class supports, and an explicit
  packed kernel is refused;
- a config class that leaves a size unset (Ministral's head_dim) is one line naming the key;
- tensor parallelism makes attention modules' head-count attributes local (OPT, StableLM) and sums
  the gradients of per-head norms beside column-parallel projections (HunYuan);
- a pipeline stage carves the module that holds the blocks (OPT's decoder), not the base model.
"""
from __future__ import annotations

import pytest
import torch.nn as nn
from transformers import CONFIG_MAPPING, FalconConfig

from loomtrain.config import load_config
from loomtrain.errors import ConfigError
from loomtrain.kernels.select import PACKED, choose_attention, kernel_gaps
from loomtrain.models.attn_support import causal_lm_class, uses_attention_interface
from loomtrain.models.build import build_hf_config, build_meta_model, find_blocks
from loomtrain.parallel.pipeline import ZeroEmbedding, carve_stage
from loomtrain.parallel.tensor import layer_plan, localize_head_counts


def _hf(*overrides: str):
    cfg = load_config(None, list(overrides))
    return build_hf_config(cfg.model, vocab_size=258, seq_len=32, eos_id=256)


def test_defaults_are_not_set_on_classes_lacking_the_key():
    hf = _hf("model.architecture=codegen", "model.config.n_embd=64", "model.config.n_layer=2",
             "model.config.n_head=4", "model.config.rotary_dim=8")
    assert "pad_token_id" not in hf.to_dict() and hf.eos_token_id == 256
    with pytest.raises(ConfigError, match=r"model.config.pad_token_id: not a field of CodeGenConfig"):
        _hf("model.architecture=codegen", "model.config.pad_token_id=0")  # the user's key still is


def test_auto_attention_for_a_model_that_computes_attention_itself():
    hf = _hf("model.architecture=bloom", "model.config.hidden_size=64", "model.config.n_layer=2",
             "model.config.n_head=4")
    assert hf._attn_implementation == "eager"  # Bloom has no sdpa path: it is built with eager
    choice = choose_attention("auto", hf, 32)
    assert choice.name == "eager" and "BloomForCausalLM computes attention in its own code" in choice.reason
    with pytest.raises(ConfigError, match="BloomForCausalLM computes attention") as err:
        choose_attention(PACKED, hf, 32)
    assert "\n" not in str(err.value)
    build_meta_model(hf)  # builds (it did not with the sdpa placeholder)


def test_alibi_is_a_gap_of_the_packed_kernel():
    assert "alibi=True" in kernel_gaps(FalconConfig(alibi=True), 32)
    assert choose_attention("auto", FalconConfig(alibi=True), 32).name == "sdpa"


def test_stablelm_counts_as_using_the_attention_interface():
    """StableLM lacks the `_supports_attention_backend` flag but dispatches through the interface."""
    hf = _hf("model.architecture=stablelm", "model.config.hidden_size=64", "model.config.intermediate_size=96",
             "model.config.num_hidden_layers=2", "model.config.num_attention_heads=4")
    assert kernel_gaps(hf, 32) == [] and choose_attention("auto", hf, 32).name == PACKED


def test_unset_size_of_a_config_class_is_one_line():
    hf = _hf("model.architecture=ministral", "model.config.hidden_size=64", "model.config.intermediate_size=96",
             "model.config.num_hidden_layers=2", "model.config.num_attention_heads=4")
    with pytest.raises(ConfigError, match=r"MinistralConfig cannot build its model .*set model.config.head_dim") as err:
        build_meta_model(hf)
    assert "\n" not in str(err.value)
    build_meta_model(_hf("model.architecture=ministral", "model.config.hidden_size=64",
                         "model.config.num_hidden_layers=2", "model.config.num_attention_heads=4",
                         "model.config.head_dim=16"))


def test_head_counts_become_local_under_tp():
    attn = nn.Module()
    attn.num_heads, attn.num_key_value_heads, attn.head_dim, attn.hidden_size = 8, 4, 16, 128
    localize_head_counts(attn, heads=8, kv_heads=4, tp=2)
    assert (attn.num_heads, attn.num_key_value_heads, attn.head_dim, attn.hidden_size) == (4, 2, 16, 128)
    replicated = nn.Module()
    replicated.num_heads, replicated.num_key_value_heads = 4, 1
    localize_head_counts(replicated, heads=4, kv_heads=1, tp=2)  # one KV head kept whole on each rank
    assert (replicated.num_heads, replicated.num_key_value_heads) == (2, 1)
    other = nn.Module()
    other.num_heads = 3  # not the model's count: left alone
    localize_head_counts(other, heads=8, kv_heads=8, tp=2)
    assert other.num_heads == 3


def test_per_head_norms_in_a_derived_plan_sum_their_gradients():
    hf = _hf("model.architecture=hunyuan_v1_dense", "model.config.hidden_size=64",
             "model.config.intermediate_size=96", "model.config.num_hidden_layers=2",
             "model.config.num_attention_heads=4", "model.config.num_key_value_heads=2", "model.config.head_dim=16")
    model = build_meta_model(hf)
    plan = {e.path: e.meaning for e in layer_plan(model, find_blocks(model))}
    assert plan["self_attn.q_proj"] == "colwise" and plan["self_attn.o_proj"] == "rowwise"
    assert plan["self_attn.query_layernorm"] == plan["self_attn.key_layernorm"] == "replicated_with_grad_allreduce"
    assert not any(path.endswith("input_layernorm") for path in plan)  # it sees the full hidden states


def _opt():
    return build_meta_model(_hf("model.architecture=opt", "model.config.hidden_size=64", "model.config.ffn_dim=96",
                                "model.config.num_hidden_layers=4", "model.config.num_attention_heads=4",
                                "model.config.word_embed_proj_dim=64", "model.config.max_position_embeddings=64"))


def test_pipeline_carves_the_module_holding_the_blocks():
    first = carve_stage(_opt(), 0, 2, first=True, last=False)
    assert isinstance(first.model.decoder.final_layer_norm, nn.Identity)  # the last stage's norm
    assert isinstance(first.model.decoder.embed_positions, nn.Embedding)
    last = carve_stage(_opt(), 2, 4, first=False, last=True)
    assert isinstance(last.model.decoder.embed_positions, ZeroEmbedding)  # added on the first stage only
    assert isinstance(last.model.decoder.final_layer_norm, nn.LayerNorm)


def test_pipeline_keeps_an_embedding_norm_on_the_first_stage():
    hf = _hf("model.architecture=bloom", "model.config.hidden_size=64", "model.config.n_layer=4",
             "model.config.n_head=4")
    first = carve_stage(build_meta_model(hf), 0, 2, first=True, last=False)
    assert isinstance(first.transformer.word_embeddings_layernorm, nn.LayerNorm)
    assert isinstance(first.transformer.ln_f, nn.Identity)
    last = carve_stage(build_meta_model(hf), 2, 4, first=False, last=True)
    assert isinstance(last.transformer.word_embeddings_layernorm, nn.Identity)
    assert isinstance(last.transformer.ln_f, nn.LayerNorm)


def test_unknown_model_type_is_no_class():
    vit = CONFIG_MAPPING["vit"]()
    assert causal_lm_class(vit) is None and uses_attention_interface(vit)
