"""The one entry point for packed variable-length causal attention: picks a backend and returns
(output, log-sum-exp).

Backends:
- `blockwise` (everywhere; the reference): `blockwise.BlockwiseAttention`, pure torch, memory
  linear in tokens, with its own backward.
- `varlen` (CUDA): torch's `torch.nn.attention.varlen.varlen_attn` (flash-attention varlen) with
  the layout's `cu_seqlens`; only for self-attention over a whole layout (queries = keys).
- `flex` (CUDA): FlexAttention with a document `BlockMask` built from the same intervals, so it
  also serves ring steps and zig-zag slices.

`auto` takes `varlen` where it applies, else `flex`, on CUDA, and `blockwise` otherwise.
UNTESTED ON GPU: the `varlen` and `flex` paths have never run on a GPU (no GPU was lent while they
were written); the test suite checks only `blockwise`, and a GPU run should compare them against
it (tests/test_attention_kernel.py does when CUDA is present).
"""
from __future__ import annotations

import torch

from loomtrain.kernels.blockplan import DocLayout, plan_blocks
from loomtrain.kernels.blockwise import BlockwiseAttention

BACKENDS = ("auto", "blockwise", "varlen", "flex")
# Score block edge on CPU: large enough that the per-block Python overhead is small next to the
# matmuls, small enough that a [heads, 256, 256] fp32 block stays in cache-sized territory.
DEFAULT_BLOCK = 256

try:  # torch >= 2.9 (CUDA only at run time)
    from torch.nn.attention.varlen import AuxRequest, varlen_attn
except ImportError:  # pragma: no cover - older torch
    varlen_attn = None
try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover
    flex_attention = None


def choose_backend(requested: str, device: torch.device, self_attention: bool) -> str:
    if requested not in BACKENDS:
        raise ValueError(f"attention backend {requested!r} is not one of {', '.join(BACKENDS)}")
    if requested != "auto":
        if requested != "blockwise" and device.type != "cuda":
            raise ValueError(f"attention backend {requested!r} needs a CUDA device, got {device.type}")
        if requested == "varlen" and not self_attention:
            raise ValueError("attention backend 'varlen' needs queries and keys over the same whole layout")
        return requested
    if device.type != "cuda":
        return "blockwise"
    if self_attention and varlen_attn is not None:
        return "varlen"
    return "flex" if flex_attention is not None else "blockwise"


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_index: torch.Tensor,
                     q_start: torch.Tensor, k_index: torch.Tensor, scale: float | None = None,
                     block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK, backend: str = "auto",
                     layout: DocLayout | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention within documents: q [Hq, Tq, D], k, v [Hkv, Tk, D] -> (out [Hq, Tq, D] in
    q's dtype, lse [Hq, Tq] float32 or float64, -inf where a row sees no key).

    Query i sees key j iff q_start[i] <= k_index[j] <= q_index[i] (global indices, see
    `blockplan`). `layout`: the whole micro-batch's layout when queries and keys are all of its
    tokens, which lets the CUDA varlen kernel use its cu_seqlens."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be [heads, tokens, head_dim]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape[:2] != v.shape[:2] or q.shape[-1] != k.shape[-1] or q.shape[0] % k.shape[0]:
        raise ValueError(f"k, v must be [Hkv, Tk, D] with Hq ({q.shape[0]}) a multiple of Hkv; got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q_index.shape != (q.shape[1],) or q_start.shape != (q.shape[1],) or k_index.shape != (k.shape[1],):
        raise ValueError("q_index, q_start must have one entry per query and k_index one per key")
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    which = choose_backend(backend, q.device, layout is not None)
    if which == "varlen":
        return _varlen(q, k, v, layout, scale)
    if which == "flex":
        return _flex(q, k, v, q_index, q_start, k_index, scale)
    return _blockwise(q, k, v, q_index, q_start, k_index, scale, block_q, block_k)


# Not traced by torch.compile (`parallel.compile` compiles whole decoder blocks): the block plan is
# data-dependent Python control flow, so the compiled block calls this eagerly, as one graph break.
@torch.compiler.disable
def _blockwise(q, k, v, q_index, q_start, k_index, scale: float, block_q: int, block_k: int):
    plan = plan_blocks(q_index, q_start, k_index, block_q, block_k)
    return BlockwiseAttention.apply(q, k, v, q_index, q_start, k_index, scale, plan)


def attend_bhsd(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: DocLayout,
                scale: float | None, backend: str = "auto", block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """HF layout in and out: [b, Hq, S, D] q and [b, Hkv, S, D] k, v of a whole packed micro-batch
    -> [b, S, Hq, D] (what an HF attention function returns). Batch rows are flattened into one
    packed sequence, so no per-row loop and no mask."""
    b, hq, s, d = query.shape
    flat = lambda t: t.transpose(0, 1).reshape(t.shape[1], b * s, t.shape[-1])  # noqa: E731
    out, _ = packed_attention(flat(query), flat(key), flat(value), q_index=layout.index, q_start=layout.start,
                              k_index=layout.index, scale=scale, block_q=block, block_k=block,
                              backend=backend, layout=layout)
    return out.reshape(hq, b, s, -1).permute(1, 2, 0, 3).contiguous()


def _varlen(q, k, v, layout: DocLayout, scale: float):  # pragma: no cover - CUDA only, untested on GPU
    cu = layout.cu_seqlens.to(device=q.device, dtype=torch.int32)
    out, lse = varlen_attn(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), cu, cu,
                           layout.max_seqlen, layout.max_seqlen, return_aux=AuxRequest(lse=True), scale=scale,
                           window_size=(-1, 0), enable_gqa=q.shape[0] != k.shape[0])
    return out.transpose(0, 1), lse.float()


def _flex(q, k, v, q_index, q_start, k_index, scale: float):  # pragma: no cover - CUDA only, untested on GPU
    def mask_mod(b, h, qi, ki):
        return (q_start[qi] <= k_index[ki]) & (k_index[ki] <= q_index[qi])

    block_mask = create_block_mask(mask_mod, None, None, q.shape[1], k.shape[1], device=q.device)
    out, lse = torch.compile(flex_attention)(q[None], k[None], v[None], block_mask=block_mask, scale=scale,
                                             enable_gqa=q.shape[0] != k.shape[0], return_lse=True)
    return out[0], lse[0]
