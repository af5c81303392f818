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
from torch.distributed.tensor import DTensor


def local_of(t: torch.Tensor) -> torch.Tensor:
    """The part of `t` this rank holds: a DTensor's local shard, a plain tensor itself."""
    if not isinstance(t, DTensor):
        return t
    with torch.no_grad():  # a view of the shard, not a node in the autograd graph
        return t.to_local()


def host_dtensor(buf: torch.Tensor, like: DTensor) -> DTensor:
    """A DTensor with `like`'s mesh, placements and global shape whose local shard is `buf`, kept on
    the host. `DTensor.from_local` would move `buf` to the mesh's device (CUDA), so this is
    DTensor's own constructor over `like`'s spec: the one use of DTensor internals here, pinned by
    `tests/test_checkpoint.py::test_host_dtensor_keeps_spec_on_host`."""
    return DTensor(buf, like._spec, requires_grad=False)


class HostSlot:
    """A tensor this rank copies and writes: its reused host buffer and the value given to DCP."""

    def __init__(self, key: str, src: torch.Tensor, pin: bool):
        local = local_of(src)
        self.key = key
        self.shape, self.dtype = tuple(local.shape), local.dtype
        self.buf = torch.empty(local.shape, dtype=local.dtype, device="cpu", pin_memory=pin)
        self.value = host_dtensor(self.buf, src) if isinstance(src, DTensor) else self.buf

    def matches(self, src: torch.Tensor) -> bool:
        local = local_of(src)
        return tuple(local.shape) == self.shape and local.dtype == self.dtype


def chunk_id(key: str, t: torch.Tensor) -> tuple:
    """(key, global offset) of the chunk this rank holds: equal ids on two ranks = the same data.
    A DTensor's offset is the one DCP itself writes the shard at (`__create_chunk_list__`)."""
    if isinstance(t, DTensor):
        (chunk,) = t.__create_chunk_list__()
        return key, tuple(int(o) for o in chunk.offsets)
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
