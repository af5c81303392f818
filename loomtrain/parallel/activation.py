"""Activation checkpointing of whole decoder blocks.

Uses transformers' own per-layer switch (`GradientCheckpointingLayer`): it checkpoints the
block's `forward`, not `__call__`, so FSDP2's pre/post-forward hooks stay outside the recomputed
region and parameter names are unchanged (no `_checkpoint_wrapped_module.` prefix in checkpoints):
it sets the layer's `gradient_checkpointing` flag and its `_gradient_checkpointing_func`, the two
attributes `GradientCheckpointingLayer` documents as its switch, per block (HF's model-wide
`activation_checkpointing_enable` would also count pass-through blocks of pipeline stages
differently and hook the embeddings). Other blocks are wrapped in `CheckpointedBlock`.
"""
from __future__ import annotations

import functools

import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def selected_blocks(mode: str, num_blocks: int) -> list[int]:
    """Indices of the blocks to checkpoint: all ("full"), every N-th ("every:N"), or none."""
    if mode == "none":
        return []
    if mode == "full":
        return list(range(num_blocks))
    every = int(mode.split(":", 1)[1])
    return [i for i in range(num_blocks) if i % every == 0]


class CheckpointedBlock(nn.Module):
    """Recomputes a non-HF block's forward in backward. Its parameters sit under
    `_checkpoint_wrapped_module.`, the segment torch's `checkpoint_wrapper` uses, which checkpoint
    names drop (`checkpoint.state.clean_name`)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self._checkpoint_wrapped_module = block

    def forward(self, *args, **kwargs):
        return checkpoint(self._checkpoint_wrapped_module, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(blocks: nn.ModuleList, mode: str) -> list[int]:
    """Turn on recomputation for the selected blocks; returns their indices."""
    chosen = selected_blocks(mode, len(blocks))
    ckpt = functools.partial(checkpoint, use_reentrant=False)
    for i in chosen:
        block = blocks[i]
        if hasattr(block, "gradient_checkpointing"):
            block.gradient_checkpointing = True
            block._gradient_checkpointing_func = ckpt
        else:
            blocks[i] = CheckpointedBlock(block)
    return chosen
