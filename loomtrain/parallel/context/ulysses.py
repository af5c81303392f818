"""Ulysses attention (DeepSpeed-Ulysses, Jacobs et al. 2023): an all-to-all turns a rank's
[heads, S/cp] slice into [heads/cp, S], attention runs over the whole sequence for a subset of
heads, and a second all-to-all turns it back. KV heads fewer than cp are repeated first.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
# torch's functional-collective all-to-all with autograd: functional collectives are the form
# torch.compile traces (`parallel.compile` compiles the blocks this runs in).
from torch.distributed._functional_collectives import all_to_all_single_autograd

from loomtrain.parallel.context.common import GROUP_ATTR, doc_ids, gather_rows


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


def _repeat_kv(x: torch.Tensor, times: int) -> torch.Tensor:
    return x if times == 1 else x.repeat_interleave(times, dim=1)


def ulysses_attention(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, **kwargs):
    """HF attention-interface function: [b, H, s, d] in, ([b, s, H, d], None) out.

    A module whose group is None (a degree-1 group of the heterogeneous scheduler) attends
    locally, with the same document mask."""
    group = getattr(module, GROUP_ATTR, None)
    cp = 1 if group is None else dist.get_world_size(group)
    position_ids = kwargs["position_ids"]
    h_q, h_kv = query.shape[1], key.shape[1]
    if cp == 1:
        q, k, v, full_positions = query, key, value, position_ids
    else:
        if h_kv % cp:  # too few KV heads to scatter: repeat them up to the query heads
            key, value = _repeat_kv(key, h_q // h_kv), _repeat_kv(value, h_q // h_kv)
        q, k, v = (_seq_to_heads(t, group, cp) for t in (query, key, value))
        positions = gather_rows(position_ids, group)  # [cp, b, s], contiguous slices in rank order
        full_positions = positions.permute(1, 0, 2).reshape(position_ids.shape[0], -1)
    docs = doc_ids(full_positions)
    total = full_positions.shape[1]
    causal = torch.ones(total, total, dtype=torch.bool, device=q.device).tril()
    mask = (docs[:, :, None] == docs[:, None, :]) & causal
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scaling,
                                         dropout_p=dropout if module.training else 0.0,
                                         enable_gqa=q.shape[1] != k.shape[1])
    if cp > 1:
        out = _heads_to_seq(out, group, cp)
    return out.transpose(1, 2).contiguous(), None
