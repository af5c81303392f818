"""Context parallelism: one sequence split across the ranks of a cp group, through HF's own
`AttentionInterface`, so any model that dispatches attention through it gains it unchanged.

Each cp rank holds a slice of every sequence (input ids, labels and the *global* position ids,
so rotary embeddings are right). Everything but attention is per token and needs nothing else.
Attention gets the missing context one of two ways:

- **Ulysses** (DeepSpeed-Ulysses, Jacobs et al. 2023): an all-to-all turns [heads, S/cp] into
  [heads/cp, S], attention runs over the whole sequence for a subset of heads, and a second
  all-to-all turns it back. Slices are contiguous. KV heads fewer than cp are repeated first.
- **Ring** (Liu et al. 2023): KV blocks travel around the group (loomtrain.parallel.ring);
  slices are zig-zag (chunks r and 2cp-1-r) so causal work is balanced across ranks.

HF calls a custom attention function with `attention_mask=None`, so both build the causal,
document-respecting mask themselves from the position ids (a new document starts wherever the
position does not continue the previous one), which arrive as a keyword argument.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed._functional_collectives import all_to_all_single_autograd

ULYSSES = "loomtrain_ulysses"
RING = "loomtrain_ring"
_GROUP_ATTR = "_loomtrain_cp_group"


def doc_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[b, S] document index of each token: a new document wherever the position restarts."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts.long().cumsum(dim=1)


def sequence_indices(seq_len: int, cp: int, rank: int, impl: str) -> torch.Tensor:
    """Token positions (within a row) that cp rank `rank` holds."""
    if impl == "ring":
        from loomtrain.parallel.ring import zigzag_indices

        return zigzag_indices(seq_len, cp, rank)
    chunk = seq_len // cp
    return torch.arange(rank * chunk, (rank + 1) * chunk)


def _gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather [b, s] integer tensors from every cp rank into [cp, b, s] (no gradient needed)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)


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
    group = getattr(module, _GROUP_ATTR, None)
    cp = 1 if group is None else dist.get_world_size(group)
    position_ids = kwargs["position_ids"]
    h_q, h_kv = query.shape[1], key.shape[1]
    if cp == 1:
        q, k, v, full_positions = query, key, value, position_ids
    else:
        if h_kv % cp:  # too few KV heads to scatter: repeat them up to the query heads
            key, value = _repeat_kv(key, h_q // h_kv), _repeat_kv(value, h_q // h_kv)
        q, k, v = (_seq_to_heads(t, group, cp) for t in (query, key, value))
        positions = _gather_rows(position_ids, group)  # [cp, b, s], contiguous slices in rank order
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


def set_group(model: nn.Module, group) -> None:
    """Point every attention module at `group` (None: attend locally)."""
    for module in model.modules():
        if hasattr(module, _GROUP_ATTR):
            setattr(module, _GROUP_ATTR, group)


def ring_attention_interface(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """HF attention-interface function over the ring (zig-zag slices)."""
    from loomtrain.parallel.ring import ring_attention

    group = getattr(module, _GROUP_ATTR)
    cp = dist.get_world_size(group)
    rank = dist.get_rank(group)
    position_ids = kwargs["position_ids"]
    b, s = position_ids.shape
    gathered = _gather_rows(position_ids, group)  # [cp, b, s]: each rank's zig-zag slice
    full = torch.empty(b, s * cp, dtype=position_ids.dtype, device=position_ids.device)
    for r in range(cp):
        full[:, sequence_indices(s * cp, cp, r, "ring").to(full.device)] = gathered[r]
    docs = doc_ids(full)[:, sequence_indices(s * cp, cp, rank, "ring").to(full.device)]
    out = ring_attention(query, key, value, docs, position_ids, group=group,
                         scaling=scaling if scaling is not None else query.shape[-1] ** -0.5)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Make both implementations known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ULYSSES, ulysses_attention)
    AttentionInterface.register(RING, ring_attention_interface)


def apply_cp(model: nn.Module, cp_mesh, impl: str) -> None:
    """Route the model's attention through Ulysses or ring attention over `cp_mesh` (None: the
    heterogeneous scheduler sets a group per micro-step)."""
    register_attention()
    group = cp_mesh.get_group() if cp_mesh is not None else None
    for module in model.modules():
        if type(module).__name__.endswith("Attention"):
            setattr(module, _GROUP_ATTR, group)
    model.config._attn_implementation = ULYSSES if impl == "ulysses" else RING
