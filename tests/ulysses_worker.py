"""torchrun worker for tests/test_ulysses.py: Ulysses attention (all-to-all, then the packed kernel)
against float64 full attention with the packed-document causal mask, on a group passed in.

Each rank holds a contiguous slice of every row, calls the HF attention function with its global
position ids, gathers outputs and q/k/v gradients over the group and writes max abs errors to
OUT_DIR/rank{R}.json, so the test process asserts and a failure names the case.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from loomtrain.kernels.hf import share_layout_cache
from loomtrain.parallel.context.common import GROUP_ATTR
from loomtrain.parallel.context.ulysses import ulysses_attention

D, SCALE = 8, 0.29
UNEVEN = [[1, 11, 17, 3, 16], [7, 1, 30, 10]]  # 48 tokens per row


class FakeAttention(nn.Module):
    """Stands in for an HF attention module: the attributes the attention function reads."""

    def __init__(self, group) -> None:
        super().__init__()
        setattr(self, GROUP_ATTR, group)


def reference(q, k, v, pos, dout):
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    doc = (pos == 0).long().cumsum(1)
    seq = pos.shape[1]
    mask = (doc[:, :, None] == doc[:, None, :]) & torch.ones(seq, seq, dtype=torch.bool).tril()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=SCALE, enable_gqa=True)
    out.backward(dout.double())
    return out.detach().transpose(1, 2), q.grad, k.grad, v.grad


def gather_seq(local: torch.Tensor, group, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def run_case(group, hq: int, hkv: int, seed: int) -> dict:
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    pos = torch.stack([torch.cat([torch.arange(n) for n in r]) for r in UNEVEN])
    b, seq = pos.shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, seq, D, generator=gen) for h in (hq, hkv, hkv))
    dout = torch.randn(b, seq, hq, D, generator=gen)  # HF layout of the output
    ref = reference(q, k, v, pos, dout.transpose(1, 2))
    part = slice(rank * seq // cp, (rank + 1) * seq // cp)
    ql, kl, vl = (t[:, :, part].clone().requires_grad_() for t in (q, k, v))
    module = FakeAttention(group)
    share_layout_cache(module)
    local_pos = pos[:, part].clone()
    out, _ = ulysses_attention(module, ql, kl, vl, None, scaling=SCALE, position_ids=local_pos)
    out.backward(dout[:, part])
    again, _ = ulysses_attention(module, ql, kl, vl, None, scaling=SCALE, position_ids=local_pos)  # cached layout
    got = [gather_seq(out.detach(), group, 1)] + [gather_seq(t.grad, group, 2) for t in (ql, kl, vl)]
    errs = {name: (g.double() - r).abs().max().item() for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref)}
    return {"cp": cp, **errs, "cached_equal": bool(torch.equal(again, out)), "dtype": str(out.dtype)}


def main() -> None:
    out_dir = sys.argv[1]
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.set_num_threads(1)
    whole = dist.new_group(list(range(world)))
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    results = {
        "gqa_cp4_repeat": run_case(whole, hq=8, hkv=2, seed=1),  # 2 KV heads over 4 ranks: repeated x2
        "mqa_cp4": run_case(whole, hq=4, hkv=1, seed=2),
        "gqa_cp2_subgroup": run_case(pairs[rank // 2], hq=4, hkv=2, seed=3 + rank // 2),
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
        json.dump(results, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
