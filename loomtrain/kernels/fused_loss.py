"""Linear + cross-entropy fused and chunked over tokens: the `[tokens, vocab]` logits are never
whole in memory, only one `[chunk, vocab]` block at a time (at a 128K vocabulary and 8K tokens the
stock fp32 logits and their gradient are 8 GiB; a 512-token chunk is 256 MiB).

`fused_linear_cross_entropy(hidden, weight, labels)` returns the SUM of token cross-entropies over
labels != -100 (the step divides by the global count of valid tokens, as the stock path does). It
equals `F.cross_entropy((hidden @ weight.T).float(), labels, reduction="sum")` with the model's
own logit post-processing (`LogitTransform`: Cohere/Granite scale, Gemma 2/3 soft-capping).

Gradients are computed during the forward, chunk by chunk, the way Liger does it: the loss is a
scalar, so its backward only multiplies the stored gradients of `hidden` and `weight` by the
incoming scalar. That keeps the matmul count at the stock path's three (logits, d hidden,
d weight) instead of four for a recompute-in-backward design, at the price of holding d hidden
and d weight from the forward to the backward, which the training step runs back to back.

Vocabulary-parallel heads (`VocabShard`): each tensor-parallel rank holds rows
`[start, start + V_local)` of the head. Per chunk the ranks combine the row max (all-reduce MAX)
and then the sum of exponentials and the target logit (one all-reduce SUM of both), so every rank
gets the exact log-sum-exp over the full vocabulary without gathering logits. The gradient of
`hidden` is a partial sum over the shards and is all-reduced once at the end; each rank's head
shard gets exactly its own rows' gradient. Libraries (Liger, torch's `loss_parallel`) do one or
the other: Liger fuses but needs the whole vocabulary on one rank; `loss_parallel` spans shards
but materialises every rank's `[tokens, V_local]` logits and their gradient.

On CUDA, `liger_loss` hands the unsharded case to liger-kernel's Triton kernel when installed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

try:  # optional: liger-kernel's Triton fused linear cross-entropy (CUDA only)
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
except ImportError:  # not installed (always the case on a CPU-only machine)
    liger_fused_linear_cross_entropy = None

IGNORE = -100
# Auto chunk: about 2**25 logits (128 MiB in fp32) per chunk, between these many tokens.
_AUTO_CHUNK_LOGITS = 2**25
_MIN_CHUNK, _MAX_CHUNK = 64, 8192


@dataclass(frozen=True)
class LogitTransform:
    """What the model does to `hidden @ weight.T` before the softmax: `scale` first (Cohere's
    `logit_scale`, Granite's `1 / logits_scaling`), then `softcap * tanh(z / softcap)` (Gemma 2/3)."""

    scale: float = 1.0
    softcap: float | None = None


@dataclass(frozen=True)
class VocabShard:
    """This rank's rows of a vocabulary-parallel head: `start` of the global vocabulary, and the
    process group over which the vocabulary is split."""

    group: object
    start: int


def liger_available() -> bool:
    return liger_fused_linear_cross_entropy is not None


def auto_chunk_tokens(vocab_local: int) -> int:
    """Tokens per chunk so one chunk's fp32 logits are about 128 MiB."""
    return max(_MIN_CHUNK, min(_MAX_CHUNK, _AUTO_CHUNK_LOGITS // max(1, vocab_local)))


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               bias: torch.Tensor | None = None, transform: LogitTransform = LogitTransform(),
                               chunk_tokens: int = 0, shard: VocabShard | None = None) -> torch.Tensor:
    """Sum of cross-entropies of `hidden @ weight.T (+ bias)` against `labels` (-100 ignored).

    hidden: [..., d] (any leading shape, matching labels); weight: [V or V_local, d]; the matmul
    runs in the inputs' dtype, the softmax in fp32 (as `token_loss_sum` does). `chunk_tokens=0`
    picks `auto_chunk_tokens`. With `shard`, every rank of `shard.group` must call this with the
    same hidden and labels (a tensor-parallel group does)."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not match")
    chunk = chunk_tokens or auto_chunk_tokens(weight.shape[0])
    return _FusedLinearCE.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1),
                                transform, chunk, shard)


def liger_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
               bias: torch.Tensor | None = None, transform: LogitTransform = LogitTransform()) -> torch.Tensor:
    """The same sum through liger-kernel's Triton kernel (CUDA, whole vocabulary on this rank).
    The scale is folded into hidden and bias (`s * (h W^T + b) = (s h) W^T + s b`)."""
    if liger_fused_linear_cross_entropy is None:
        raise RuntimeError("liger-kernel is not installed")
    h = hidden.reshape(-1, hidden.shape[-1])
    if transform.scale != 1.0:
        h = h * transform.scale
        bias = None if bias is None else bias * transform.scale
    out = liger_fused_linear_cross_entropy(h, weight, labels.reshape(-1), bias=bias, ignore_index=IGNORE,
                                           reduction="sum", softcap=transform.softcap)
    if isinstance(out, tuple):  # (loss, z_loss) in some versions
        out = out[0]
    return getattr(out, "loss", out).float()


class _FusedLinearCE(torch.autograd.Function):
    """Forward computes the loss and, when an input needs it, the gradients; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, transform, chunk, shard):
        needs_grad = any(t is not None and t.requires_grad for t in (hidden, weight, bias))
        valid = (labels != IGNORE).nonzero().squeeze(1)
        every = valid.numel() == labels.numel()  # no ignored label: no gathered copy of hidden
        h_valid = hidden if every else hidden.index_select(0, valid)
        y_valid = labels if every else labels.index_select(0, valid)
        grad_h = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device) if needs_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_grad else None
        grad_b = (torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
                  if needs_grad and bias is not None else None)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        start = shard.start if shard is not None else 0
        for lo in range(0, h_valid.shape[0], chunk):
            hc, yc = h_valid[lo:lo + chunk], y_valid[lo:lo + chunk]
            loss_c, dz = _chunk(hc, weight, bias, yc, transform, start, shard, needs_grad)
            total += loss_c
            if needs_grad:
                dz = dz.to(hidden.dtype)
                if every:
                    torch.matmul(dz, weight.to(hidden.dtype), out=grad_h[lo:lo + chunk])
                else:
                    grad_h.index_copy_(0, valid[lo:lo + chunk], dz @ weight.to(hidden.dtype))
                if hc.dtype == torch.float32:  # accumulate in place: no [V, d] temporary per chunk
                    grad_w.addmm_(dz.t(), hc)
                else:
                    grad_w += (dz.t() @ hc).float()
                if grad_b is not None:
                    grad_b += dz.float().sum(0)
                del dz  # free this chunk's [chunk, V] before the next one is allocated
        if needs_grad and shard is not None:
            dist.all_reduce(grad_h, group=shard.group)  # each shard's vocabulary rows added up
        ctx.grads = (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                     None if grad_b is None else grad_b.to(bias.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None  # the stored gradients are scaled in place: no second copy of d weight

        def scaled(g, needed):
            return None if g is None or not needed else g.mul_(grad_out.to(g.dtype))

        need = ctx.needs_input_grad
        return scaled(grad_h, need[0]), scaled(grad_w, need[1]), scaled(grad_b, need[2]), None, None, None, None


def _chunk(hc, weight, bias, yc, transform: LogitTransform, start: int, shard: VocabShard | None,
           needs_grad: bool):
    """Loss sum of one chunk of valid tokens, and the gradient of the loss w.r.t. its logits."""
    z = hc @ weight.to(hc.dtype).t()
    if bias is not None:
        z = z + bias.to(z.dtype)
    z = z.float()
    if transform.scale != 1.0:
        z.mul_(transform.scale)
    tanh = None
    if transform.softcap:
        tanh = torch.tanh(z / transform.softcap)
        z = tanh * transform.softcap
    local = yc - start
    mine = (local >= 0) & (local < z.shape[1])
    target = torch.where(mine, z.gather(1, local.clamp(0, z.shape[1] - 1).unsqueeze(1)).squeeze(1),
                         torch.zeros((), dtype=z.dtype, device=z.device))
    row_max = z.amax(1)
    if shard is not None:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=shard.group)
    z.sub_(row_max.unsqueeze(1)).exp_()  # z now holds exp(logit - max)
    sums = torch.stack([z.sum(1), target])
    if shard is not None:
        dist.all_reduce(sums, group=shard.group)
    sumexp, target = sums[0], sums[1]
    loss = (row_max + sumexp.log() - target).sum()
    if not needs_grad:
        return loss, None
    dz = z.div_(sumexp.unsqueeze(1))  # softmax over this rank's rows
    rows = mine.nonzero().squeeze(1)
    dz.index_put_((rows, local.index_select(0, rows)), torch.tensor(-1.0, device=dz.device), accumulate=True)
    if tanh is not None:
        dz.mul_(1 - tanh * tanh)
    if transform.scale != 1.0:
        dz.mul_(transform.scale)
    return loss, dz
