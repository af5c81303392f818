"""Ring attention for context parallelism, with zig-zag load balance and packed-document masks.

Why a ring: with context parallelism each rank holds only a slice of the sequence. Ulysses trades
that for head sharding through all-to-alls, which stops scaling once the degree exceeds the KV
heads; a ring keeps every rank on its own queries and streams the key/value blocks of the other
ranks past them (cp-1 point-to-point hops), so the degree is bounded only by the sequence length
and each hop's transfer overlaps the attention over the block already at hand.

Why zig-zag: under a causal mask the last slice of a sequence attends to everything and the first
to almost nothing. Cutting the sequence into 2*cp chunks and giving rank r chunks r and 2*cp-1-r
pairs a cheap chunk with an expensive one, so every rank does the same causal work.

Why positions and document ids travel with the keys: after zig-zag sharding a rank's tokens are
not contiguous, and packed rows hold several documents. Causality (key position <= query
position) and the document mask (same document only) are therefore evaluated from the global
position and document id of every query and key, never from local indices. From that mask each
block's bounding box of visible rows and columns is computed, and only that box is multiplied:
fully masked blocks are skipped outright, and for zig-zag causal blocks the box is exactly the
half of the queries or keys that can see each other, which is where the balance pays off.

Forward: online softmax. Each rank keeps an unnormalised output, a running row max and a running
row sum in float32 (float64 stays float64); every block is folded in with log-sum-exp rescaling,
and the final log-sum-exp (lse) per row is saved for backward.

Backward: recompute, not store. Keeping every received KV block from the forward pass would cost
cp times the KV memory; instead the KV blocks go around the ring a second time, and each block
travels together with a dK/dV accumulator: every rank adds the gradient of its own queries w.r.t.
that block, and after cp-1 hops a final hop brings the fully summed accumulator home to the
block's owner. Probabilities are recomputed from the saved lse (as in FlashAttention), so the
gradients are exact, not approximated, and dQ never leaves the rank.

Nothing here reads global process-group state: the ring is the `group` passed in (peers are
addressed by their rank in that group), and `group=None` means a single rank with no
communication, which is also the in-process reference path.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from loomtrain.parallel.context.common import GROUP_ATTR, doc_ids, gather_rows, sequence_indices, zigzag_indices

# Distinct tags keep the KV stream, its metadata and the gradient stream from being matched to
# each other by backends that match messages by tag (gloo); NCCL ignores them.
_TAG_KV = 7100
_TAG_GRAD = 7200


class _Pending:
    """Receive buffers of a posted ring shift, with the works to wait on (sends included, so the
    sent tensors may be freed or reused afterwards)."""

    def __init__(self, buffers: list[torch.Tensor], works: list, sent: list[torch.Tensor]) -> None:
        self.buffers, self.works, self._sent = buffers, works, sent  # `sent` kept alive until waited

    def wait(self) -> list[torch.Tensor]:
        for work in self.works:
            work.wait()
        return self.buffers


class _Ring:
    """The ring of `group`'s ranks: send to the next, receive from the previous."""

    def __init__(self, group) -> None:
        self.group = group
        if group is None:
            self.size, self.rank = 1, 0
        else:
            self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
            if self.rank < 0:
                raise ValueError("ring_attention was called on a rank that is not in `group`")
        self.next = (self.rank + 1) % self.size
        self.prev = (self.rank - 1) % self.size

    def shift(self, tensors: list[torch.Tensor], tag: int) -> _Pending:
        """Post sends of `tensors` to the next rank and receives of like tensors from the previous
        one; all ranks post both sides before anyone waits, so the ring cannot deadlock."""
        recv = [torch.empty_like(t) for t in tensors]
        sent = [t.contiguous() for t in tensors]
        ops = []
        for i, (out, into) in enumerate(zip(sent, recv)):
            ops.append(dist.P2POp(dist.isend, out, group=self.group, group_peer=self.next, tag=tag + i))
            ops.append(dist.P2POp(dist.irecv, into, group=self.group, group_peer=self.prev, tag=tag + i))
        return _Pending(recv, dist.batch_isend_irecv(ops), sent)


def _visible_box(doc_q, pos_q, doc_k, pos_k, causal: bool):
    """Mask of query rows × key columns that may attend, cropped to its bounding box.

    Returns None when nothing in the block is visible (the block is skipped), else
    (row slice, column slice, cropped mask [b, rows, cols]). The box is the union over the batch,
    so every batch row shares one matmul shape.
    """
    mask = doc_q[:, :, None] == doc_k[:, None, :]
    if causal:
        mask &= pos_k[:, None, :] <= pos_q[:, :, None]
    rows = mask.any(dim=2).any(dim=0).nonzero()
    if rows.numel() == 0:
        return None
    cols = mask.any(dim=1).any(dim=0).nonzero()
    r0, r1, c0, c1 = (int(x) for x in (rows[0, 0], rows[-1, 0] + 1, cols[0, 0], cols[-1, 0] + 1))
    return slice(r0, r1), slice(c0, c1), mask[:, r0:r1, c0:c1]


