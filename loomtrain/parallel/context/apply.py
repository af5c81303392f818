"""`apply_cp`: route a model's attention through Ulysses or ring attention.

transformers dispatches attention through `AttentionInterface` by the model's attention
implementation name; registering ours there and selecting it with `set_attn_implementation`
changes no model code.
"""
from __future__ import annotations

import torch.nn as nn
from transformers import AttentionInterface

from loomtrain.kernels.hf import share_layout_cache
from loomtrain.parallel.context.common import GROUP_ATTR, RING, ULYSSES
from loomtrain.parallel.context.ring import ring_attention_interface
from loomtrain.parallel.context.ulysses import ulysses_attention


def register_attention() -> None:
    """Make both implementations known to transformers (idempotent)."""
    AttentionInterface.register(ULYSSES, ulysses_attention)
    AttentionInterface.register(RING, ring_attention_interface)


def apply_cp(model: nn.Module, cp_mesh, impl: str) -> None:
    """Route the model's attention through Ulysses or ring attention over `cp_mesh` (None: the
    heterogeneous scheduler sets a group per micro-step)."""
    register_attention()
    group = cp_mesh.get_group() if cp_mesh is not None else None
    for module in model.modules():
        if type(module).__name__.endswith("Attention"):
            setattr(module, GROUP_ATTR, group)
    share_layout_cache(model)  # positions are gathered and documents found once per micro-batch
    model.set_attn_implementation(ULYSSES if impl == "ulysses" else RING)
