"""A model's tensor-parallel plan, read exactly: every style string transformers uses, and what it means.

transformers describes how to shard a model in its config's `base_model_tp_plan`
(`{"layers.*.self_attn.q_proj": "colwise", ...}`) and registers one object per style string in
its tensor-parallel integration (`ALL_PARALLEL_STYLES`). Each style string is matched EXACTLY
against the table below, so a style a newer transformers adds is refused by name rather than
guessed at (a prefix match once applied `colwise_gather_output` as plain
`colwise`, so GLM-4's `chunk(2)` of a half-width `gate_up_proj` split the gate and trained with
wrong numbers).

What each supported style means, and the torch `ParallelStyle` that does it (`tensor.py` builds
them; transformers' own objects for these strings replace `module.forward` and all-reduce the
accumulated `.grad` after every backward, which double-counts under gradient accumulation, so
torch's DTensor styles with the same layouts are used instead):

    colwise                  weight rows sharded, output stays sharded (this rank's heads)
    rowwise                  weight columns sharded, input arrives sharded, partial sums reduced
    colwise_gather_output    colwise, then the output is all-gathered: every rank sees the whole
      (= colwise_rep)        projection (Phi-3's fused qkv/gate_up, GLM-4's gate_up, OLMo-2's
                             q/k/v whose norm spans the full projection)
    rowwise_split_input      rowwise whose input arrives whole: each rank slices its part of the
      (= rowwise_rep)        input's last dim (no communication forward, all-gather backward)
    replicated_with_grad_allreduce
                             weights whole on every rank, gradient summed over the tp ranks: a
                             norm over this rank's heads only (Qwen3's / Gemma-3's q_norm, k_norm)
    embedding_rowwise/_colwise   the input embedding: loomtrain always shards it over the
                             vocabulary, whose output (replicated) is what both styles produce

Everything else (`packed_colwise`, `packed_rowwise`, `mla_kv_a_proj`, `local_params`, MoE styles,
a wildcard inside a block, a plan entry that names a parameter) is refused by `check_plan`, which
preflight runs before launch from the config alone. Models without a plan (GPT-2, Falcon) get one
derived from their module names by `tensor.layer_plan`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from loomtrain.errors import ConfigError
from loomtrain.parallel.moe_tp import config_plan

# Style string -> the meaning loomtrain gives it (aliases that transformers registers identically
# map to the same meaning).
LAYER_STYLES = {
    "colwise": "colwise",
    "rowwise": "rowwise",
    "colwise_gather_output": "colwise_gather_output",
    "colwise_rep": "colwise_gather_output",
    "rowwise_split_input": "rowwise_split_input",
    "rowwise_rep": "rowwise_split_input",
    "replicated_with_grad_allreduce": "replicated_with_grad_allreduce",
}
EMBEDDING_STYLES = ("embedding_rowwise", "embedding_colwise")
# Families whose tiny configs the family matrix trains at tp2 against one process
# (tests/test_family_matrix.py checks this list against it).
TESTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "glm4",
                   "gpt2", "gpt_neox", "granite", "starcoder2", "cohere", "stablelm", "opt", "hunyuan_v1_dense")

_BLOCK_ENTRY = re.compile(r"^(?:[\w.]*\.)?(\w+)\.\*\.([\w.]+)$")


@dataclass(frozen=True)
class PlanEntry:
    """One entry of a block's plan: the module path inside a decoder block and its meaning."""

    path: str  # e.g. "self_attn.q_proj"
    style: str  # the model's own style string
    meaning: str  # one of LAYER_STYLES' values


def model_plan(hf_config) -> dict[str, str]:
    """The config's `base_model_tp_plan` (the config class default unless the config overrides it).
    A mixture-of-experts model's comes without the entries for the expert containers its
    `base_model_ep_plan` names and their weights: loomtrain does not tensor-shard experts, they
    are expert-parallel or replicated over tp (`moe_tp`)."""
    try:
        text = hf_config.get_text_config()
    except (AttributeError, ValueError):  # no sub-configs, or several text configs (encoder-decoder)
        text = hf_config
    return config_plan(dict(getattr(text, "base_model_tp_plan", None) or {}), text)


def refusal(model_type: str, entry: str, style: str, why: str) -> ConfigError:
    """The one-line error for a plan loomtrain cannot apply: entry, style, what works, tested families."""
    return ConfigError(
        f"parallel.tp: {model_type}'s tensor-parallel plan entry {entry!r} uses style {style!r}, {why}; "
        f"loomtrain supports {', '.join(sorted(set(LAYER_STYLES) | set(EMBEDDING_STYLES)))} "
        f"(tested at tp2: {', '.join(TESTED_FAMILIES)}); run this model with parallel.tp=1")


def block_entries(plan: dict[str, str], model_type: str) -> list[PlanEntry]:
    """The per-block entries of a plan, each style matched exactly; anything else is refused.

    Entries outside the blocks may only shard the input embedding (loomtrain shards it over the
    vocabulary itself). Raises `ConfigError` naming the first entry it cannot apply."""
    entries: list[PlanEntry] = []
    for key, style in plan.items():
        match = _BLOCK_ENTRY.match(key)
        if match is None:
            if "*" in key:
                raise refusal(model_type, key, style, "with a wildcard inside the decoder block (experts or "
                                                      "sub-layers), which loomtrain does not shard")
            if style in EMBEDDING_STYLES:
                continue
            raise refusal(model_type, key, style, "outside the decoder blocks, where loomtrain shards only "
                                                  "the input embedding")
        if style not in LAYER_STYLES:
            raise refusal(model_type, key, style, "which loomtrain does not implement")
        entries.append(PlanEntry(match.group(2), style, LAYER_STYLES[style]))
    return entries


def check_plan(hf_config) -> list[PlanEntry]:
    """Preflight: the model's plan read from its config alone (no model is built). Returns the
    per-block entries, or [] when the model has no plan (one is then derived from module names)."""
    return block_entries(model_plan(hf_config),
                         getattr(hf_config, "model_type", "?"))
