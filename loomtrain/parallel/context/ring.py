"""Ring attention for context parallelism, with zig-zag load balance and packed-document masks.

Why a ring: with context parallelism each rank holds only a slice of the sequence. Ulysses trades
that for head sharding through all-to-alls, which stops scaling once the degree exceeds the KV
heads; a ring keeps every rank on its own queries and streams the key/value blocks of the other
ranks past them (cp-1 point-to-point hops), so the degree is bounded only by the sequence length
and each hop's transfer overlaps the attention over the block already at hand.

Why zig-zag: under a causal mask the last slice of a sequence attends to everything and the first
to almost nothing. Cutting the sequence into 2*cp chunks and giving rank r chunks r and 2*cp-1-r
pairs a cheap chunk with an expensive one, so every rank does the same causal work.

Why global indices, not local ones: after zig-zag sharding a rank's tokens are not contiguous,
and packed rows hold several documents. Every token has a global index in the flattened batch
(`loomtrain.kernels.blockplan`); a query sees the keys between its document's start and itself.
The key indices of every rank are known up front (gathered once per micro-batch with the
positions), so nothing but K and V travels around the ring.

Forward: each ring step is one call of the memory-linear kernel (`kernels.blockwise`) on the KV
block at hand; its block plan skips every fully masked block pair (other documents, the future),
and a step with nothing visible makes no call. Step results are merged by log-sum-exp (lse), in
float32 (float64 stays float64); the final lse per row is saved for backward.

Backward: recompute, not store. Keeping every received KV block from the forward pass would cost
cp times the KV memory; instead the KV blocks go around the ring a second time, and each block
travels together with a dK/dV accumulator: every rank adds the gradient of its own queries w.r.t.
that block (one kernel backward call, from the *final* output and lse, as FlashAttention-2 does
per block), and after cp-1 hops a final hop brings the fully summed accumulator home to the
block's owner. The gradients are exact, and dQ never leaves the rank.

Nothing here reads global process-group state: the ring is the `group` passed in (peers are
addressed by their rank in that group), and `group=None` means a single rank with no
communication, which is also the in-process reference path.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from loomtrain.kernels.attention import DEFAULT_BLOCK
from loomtrain.kernels.blockplan import layout_from_position_ids, plan_blocks
from loomtrain.kernels.blockwise import blockwise_backward, blockwise_forward, compute_dtype
from loomtrain.kernels.hf import CACHE_ATTR, check_supported
from loomtrain.parallel.context.common import GROUP_ATTR, gather_rows, sequence_indices

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


class _StepPlans:
    """Per ring step t, the kernel's block plan for this rank's queries against the KV block that
    arrives at step t (owned by rank (rank - t) mod cp), computed once in forward and reused by
    backward. A step with no visible pair makes no kernel call at all."""

    def __init__(self, ring: _Ring, q_index, q_start, k_index_all, block: int) -> None:
        self.owners = [(ring.rank - t) % ring.size for t in range(ring.size)]
        self.k_index = [k_index_all[r] for r in self.owners]
        self.plans = [plan_blocks(q_index, q_start, k, block, block) for k in self.k_index]


def _merge(acc_out, acc_lse, out, lse):
    """Fold one step's (out, lse) into the running ones by log-sum-exp; rows that have seen
    nothing on either side keep 0 / -inf (no NaN)."""
    new = torch.logaddexp(acc_lse, lse)
    base = new.masked_fill(torch.isinf(new), 0.0)
    a = torch.exp(acc_lse - base).unsqueeze(-1)
    b = torch.exp(lse - base).unsqueeze(-1)
    return acc_out * a + out * b, new


def _ring_forward(ring: _Ring, q, k, v, q_index, q_start, plans: _StepPlans, scale: float, counts):
    """One kernel call per visible ring step, merged by lse. Returns out [Hq, T, D], lse [Hq, T]."""
    cdt = compute_dtype(q.dtype)
    acc_out = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=cdt, device=q.device)
    acc_lse = torch.full(q.shape[:-1], float("-inf"), dtype=cdt, device=q.device)
    kv = torch.stack([k, v])
    for step in range(ring.size):
        # Post the next hop before computing, so the transfer overlaps this block's attention.
        pending = ring.shift([kv], _TAG_KV) if step < ring.size - 1 else None
        plan = plans.plans[step]
        if plan.pairs:
            out, lse = blockwise_forward(q, kv[0], kv[1], q_index, q_start, plans.k_index[step], scale, plan)
            acc_out, acc_lse = _merge(acc_out, acc_lse, out, lse)
            if counts is not None:
                counts["fwd"] += 1
                counts["pairs"] += plan.pairs
        if pending is not None:
            kv = pending.wait()[0]
    return acc_out, acc_lse


def _ring_backward(ring: _Ring, q, k, v, q_index, q_start, plans: _StepPlans, out, lse, dout, scale: float, counts):
    """Second ring pass: KV blocks go round again, each with its dK/dV accumulator; every step's
    gradients come from the final output and lse (see module doc)."""
    cdt = compute_dtype(q.dtype)
    delta = (dout.to(cdt) * out.to(cdt)).sum(dim=-1)
    dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
    kv = torch.stack([k, v])
    grad_pending = None
    for step in range(ring.size):
        kv_pending = ring.shift([kv], _TAG_KV) if step < ring.size - 1 else None
        dkv = torch.zeros(kv.shape, dtype=cdt, device=kv.device)
        plan = plans.plans[step]
        if plan.pairs:
            dq_s, dk_s, dv_s = blockwise_backward(q, kv[0], kv[1], out, lse, dout, q_index, q_start,
                                                  plans.k_index[step], scale, plan, delta=delta)
            dq += dq_s
            dkv[0] += dk_s
            dkv[1] += dv_s
            if counts is not None:
                counts["bwd"] += 1
        if grad_pending is not None:
            # The accumulator for the block now held, carrying the previous ranks' contributions.
            dkv += grad_pending.wait()[0]
        if ring.size > 1:
            # On the last step this hop brings each block's finished gradient home to its owner.
            grad_pending = ring.shift([dkv], _TAG_GRAD)
        if kv_pending is not None:
            kv = kv_pending.wait()[0]
    if grad_pending is not None:
        dkv = grad_pending.wait()[0]
    return dq, dkv[0], dkv[1]


class _RingAttention(torch.autograd.Function):
    """Autograd wrapper: forward saves only local tensors (q, k, v, output, lse, indices);
    backward recomputes by a second ring pass instead of keeping remote KV blocks."""

    @staticmethod
    def forward(ctx, q, k, v, q_index, q_start, ring, plans, scale, counts):
        out, lse = _ring_forward(ring, q, k, v, q_index, q_start, plans, scale, counts)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, q_index, q_start, out, lse)
        ctx.ring, ctx.plans, ctx.scale, ctx.counts = ring, plans, scale, counts
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, q_index, q_start, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(ctx.ring, q, k, v, q_index, q_start, ctx.plans, out, lse, dout, ctx.scale,
                                    ctx.counts)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_index: torch.Tensor,
                   q_start: torch.Tensor, k_index_all: torch.Tensor, group, scaling: float | None,
                   block: int = DEFAULT_BLOCK, counts: dict | None = None) -> torch.Tensor:
    """Attention of this rank's queries over the keys held by all of `group`'s ranks.

    q: [Hq, T, D]; k, v: [Hkv, T, D] (T local tokens, the same on every rank: KV blocks travel as
    fixed-size messages; Hq a multiple of Hkv). Visibility as in `loomtrain.kernels.blockplan`:
    query i sees key j iff q_start[i] <= j <= q_index[i] in global indices (pass a query's
    document end as q_index for bidirectional attention). k_index_all: [cp, T] global index of
    every rank's keys, in group-rank order. `group=None` runs on one rank with no communication.
    `counts` (optional dict with fwd, bwd, pairs) is incremented by the kernel calls made, for
    tests and benchmarks. Returns [Hq, T, D] in q's dtype; gradients are exact.
    """
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be [heads, tokens, head_dim]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    hq, t, d = q.shape
    if k.shape != v.shape or k.shape[1] != t or k.shape[2] != d:
        raise ValueError(f"k and v must be [Hkv, {t}, {d}] like q; got {tuple(k.shape)} and {tuple(v.shape)}")
    if hq % k.shape[0] != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({k.shape[0]})")
    ring = _Ring(group)
    for name, x, shape in (("q_index", q_index, (t,)), ("q_start", q_start, (t,)),
                           ("k_index_all", k_index_all, (ring.size, t))):
        if tuple(x.shape) != shape or x.is_floating_point() or x.is_complex():
            raise ValueError(f"{name} must be an integer tensor of shape {list(shape)}; got {x.dtype} {tuple(x.shape)}")
    scale = float(d ** -0.5 if scaling is None else scaling)
    q_index, q_start, k_index_all = (x.to(device=q.device, dtype=torch.int64) for x in (q_index, q_start, k_index_all))
    plans = _StepPlans(ring, q_index, q_start, k_index_all, block)
    return _RingAttention.apply(q, k.contiguous(), v.contiguous(), q_index, q_start, ring, plans, scale, counts)


def _ring_layout(position_ids: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q_index, q_start, k_index_all) of this rank's zig-zag slice: the slices of all ranks are
    gathered (integers, once per micro-batch) to find where documents start in the whole row."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    b, s = position_ids.shape
    total = s * cp
    gathered = gather_rows(position_ids, group)  # [cp, b, s]: each rank's zig-zag slice
    full = torch.empty(b, total, dtype=position_ids.dtype, device=position_ids.device)
    rows = torch.arange(b, device=position_ids.device)[:, None] * total
    k_index_all = []
    for r in range(cp):
        idx = sequence_indices(total, cp, r, "ring").to(full.device)
        full[:, idx] = gathered[r]
        k_index_all.append((rows + idx[None, :]).reshape(-1))
    layout = layout_from_position_ids(full)
    q_index = k_index_all[rank]
    return q_index, layout.start[q_index], torch.stack(k_index_all)


def ring_attention_interface(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """HF attention-interface function over the ring (zig-zag slices): [b, H, s, d] in,
    ([b, s, H, d], None) out. Batch rows are flattened into one packed sequence."""
    check_supported(module, dropout, kwargs)
    group = getattr(module, GROUP_ATTR)
    position_ids = kwargs["position_ids"]
    if position_ids.shape[0] != query.shape[0]:
        position_ids = position_ids.expand(query.shape[0], -1)
    cache = getattr(module, CACHE_ATTR, None)
    derive = lambda pos: _ring_layout(pos, group)  # noqa: E731
    if cache is not None:
        q_index, q_start, k_index_all = cache.get(position_ids, derive, key=("ring", id(group)))
    else:
        q_index, q_start, k_index_all = derive(position_ids)
    b, hq, s, d = query.shape
    flat = lambda t: t.transpose(0, 1).reshape(t.shape[1], b * s, t.shape[-1])  # noqa: E731
    out = ring_attention(flat(query), flat(key), flat(value), q_index=q_index, q_start=q_start,
                         k_index_all=k_index_all, group=group, scaling=scaling)
    return out.reshape(hq, b, s, d).permute(1, 2, 0, 3).contiguous(), None
