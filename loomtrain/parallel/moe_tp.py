"""Tensor parallelism of a mixture-of-experts model: the model's tp plan cut down to what its
blocks really hold.

A MoE config's `base_model_tp_plan` describes every shape the family can take, not the model at
hand. Qwen3-MoE's names the experts (`mlp.experts.*`, styles `packed_colwise`/`moe_tp_experts`)
AND a dense MLP (`mlp.gate_proj`, `mlp.up_proj`, `mlp.down_proj`) that only its `mlp_only_layers`
have; a sparse block has neither `mlp.gate_proj` nor anything else under those names. Applied
as written, the plan would fail on the sparse blocks (or, with a guessed meaning, shard the wrong
thing).

What loomtrain does instead, for any family (no per-model table):
* experts are never tensor-sharded: they are expert-parallel (`parallel.expert`) or, without ep,
  replicated over the tp ranks, which all see the same full-length hidden states (sequence
  parallelism is refused with MoE: `expert.check_moe_layout`). Plan entries at or under an expert
  container -- named by the model's `base_model_ep_plan`, or found as grouped [E, ...] weights --
  are dropped;
* an entry that names no module of a block whose parent is a sparse MoE block (one holding an
  expert container) is the dense-MLP variant of that block: dropped for that block, kept for the
  blocks that have it (`mlp_only_layers`, `decoder_sparse_step`);
* anything else still has to name a module of some block (a typo or an unknown layout is an
  error, as for dense models), and attention is sharded as the plan says.

The router (`mlp.gate`), which no plan shards, stays replicated: every tp rank routes the same
tokens identically, so the router logits, the dispatch and the auxiliary loss are tp-invariant.
"""
from __future__ import annotations

import fnmatch
import re

import torch.nn as nn

from loomtrain.models.moe import MoeSpec, grouped_experts

_BLOCK_KEY = re.compile(r"^(?:[\w.]*\.)?\w+\.\*\.([\w.]+)$")


def _ep_owned(hf_config) -> list[str]:
    """Block-relative paths of the expert containers the model's own ep plan names."""
    plan = getattr(hf_config, "base_model_ep_plan", None) or {}
    out = []
    for key, style in plan.items():
        match = _BLOCK_KEY.match(key)
        if style == "ep_dispatch_experts" and match is not None:
            out.append(match.group(1))
    return out


def _spec(hf_config) -> MoeSpec | None:
    """The MoE spec, None for a dense config and for one whose expert counts vary per layer
    (transformers' heterogeneous configs refuse the global read; their plans are read as written)."""
    try:
        return MoeSpec.of(hf_config)
    except RuntimeError:
        return None


def expert_paths(block: nn.Module, hf_config) -> list[str]:
    """Block-relative names of a block's expert containers (ep plan, else grouped weights)."""
    spec = _spec(hf_config)
    if spec is None:
        return []
    patterns = _ep_owned(hf_config)
    found = {id(m) for m in grouped_experts(block, spec.num_experts)}
    return [name for name, module in block.named_modules()
            if name and (id(module) in found or any(fnmatch.fnmatchcase(name, p) for p in patterns))]


def _has(block: nn.Module, path: str) -> bool:
    try:
        block.get_submodule(path)
    except AttributeError:
        return False
    return True


def skipped_in_block(block: nn.Module, path: str, experts: list[str]) -> bool:
    """Whether a (block-relative) plan entry does not apply to this block: it lies at or under
    an expert container, or it names no module and its parent holds experts (a sparse block's
    missing dense MLP)."""
    if any(path == e or path.startswith(e + ".") for e in experts):
        return True
    if _has(block, path):
        return False
    parent = path.rsplit(".", 1)[0] if "." in path else ""
    return any(e.startswith(parent + ".") if parent else True for e in experts)


def sparse_plan(plan: dict[str, str], blocks, hf_config) -> dict[str, str]:
    """The plan without the entries that apply to no block of a MoE model (experts, and dense-MLP
    entries no block has); a dense model's plan comes back unchanged. `blocks`: the blocks this
    rank builds (parameter-free pipeline stand-ins are ignored)."""
    if _spec(hf_config) is None:
        return plan
    real = [b for b in blocks if any(True for _ in b.parameters())] or list(blocks)
    per_block = [(b, expert_paths(b, hf_config)) for b in real]
    if not any(experts for _, experts in per_block):
        return plan
    kept = {}
    for key, style in plan.items():
        match = _BLOCK_KEY.match(key)
        if match is None or not all(skipped_in_block(b, match.group(1), e) for b, e in per_block):
            kept[key] = style
    return kept


def config_plan(plan: dict[str, str], hf_config) -> dict[str, str]:
    """Preflight, from the config alone: a MoE plan without the entries under the expert
    containers its ep plan names (the rest is checked against a meta model's blocks)."""
    owned = _ep_owned(hf_config)
    out = {}
    for key, style in plan.items():
        match = _BLOCK_KEY.match(key)
        path = match.group(1) if match is not None else None
        if path is None or not any(path == o or path.startswith(o + ".") for o in owned):
            out[key] = style
    return out
