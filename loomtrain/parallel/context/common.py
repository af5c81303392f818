"""What both context-parallel attentions share: which tokens a cp rank holds, gathering the
other ranks' position ids, and the process group an attention module uses.

A module's group is an attribute set on it (`set_group`), not global state: the heterogeneous
scheduler points the same modules at a different group every micro-step.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

ULYSSES = "loomtrain_ulysses"
RING = "loomtrain_ring"
GROUP_ATTR = "_loomtrain_cp_group"


def zigzag_indices(seq_len: int, cp: int, rank: int) -> torch.Tensor:
    """Global token positions held by `rank` of `cp`: chunks `rank` and `2*cp-1-rank` of 2*cp.

    Chunk i costs about i causal key-blocks, so chunks r and 2cp-1-r together cost the same on
    every rank. The result is sorted, i.e. the two chunks concatenated in order.
    """
    if cp < 1:
        raise ValueError(f"context-parallel degree must be >= 1, got cp={cp}")
    if not 0 <= rank < cp:
        raise ValueError(f"rank {rank} is outside the context-parallel group of size {cp}")
    if seq_len <= 0 or seq_len % (2 * cp) != 0:
        raise ValueError(
            f"sequence length {seq_len} must be a positive multiple of 2*cp = {2 * cp} for zig-zag "
            f"context parallelism (cp={cp}); pad the packed sequence to a multiple of {2 * cp}")
    chunk = seq_len // (2 * cp)
    first = torch.arange(rank * chunk, (rank + 1) * chunk)
    second = torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk)
    return torch.cat([first, second])


def sequence_indices(seq_len: int, cp: int, rank: int, impl: str) -> torch.Tensor:
    """Token positions (within a row) that cp rank `rank` holds."""
    if impl == "ring":
        return zigzag_indices(seq_len, cp, rank)
    chunk = seq_len // cp
    return torch.arange(rank * chunk, (rank + 1) * chunk)


def gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather [b, s] integer tensors from every cp rank into [cp, b, s] (no gradient needed)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)


def set_group(model: nn.Module, group) -> None:
    """Point every attention module at `group` (None: attend locally)."""
    for module in model.modules():
        if hasattr(module, GROUP_ATTR):
            setattr(module, GROUP_ATTR, group)
