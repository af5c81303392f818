"""Memory-linear packed causal attention in pure torch: blockwise online softmax forward and a
FlashAttention-2-style backward that recomputes scores block by block.

Why: a dense [S, S] score or mask tensor is 16 GiB per row at 128K tokens. Here neither pass
holds more than one [heads, block_q, block_k] score block; what is saved for backward is q, k, v,
the output and one log-sum-exp (lse) per query row, all linear in tokens. Block pairs that no
query can see (other documents, the future) are never computed (`blockplan.plan_blocks`).

Layout: q [Hq, Tq, D]; k, v [Hkv, Tk, D] with Hq a multiple of Hkv (GQA / MQA: query head h uses
KV head h // (Hq / Hkv), as HF's `repeat_kv`); KV heads are never repeated in memory. Visibility
is given by global indices (see `blockplan`): query i sees key j iff q_start[i] <= k_index[j] <=
q_index[i].

Forward (per query block): running row max m, row sum l and unnormalised output, folded with
every visible key block by rescaling to the new max; at the end out = acc / l and
lse = m + log l. A row that sees no key gets out 0 and lse -inf (never NaN).

Backward (per block pair, as FlashAttention-2): p = exp(s - lse) from the *final* lse,
dv += p^T dO, ds = p * (dO v^T - delta) with delta = rowsum(dO * O), dq += ds k, dk += ds^T q.
Because p and delta come from the final lse and output, the same backward is exact for one piece
of a larger attention (a ring step): pass the merged output and lse.

Compute is float32 (float64 stays float64), also under autocast (which is switched off inside, so
bf16 runs keep float32 scores); results come back in that compute dtype.
"""
from __future__ import annotations

import functools

import torch

from loomtrain.kernels.blockplan import BlockPlan

NEG_INF = float("-inf")


def _visible(q_index, q_start, k_index, q0, q1, k0, k1) -> torch.Tensor:
    k = k_index[k0:k1][None, :]
    return (k >= q_start[q0:q1][:, None]) & (k <= q_index[q0:q1][:, None])


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _no_autocast(fn):
    """Run `fn` with autocast off on its first argument's device: scores stay in compute dtype."""
    @functools.wraps(fn)
    def wrapped(q, *args, **kwargs):
        with torch.autocast(q.device.type, enabled=False):
            return fn(q, *args, **kwargs)
    return wrapped