def _block_forward(qg, k, v, mask, scaling: float):
    """Unnormalised attention of grouped queries qg [b, Hkv, g, sq, d] over one key block
    k, v [b, Hkv, sk, d]. Returns (o, m, l): sum_j p_ij v_j, row max m (-inf where a row sees
    nothing) and row sum l of p = exp(s - m) (0 where a row sees nothing)."""
    scores = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    m = scores.amax(dim=-1)
    p = torch.exp(scores - m.masked_fill(torch.isinf(m), 0.0).unsqueeze(-1))
    return torch.matmul(p, v.unsqueeze(2)), m, p.sum(dim=-1)


def _merge(acc_o, acc_m, acc_l, o, m, l) -> None:
    """Fold a block result into the running (output, max, sum) in place, rescaling both sides to
    the new row max; a max of -inf on both sides (nothing seen yet) is pinned to 0 so no NaN."""
    m_new = torch.maximum(acc_m, m)
    base = m_new.masked_fill(torch.isinf(m_new), 0.0)
    a, b = torch.exp(acc_m - base), torch.exp(m - base)
    acc_o.mul_(a.unsqueeze(-1)).add_(o * b.unsqueeze(-1))
    acc_l.mul_(a).add_(l * b)
    acc_m.copy_(m_new)


def _block_backward(qg, k, v, dog, delta, lse, mask, scaling: float):
    """Gradients of one block from recomputed probabilities p = exp(s - lse).

    `delta` = rowsum(dO * O), `lse` has +inf where a row saw nothing (so p = 0 there). Returns
    dq [b, Hkv, g, sq, d] and dk, dv [b, Hkv, sk, d] summed over the query heads sharing a KV head.
    """
    k4, v4 = k.unsqueeze(2), v.unsqueeze(2)
    scores = torch.matmul(qg, k4.transpose(-1, -2)) * scaling
    p = torch.exp(scores - lse.unsqueeze(-1)).masked_fill(~mask[:, None, None], 0.0)
    dv = torch.matmul(p.transpose(-1, -2), dog).sum(dim=2)
    ds = p * (torch.matmul(dog, v4.transpose(-1, -2)) - delta.unsqueeze(-1))
    dq = torch.matmul(ds, k4) * scaling
    dk = torch.matmul(ds.transpose(-1, -2), qg).sum(dim=2) * scaling
    return dq, dk, dv


