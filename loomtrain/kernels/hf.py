"""The packed kernel as a transformers attention implementation, `loomtrain_packed`.

Registered through `AttentionInterface`, so HF models run it unchanged. transformers builds no
attention mask for an implementation it has no mask function for, so the dense 4-D document mask
is never made: document boundaries come from the position ids HF passes to attention, derived
once per micro-batch (`LayoutCache`, shared by the model's attention modules).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers import AttentionInterface

from loomtrain.errors import LoomError
from loomtrain.kernels.attention import attend_bhsd
from loomtrain.kernels.blockplan import DocLayout, LayoutCache, layout_from_position_ids
from loomtrain.kernels.select import PACKED

CACHE_ATTR = "_loomtrain_layout_cache"


def attention_modules(model: nn.Module):
    """The modules HF calls the attention interface from (`LlamaAttention`, `GPT2Attention`, ...)."""
    return [m for m in model.modules() if type(m).__name__.endswith("Attention")]


def share_layout_cache(model: nn.Module) -> None:
    """One `LayoutCache` for all attention modules of `model`, so layers reuse one layout."""
    cache = LayoutCache()
    for module in attention_modules(model):
        setattr(module, CACHE_ATTR, cache)


def layout_for(module: nn.Module, query: torch.Tensor, position_ids: torch.Tensor | None) -> DocLayout:
    """The micro-batch layout: from position ids (cached on the module), or one document per row."""
    if position_ids is None:
        b, _, s, _ = query.shape
        position_ids = torch.arange(s, device=query.device).expand(b, s)
        return layout_from_position_ids(position_ids)
    if position_ids.shape[0] != query.shape[0]:
        position_ids = position_ids.expand(query.shape[0], -1)
    cache = getattr(module, CACHE_ATTR, None)
    return cache.get(position_ids) if cache is not None else layout_from_position_ids(position_ids)


def check_supported(module: nn.Module, dropout: float, kwargs: dict) -> None:
    """What the kernel does not do fails loudly rather than training a different model."""
    if dropout and module.training:
        raise LoomError(f"{PACKED}: attention dropout {dropout} is not supported; use model.attn_implementation=sdpa")
    if kwargs.get("softcap"):
        raise LoomError(f"{PACKED}: logit soft-capping is not supported; use model.attn_implementation=sdpa")
    if getattr(module, "is_causal", True) is False:
        raise LoomError(f"{PACKED}: only causal attention is supported ({type(module).__name__} is not causal)")


@torch.compiler.disable  # layout caching and the block plan are eager Python (one graph break per layer)
def packed_attention_forward(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """HF attention-interface function: [b, H, S, D] in, ([b, S, H, D], None) out."""
    check_supported(module, dropout, kwargs)
    window = kwargs.get("sliding_window")
    if isinstance(window, int) and 0 < window < query.shape[2]:
        raise LoomError(f"{PACKED}: sliding_window={window} is shorter than the sequence ({query.shape[2]}); "
                        "use model.attn_implementation=sdpa")
    layout = layout_for(module, query, kwargs.get("position_ids"))
    return attend_bhsd(query, key, value, layout, scaling), None


def register() -> None:
    """Make `loomtrain_packed` known to transformers (idempotent)."""
    AttentionInterface.register(PACKED, packed_attention_forward)


def use_packed(model: nn.Module) -> None:
    """Run `model`'s attention through the packed kernel."""
    register()
    share_layout_cache(model)
    model.set_attn_implementation(PACKED)