@_no_autocast
def blockwise_forward(q, k, v, q_index, q_start, k_index, scale: float, plan: BlockPlan):
    """(out [Hq, Tq, D], lse [Hq, Tq]) in the compute dtype; see the module docstring."""
    cdt = compute_dtype(q.dtype)
    hq, tq, d = q.shape
    hkv = k.shape[0]
    g = hq // hkv
    qg = q.reshape(hkv, g, tq, d)
    out = torch.zeros(hkv, g, tq, v.shape[-1], dtype=cdt, device=q.device)
    lse = torch.full((hkv, g, tq), NEG_INF, dtype=cdt, device=q.device)
    for q0, q1, keys in plan.rows:
        qb = qg[:, :, q0:q1].to(cdt) * scale
        m = torch.full(qb.shape[:-1], NEG_INF, dtype=cdt, device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros(hkv, g, q1 - q0, v.shape[-1], dtype=cdt, device=q.device)
        for k0, k1, masked in keys:
            s = torch.matmul(qb, k[:, None, k0:k1].to(cdt).transpose(-1, -2))
            if masked:
                vis = _visible(q_index, q_start, k_index, q0, q1, k0, k1)
                if not bool(vis.any()):
                    continue
                s.masked_fill_(~vis, NEG_INF)
            m_new = torch.maximum(m, s.amax(dim=-1))
            base = m_new.masked_fill(m_new == NEG_INF, 0.0)  # rows with nothing yet: no NaN
            p = torch.exp(s - base.unsqueeze(-1))
            alpha = torch.exp(m - base)
            l = l * alpha + p.sum(dim=-1)
            acc = acc * alpha.unsqueeze(-1) + torch.matmul(p, v[:, None, k0:k1].to(cdt))
            m = m_new
        seen = l > 0
        safe_l = torch.where(seen, l, torch.ones_like(l))
        out[:, :, q0:q1] = acc / safe_l.unsqueeze(-1)
        lse[:, :, q0:q1] = torch.where(seen, m + torch.log(safe_l), torch.full_like(l, NEG_INF))
    return out.reshape(hq, tq, -1), lse.reshape(hq, tq)


@_no_autocast
def blockwise_backward(q, k, v, out, lse, dout, q_index, q_start, k_index, scale: float, plan: BlockPlan,
                       delta: torch.Tensor | None = None):
    """(dq, dk, dv) in the compute dtype. `out`, `lse` are the final (merged) output and lse of
    these queries; `delta` = rowsum(dout * out) may be passed in when several key pieces share it."""
    cdt = compute_dtype(q.dtype)
    hq, tq, d = q.shape
    hkv, tk, dv_dim = v.shape
    g = hq // hkv
    qg = q.reshape(hkv, g, tq, d)
    dog = dout.reshape(hkv, g, tq, dv_dim)
    if delta is None:
        delta = (dout.to(cdt) * out.to(cdt)).sum(dim=-1)
    delta = delta.reshape(hkv, g, tq)
    # Rows that saw nothing have lse -inf: +inf makes their p exactly 0.
    lse_g = lse.to(cdt).reshape(hkv, g, tq)
    lse_g = lse_g.masked_fill(lse_g == NEG_INF, float("inf"))
    dq = torch.zeros(hkv, g, tq, d, dtype=cdt, device=q.device)
    dk = torch.zeros(hkv, tk, d, dtype=cdt, device=q.device)
    dv = torch.zeros(hkv, tk, dv_dim, dtype=cdt, device=q.device)
    for q0, q1, keys in plan.rows:
        qb = qg[:, :, q0:q1].to(cdt)
        qs = qb * scale
        dob = dog[:, :, q0:q1].to(cdt)
        lb = lse_g[:, :, q0:q1].unsqueeze(-1)
        db = delta[:, :, q0:q1].unsqueeze(-1)
        dq_acc = torch.zeros_like(qb)
        for k0, k1, masked in keys:
            kb = k[:, None, k0:k1].to(cdt)
            vb = v[:, None, k0:k1].to(cdt)
            p = torch.exp(torch.matmul(qs, kb.transpose(-1, -2)) - lb)
            if masked:
                vis = _visible(q_index, q_start, k_index, q0, q1, k0, k1)
                if not bool(vis.any()):
                    continue
                p.masked_fill_(~vis, 0.0)
            dv[:, k0:k1] += torch.matmul(p.transpose(-1, -2), dob).sum(dim=1)
            ds = p * (torch.matmul(dob, vb.transpose(-1, -2)) - db)
            dq_acc += torch.matmul(ds, kb)
            dk[:, k0:k1] += torch.matmul(ds.transpose(-1, -2), qb).sum(dim=1)
        dq[:, :, q0:q1] = dq_acc * scale
    return dq.reshape(hq, tq, d), dk * scale, dv


class BlockwiseAttention(torch.autograd.Function):
    """Autograd wrapper: saves only linear-size tensors (q, k, v, out, lse, indices) and the plan."""

    @staticmethod
    def forward(ctx, q, k, v, q_index, q_start, k_index, scale, plan):
        out, lse = blockwise_forward(q, k, v, q_index, q_start, k_index, scale, plan)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, q_index, q_start, k_index)
        ctx.scale, ctx.plan = scale, plan
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, q_index, q_start, k_index = ctx.saved_tensors
        dq, dk, dv = blockwise_backward(q, k, v, out, lse, dout, q_index, q_start, k_index, ctx.scale, ctx.plan)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None