def _group_heads(x: torch.Tensor, hkv: int, dtype) -> torch.Tensor:
    """[b, Hq, s, d] -> [b, Hkv, g, s, d]: query head h uses KV head h // g (HF `repeat_kv`)."""
    b, hq, s, d = x.shape
    return x.to(dtype).reshape(b, hkv, hq // hkv, s, d)


def _ring_forward(ring: _Ring, q, k, v, doc, pos, scaling: float, causal: bool):
    """Online-softmax ring pass. Returns out [b, Hq, s, d] (compute dtype) and lse [b, Hkv, g, s]."""
    cdt = torch.promote_types(q.dtype, torch.float32)
    hkv = k.shape[1]
    qg = _group_heads(q, hkv, cdt)
    acc_o = torch.zeros_like(qg)
    acc_m = torch.full(qg.shape[:-1], float("-inf"), dtype=cdt, device=q.device)
    acc_l = torch.zeros(qg.shape[:-1], dtype=cdt, device=q.device)
    kv, meta = torch.stack([k, v]), torch.stack([doc, pos])
    for step in range(ring.size):
        # Post the next hop before computing, so the transfer overlaps this block's attention.
        pending = ring.shift([kv, meta], _TAG_KV) if step < ring.size - 1 else None
        box = _visible_box(doc, pos, meta[0], meta[1], causal)
        if box is not None:
            rs, cs, mask = box
            o, m, l = _block_forward(qg[:, :, :, rs], kv[0][:, :, cs].to(cdt), kv[1][:, :, cs].to(cdt),
                                     mask, scaling)
            _merge(acc_o[:, :, :, rs], acc_m[:, :, :, rs], acc_l[:, :, :, rs], o, m, l)
        if pending is not None:
            kv, meta = pending.wait()
    seen = acc_l > 0
    out = acc_o / torch.where(seen, acc_l, torch.ones_like(acc_l)).unsqueeze(-1)
    lse = torch.where(seen, acc_m + torch.log(torch.where(seen, acc_l, torch.ones_like(acc_l))),
                      torch.full_like(acc_l, float("-inf")))
    return out.reshape(q.shape), lse


def _ring_backward(ring: _Ring, q, k, v, doc, pos, out, lse, dout, scaling: float, causal: bool):
    """Second ring pass: KV blocks go round again, each with its dK/dV accumulator; see module doc."""
    cdt = torch.promote_types(q.dtype, torch.float32)
    hkv = k.shape[1]
    qg, dog = _group_heads(q, hkv, cdt), _group_heads(dout, hkv, cdt)
    delta = (dog * _group_heads(out, hkv, cdt)).sum(dim=-1)
    lse = lse.masked_fill(torch.isinf(lse), float("inf"))  # rows that saw nothing: p = 0, no NaN
    dq = torch.zeros_like(qg)
    kv, meta = torch.stack([k, v]), torch.stack([doc, pos])
    grad_pending = None
    for step in range(ring.size):
        kv_pending = ring.shift([kv, meta], _TAG_KV) if step < ring.size - 1 else None
        dkv = torch.zeros(kv.shape, dtype=cdt, device=kv.device)
        box = _visible_box(doc, pos, meta[0], meta[1], causal)
        if box is not None:
            rs, cs, mask = box
            dq_b, dk_b, dv_b = _block_backward(
                qg[:, :, :, rs], kv[0][:, :, cs].to(cdt), kv[1][:, :, cs].to(cdt), dog[:, :, :, rs],
                delta[:, :, :, rs], lse[:, :, :, rs], mask, scaling)
            dq[:, :, :, rs] += dq_b
            dkv[0][:, :, cs] += dk_b
            dkv[1][:, :, cs] += dv_b
        if grad_pending is not None:
            # The accumulator for the block now held, carrying the previous ranks' contributions.
            dkv += grad_pending.wait()[0]
        if ring.size > 1:
            # On the last step this hop brings each block's finished gradient home to its owner.
            grad_pending = ring.shift([dkv], _TAG_GRAD)
        if kv_pending is not None:
            kv, meta = kv_pending.wait()
    if grad_pending is not None:
        dkv = grad_pending.wait()[0]
    return dq.reshape(q.shape), dkv[0], dkv[1]


class _RingAttention(torch.autograd.Function):
    """Autograd wrapper: forward saves only local tensors (q, k, v, output, lse, doc ids and
    positions); backward recomputes by a second ring pass instead of keeping remote KV blocks."""

    @staticmethod
    def forward(ctx, q, k, v, doc, pos, ring, scaling, causal):
        out, lse = _ring_forward(ring, q, k, v, doc, pos, scaling, causal)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, doc, pos, out, lse)
        ctx.ring, ctx.scaling, ctx.causal = ring, scaling, causal
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, doc, pos, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(ctx.ring, q, k, v, doc, pos, out, lse, dout, ctx.scaling, ctx.causal)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids_local: torch.Tensor,
                   positions_local: torch.Tensor, *, group, scaling: float | None,
                   causal: bool = True) -> torch.Tensor:
    """Attention of this rank's queries over the whole sequence held by `group`'s ranks.

    q: [b, Hq, s, d]; k, v: [b, Hkv, s, d] with Hq a multiple of Hkv (grouped-query attention);
    doc_ids_local, positions_local: [b, s] integer document id and global position of each local
    token (e.g. the zig-zag chunks of `zigzag_indices` concatenated). A query sees a key when both
    are in the same document and, if `causal`, the key's position is <= the query's. Every rank of
    `group` must pass the same shapes (zig-zag sharding gives equal local lengths), because the
    KV blocks are exchanged as fixed-size messages. `group=None` runs on one rank without any
    communication. `scaling=None` means 1/sqrt(d). Returns [b, Hq, s, d] in q's dtype;
    gradients w.r.t. q, k and v are exact (see the module docstring for the algorithm).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [batch, heads, seq, head_dim]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, hq, s, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2] != s or k.shape[3] != d:
        raise ValueError(f"k and v must be [{b}, Hkv, {s}, {d}] like q; got {tuple(k.shape)} and {tuple(v.shape)}")
    if hq % k.shape[1] != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({k.shape[1]})")
    for name, t in (("doc_ids_local", doc_ids_local), ("positions_local", positions_local)):
        if tuple(t.shape) != (b, s) or t.is_floating_point() or t.is_complex():
            raise ValueError(f"{name} must be an integer tensor of shape [{b}, {s}]; "
                             f"got {t.dtype} {tuple(t.shape)}")
    scale = float(d ** -0.5 if scaling is None else scaling)
    doc = doc_ids_local.to(device=q.device, dtype=torch.int64)
    pos = positions_local.to(device=q.device, dtype=torch.int64)
    return _RingAttention.apply(q, k.contiguous(), v.contiguous(), doc, pos, _Ring(group), scale, causal)


def ring_attention_interface(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """HF attention-interface function over the ring (zig-zag slices)."""
    group = getattr(module, GROUP_ATTR)
    cp = dist.get_world_size(group)
    rank = dist.get_rank(group)
    position_ids = kwargs["position_ids"]
    b, s = position_ids.shape
    gathered = gather_rows(position_ids, group)  # [cp, b, s]: each rank's zig-zag slice
    full = torch.empty(b, s * cp, dtype=position_ids.dtype, device=position_ids.device)
    for r in range(cp):
        full[:, sequence_indices(s * cp, cp, r, "ring").to(full.device)] = gathered[r]
    docs = doc_ids(full)[:, sequence_indices(s * cp, cp, rank, "ring").to(full.device)]
    out = ring_attention(query, key, value, docs, position_ids, group=group,
                         scaling=scaling if scaling is not None else query.shape[-1] ** -0.5)
    return out.transpose(1, 2).contiguous(), None
