"""Which rank copies and writes which tensor chunk, and the reused host buffers it copies into.

A tensor that several ranks hold identically (a replicated parameter, AdamW's `step`, a ZeRO-0
replica) is written once: `assign_owners` picks one holder per chunk, balancing bytes, the same
answer on every rank. Each owned chunk gets a `HostSlot`: a host buffer allocated once (right
after the first optimizer step, `CheckpointEngine.prepare`) and reused by every save (so
checkpointing never grows memory), wrapped in the chunk's DTensor spec so DCP writes it at its
global offset.
"""
from __future__ import annotations

import torch


def local_of(t: torch.Tensor) -> torch.Tensor:
    """The part of `t` this rank holds: a DTensor's local shard, a plain tensor itself."""
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


class HostSlot:
    """A tensor this rank copies and writes: its reused host buffer and the value given to DCP."""

    def __init__(self, key: str, src: torch.Tensor, pin: bool):
        from torch.distributed.tensor import DTensor

        local = local_of(src)
        self.key = key
        self.shape, self.dtype = tuple(local.shape), local.dtype
        self.buf = torch.empty(local.shape, dtype=local.dtype, device="cpu", pin_memory=pin)
        if isinstance(src, DTensor):
            # The shard's spec (mesh, placements, global shape) over the host buffer. Not
            # `DTensor.from_local`: it would move the buffer to the mesh's device (CUDA).
            self.value = DTensor(self.buf, src._spec, requires_grad=False)
        else:
            self.value = self.buf

    def matches(self, src: torch.Tensor) -> bool:
        local = local_of(src)
        return tuple(local.shape) == self.shape and local.dtype == self.dtype


def chunk_id(key: str, t: torch.Tensor) -> tuple:
    """(key, global offset) of the chunk this rank holds: equal ids on two ranks = the same data."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return key, tuple(int(o) for o in offset)
    return key, (0,) * t.dim()


def assign_owners(held: list[list[tuple[tuple, int]]]) -> dict[tuple, int]:
    """held[rank] = [(chunk id, bytes)] -> chunk id -> the rank that writes it (each chunk once,
    bytes balanced greedily, biggest first; ties to the lowest rank). Same answer on every rank."""
    holders: dict[tuple, list[int]] = {}
    size: dict[tuple, int] = {}
    for rank, items in enumerate(held):
        for cid, nbytes in items:
            holders.setdefault(cid, []).append(rank)
            size[cid] = nbytes
    load = [0] * len(held)
    owner = {}
    for cid in sorted(holders, key=lambda c: (-size[c], c)):
        rank = min(holders[cid], key=lambda r: (load[r], r))
        owner[cid] = rank
        load[rank] += size[cid]
    return owner


def nbytes(t: torch.Tensor) -> int:
    local = local_of(t)
    return local.numel() * local.element_size()
