"""torchrun worker for tests/test_ring_attention.py: checks ring attention against full attention.

Every rank builds the same random problem from a seed, keeps its zig-zag shard, runs
`ring_attention` in float32 on a process group that is passed in (never the default group
implicitly), gathers outputs and gradients over that group, and compares them with a float64
single-process reference (SDPA with the block-diagonal causal document mask). Results go to
OUT_DIR/rank{R}.json as maximum absolute errors, so the test process does the asserting and a
failure names the case. Many checks share one launch because start-up dominates test time.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from loomtrain.kernels.blockplan import layout_from_position_ids
from loomtrain.parallel.context.common import zigzag_indices
from loomtrain.parallel.context.ring import ring_attention

HQ, HKV, D, SCALE = 4, 2, 8, 0.31
# Document lengths per batch row (each sums to 48, divisible by 2*cp for cp = 2 and 4): a document
# of length 1, documents crossing chunk and rank boundaries, uneven lengths.
UNEVEN = [[1, 11, 17, 3, 16], [7, 1, 30, 10]]
# 16 documents of 3 tokens: with cp=4 (chunks of 6) no document crosses a chunk, so every block
# from another rank is fully masked and must be skipped.
SHORT = [[3] * 16]
# One document per row: plain causal attention, where zig-zag must give every rank the same work.
WHOLE = [[48], [48]]


def doc_layout(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Document ids and global positions [b, seq] of packed rows with the given document lengths."""
    docs = [torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows]
    doc = torch.stack(docs)
    return doc, torch.arange(doc.shape[1]).expand_as(doc).contiguous()


def ring_indices(rows: list[list[int]], cp: int, rank: int, causal: bool):
    """(q_index, q_start, k_index_all) of `rank`'s zig-zag slice, batch rows flattened: the last
    visible key of a query is itself (causal) or its document's last token (bidirectional)."""
    pos = torch.stack([torch.cat([torch.arange(n) for n in r]) for r in rows])
    b, seq = pos.shape
    layout = layout_from_position_ids(pos)
    rows_off = torch.arange(b)[:, None] * seq
    k_all = torch.stack([(rows_off + zigzag_indices(seq, cp, r)[None]).reshape(-1) for r in range(cp)])
    q_index = k_all[rank]
    last = q_index
    if not causal:
        doc = torch.searchsorted(layout.cu_seqlens, q_index, right=True) - 1
        last = layout.cu_seqlens[doc + 1] - 1
    return last, layout.start[q_index], k_all


def block_for(seq: int, cp: int) -> int:
    """Kernel block = one zig-zag chunk, so block pairs line up with chunks."""
    return seq // (2 * cp)


def flat(t: torch.Tensor) -> torch.Tensor:
    """[b, h, s, d] -> [h, b*s, d] (rows laid end to end, as the kernel takes them)."""
    return t.transpose(0, 1).reshape(t.shape[1], -1, t.shape[-1])


def reference(q, k, v, doc, pos, dout, causal):
    """Float64 full attention with the document (and causal) mask; returns output and q/k/v grads."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    mask = doc[:, :, None] == doc[:, None, :]
    if causal:
        mask &= pos[:, None, :] <= pos[:, :, None]
    g = HQ // HKV
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                         attn_mask=mask[:, None], scale=SCALE)
    out.backward(dout.double())
    return out.detach(), q.grad, k.grad, v.grad


def gather_seq(local: torch.Tensor, group, cp: int, seq: int) -> torch.Tensor:
    """Reassemble a zig-zag sharded [b, h, s_local, d] tensor into [b, h, seq, d]."""
    parts = [torch.empty_like(local) for _ in range(cp)]
    dist.all_gather(parts, local.contiguous(), group=group)
    full = local.new_empty(local.shape[0], local.shape[1], seq, local.shape[3])
    for r, part in enumerate(parts):
        full[:, :, zigzag_indices(seq, cp, r)] = part
    return full


def run_case(rows, group, seed: int, causal: bool = True) -> dict:
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    doc, pos = doc_layout(rows)
    b, seq = doc.shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, seq, D, generator=gen) for h in (HQ, HKV, HKV))
    dout = torch.randn(b, HQ, seq, D, generator=gen)
    ref = reference(q, k, v, doc, pos, dout, causal)

    idx = zigzag_indices(seq, cp, rank)
    ql, kl, vl = (flat(t[:, :, idx]).clone().requires_grad_() for t in (q, k, v))
    q_last, q_start, k_all = ring_indices(rows, cp, rank, causal)
    counts = {"fwd": 0, "bwd": 0, "pairs": 0}  # ring steps computed; kernel block pairs computed
    out = ring_attention(ql, kl, vl, q_index=q_last, q_start=q_start, k_index_all=k_all, group=group,
                         scaling=SCALE, block=block_for(seq, cp), counts=counts)
    out.backward(flat(dout[:, :, idx]))
    unflat = lambda t: t.reshape(t.shape[0], b, -1, t.shape[-1]).transpose(0, 1)  # noqa: E731
    got = [gather_seq(unflat(t), group, cp, seq) for t in (out.detach(), ql.grad, kl.grad, vl.grad)]
    errs = {name: (g.double() - r).abs().max().item() for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref)}
    finite = all(bool(torch.isfinite(g).all()) for g in got)
    return {"cp": cp, **errs, "finite": finite, "dtype": str(out.dtype), **counts}


def main() -> None:
    out_dir = sys.argv[1]
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.set_num_threads(1)
    whole = dist.new_group(list(range(world)))  # passed explicitly, like a mesh's cp sub-group
    results = {
        f"uneven_cp{world}": run_case(UNEVEN, whole, seed=1),
        f"noncausal_cp{world}": run_case(UNEVEN, whole, seed=2, causal=False),
    }
    if world == 4:
        results["short_docs_cp4"] = run_case(SHORT, whole, seed=3)
        results["one_doc_cp4"] = run_case(WHOLE, whole, seed=4)
        # Two disjoint cp=2 rings, {0,1} and {2,3}, side by side with different data: the ring must
        # address peers within its group, not by global rank.
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        results["uneven_cp2_subgroup"] = run_case(UNEVEN, pairs[rank // 2], seed=10 + rank // 2)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
        json.dump(results, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
