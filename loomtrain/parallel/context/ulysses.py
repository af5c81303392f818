"""Ulysses attention (DeepSpeed-Ulysses, Jacobs et al. 2023): an all-to-all turns a rank's
[heads, S/cp] slice into [heads/cp, S], attention runs over the whole sequence for a subset of
heads, and a second all-to-all turns it back. KV heads fewer than cp are repeated first, only as
far as the scatter needs (GQA stays grouped inside the kernel). Local attention is the
memory-linear packed kernel (`loomtrain.kernels`), so no [b, S, S] mask exists.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
# torch's functional-collective all-to-all with autograd: functional collectives are the form
# torch.compile traces (`parallel.compile` compiles the blocks this runs in).
from torch.distributed._functional_collectives import all_to_all_single_autograd

from loomtrain.kernels.attention import attend_bhsd
from loomtrain.kernels.blockplan import layout_from_position_ids
from loomtrain.kernels.hf import CACHE_ATTR, check_supported
from loomtrain.parallel.context.common import GROUP_ATTR, gather_rows


def _seq_to_heads(x: torch.Tensor, group, cp: int) -> torch.Tensor:
    """[b, H, s, d] sequence-sharded -> [b, H/cp, cp*s, d] head-sharded (one all-to-all)."""
    b, h, s, d = x.shape
    send = x.reshape(b, cp, h // cp, s, d).permute(1, 0, 2, 3, 4).contiguous()
    recv = all_to_all_single_autograd(send, None, None, group)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, h // cp, cp * s, d)


def _heads_to_seq(x: torch.Tensor, group, cp: int) -> torch.Tensor:
    """[b, H/cp, cp*s, d] head-sharded -> [b, H, s, d] sequence-sharded (the inverse all-to-all)."""
    b, hc, total, d = x.shape
    s = total // cp
    send = x.reshape(b, hc, cp, s, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = all_to_all_single_autograd(send, None, None, group)
    return recv.permute(1, 0, 2, 3, 4).reshape(b, cp * hc, s, d)


def _kv_repeats(h_q: int, h_kv: int, cp: int) -> int:
    """The fewest copies of each KV head that let the all-to-all scatter them over cp ranks with
    every rank's query heads next to their KV heads: t must divide the group size Hq/Hkv and make
    Hkv*t a multiple of cp (t = Hq/Hkv always works, because cp divides Hq)."""
    group = h_q // h_kv
    return next(t for t in range(1, group + 1) if group % t == 0 and (h_kv * t) % cp == 0)


def _full_layout(position_ids: torch.Tensor, group, cp: int):
    """Layout of the whole sequence: the contiguous slices of all ranks, gathered in rank order."""
    if cp == 1:
        return layout_from_position_ids(position_ids)
    positions = gather_rows(position_ids, group)  # [cp, b, s]
    return layout_from_position_ids(positions.permute(1, 0, 2).reshape(position_ids.shape[0], -1))


def ulysses_attention(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, **kwargs):
    """HF attention-interface function: [b, H, s, d] in, ([b, s, H, d], None) out.

    After the all-to-all, attention over the whole sequence runs through the memory-linear packed
    kernel (no [b, S, S] mask). A module whose group is None (a degree-1 group of the
    heterogeneous scheduler) attends locally through the same kernel."""
    check_supported(module, dropout, kwargs)
    group = getattr(module, GROUP_ATTR, None)
    cp = 1 if group is None else dist.get_world_size(group)
    position_ids = kwargs["position_ids"]
    if position_ids.shape[0] != query.shape[0]:
        position_ids = position_ids.expand(query.shape[0], -1)
    h_q, h_kv = query.shape[1], key.shape[1]
    if cp == 1:
        q, k, v = query, key, value
    else:
        repeats = _kv_repeats(h_q, h_kv, cp)
        if repeats > 1:  # too few KV heads to scatter: repeat them only as far as needed
            key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
        q, k, v = (_seq_to_heads(t, group, cp) for t in (query, key, value))
    cache = getattr(module, CACHE_ATTR, None)
    derive = lambda pos: _full_layout(pos, group, cp)  # noqa: E731
    layout = cache.get(position_ids, derive, key=("ulysses", id(group))) if cache is not None else derive(position_ids)
    out = attend_bhsd(q, k, v, layout, scaling)  # [b, S, H/cp, d]
    if cp > 1:
        out = _heads_to_seq(out.transpose(1, 2), group, cp).transpose(1, 2)
    return out.contiguous(), None
