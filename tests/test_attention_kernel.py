"""The blockwise packed attention kernel against a float64 dense reference: outputs, log-sum-exp
and every gradient to 1e-5 in float32, for odd document lengths, one-token documents, GQA / MQA,
block sizes that do not divide the sequence, rows that see no key, and ring-style key pieces
merged by log-sum-exp."""
from __future__ import annotations

import pytest
import torch

from loomtrain.kernels.attention import attend_bhsd, packed_attention
from loomtrain.kernels.blockplan import LayoutCache, index_from_runs, layout_from_position_ids, plan_blocks
from loomtrain.kernels.blockwise import blockwise_backward, blockwise_forward

TOL = 1e-5


def positions_for(lengths, rows=1):
    """[rows, sum(lengths)] position ids restarting at each document."""
    row = torch.cat([torch.arange(n) for n in lengths])
    return row.expand(rows, -1).clone()


def reference(q, k, v, q_index, q_start, k_index, scale):
    """Dense float64 attention with the interval mask; rows seeing nothing: out 0, lse -inf."""
    q, k, v = (t.double() for t in (q, k, v))
    g = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
    s = q @ k.transpose(-1, -2) * scale
    vis = (k_index[None, :] >= q_start[:, None]) & (k_index[None, :] <= q_index[:, None])
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None]).masked_fill(~vis, 0.0)
    return p @ v, lse


def check(q, k, v, q_index, q_start, k_index, block):
    scale = q.shape[-1] ** -0.5
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = packed_attention(*leaves, q_index=q_index, q_start=q_start, k_index=k_index, scale=scale,
                                block_q=block, block_k=block, backend="blockwise")
    dout = torch.randn_like(out)
    (out * dout).sum().backward()
    ref_leaves = [t.double().clone().requires_grad_(True) for t in (q, k, v)]
    ref_out, ref_lse = reference(*ref_leaves, q_index, q_start, k_index, scale)
    (ref_out * dout.double()).sum().backward()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, atol=TOL, rtol=TOL)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = ~torch.isinf(ref_lse)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=TOL, rtol=TOL)
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("block", [5, 16, 128])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
def test_matches_float64_reference(block, heads):
    torch.manual_seed(block * 10 + heads[1])
    lengths = [1, 7, 1, 1, 33, 13, 2, 1, 61, 9]  # odd, one-token, and not a multiple of any block
    layout = layout_from_position_ids(positions_for(lengths, rows=2))
    t = layout.index.numel()
    q = torch.randn(heads[0], t, 8)
    k, v = torch.randn(heads[1], t, 8), torch.randn(heads[1], t, 8)
    check(q, k, v, layout.index, layout.start, layout.index, block)


def test_zigzag_slices_and_rows_that_see_nothing():
    """Queries and keys as runs of global indices (a zig-zag slice against another rank's slice):
    queries earlier than every visible key come out 0 / -inf with zero gradient."""
    torch.manual_seed(3)
    layout = layout_from_position_ids(positions_for([5, 19, 1, 23, 8]))  # 56 tokens, cp=2 -> chunks of 14
    q_idx = index_from_runs([(0, 14), (42, 56)])
    k_idx = index_from_runs([(14, 28), (28, 42)])
    q_start = layout.start[q_idx]
    q, k, v = torch.randn(4, 28, 8), torch.randn(2, 28, 8), torch.randn(2, 28, 8)
    for block in (5, 16):
        check(q, k, v, q_idx, q_start, k_idx, block)
    _, lse = packed_attention(q, k, v, q_index=q_idx, q_start=q_start, k_index=k_idx, backend="blockwise")
    assert torch.isinf(lse[:, :14]).all()


def test_pieces_merge_by_lse_and_backward_from_final_lse():
    """Attention over keys split in two pieces, merged by lse, equals attention over all keys;
    each piece's backward from the merged output and lse sums to the whole gradient (ring attention)."""
    torch.manual_seed(4)
    layout = layout_from_position_ids(positions_for([3, 40, 1, 20]))
    idx, start = layout.index, layout.start
    q, k, v = torch.randn(4, 64, 8), torch.randn(2, 64, 8), torch.randn(2, 64, 8)
    scale = 8 ** -0.5
    whole_plan = plan_blocks(idx, start, idx, 16, 16)
    out, lse = blockwise_forward(q, k, v, idx, start, idx, scale, whole_plan)
    pieces = [(0, 30), (30, 64)]
    outs, lses = [], []
    for a, b in pieces:
        kidx = idx[a:b]
        o, l = blockwise_forward(q, k[:, a:b], v[:, a:b], idx, start, kidx, scale, plan_blocks(idx, start, kidx, 16, 16))
        outs.append(o)
        lses.append(l)
    merged_lse = torch.logaddexp(lses[0], lses[1])
    w = [torch.exp(l - merged_lse.masked_fill(torch.isinf(merged_lse), 0.0)).nan_to_num(0.0) for l in lses]
    merged = outs[0] * w[0][..., None] + outs[1] * w[1][..., None]
    torch.testing.assert_close(merged, out, atol=TOL, rtol=TOL)
    torch.testing.assert_close(merged_lse, lse, atol=TOL, rtol=TOL)
    dout = torch.randn_like(out)
    dq, dk, dv = blockwise_backward(q, k, v, out, lse, dout, idx, start, idx, scale, whole_plan)
    dq_sum = torch.zeros_like(dq)
    for a, b in pieces:
        kidx = idx[a:b]
        pq, pk, pv = blockwise_backward(q, k[:, a:b], v[:, a:b], out, lse, dout, idx, start, kidx, scale,
                                        plan_blocks(idx, start, kidx, 16, 16))
        dq_sum += pq
        torch.testing.assert_close(pk, dk[:, a:b], atol=TOL, rtol=TOL)
        torch.testing.assert_close(pv, dv[:, a:b], atol=TOL, rtol=TOL)
    torch.testing.assert_close(dq_sum, dq, atol=TOL, rtol=TOL)


def test_plan_skips_other_documents_and_the_future():
    layout = layout_from_position_ids(positions_for([64, 64, 64, 64]))
    plan = plan_blocks(layout.index, layout.start, layout.index, 32, 32)
    # 4 documents of 2 blocks each: per document 3 causal pairs (one full, two diagonal)
    assert plan.pairs == 12 and plan.skipped == 64 - 12
    assert sum(1 for _, _, keys in plan.rows for *_, masked in keys if not masked) == 4


def test_layout_cu_seqlens_and_cache():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [5, 6, 0, 1, 2, 3]])
    layout = layout_from_position_ids(pos)
    assert layout.cu_seqlens.tolist() == [0, 3, 5, 6, 8, 12]
    assert layout.max_seqlen == 4
    assert layout.start.tolist() == [0, 0, 0, 3, 3, 5, 6, 6, 8, 8, 8, 8]
    cache = LayoutCache()
    assert cache.get(pos) is cache.get(pos)
    pos[0, 0] = 7  # changed in place: the version moves, so the layout is derived again
    assert cache.get(pos).cu_seqlens.tolist() != layout.cu_seqlens.tolist()


def test_hf_layout_matches_sdpa_with_document_mask():
    """attend_bhsd on [b, H, S, D] equals SDPA with the dense document mask (float64)."""
    torch.manual_seed(5)
    pos = torch.cat([positions_for([9, 1, 22]), positions_for([17, 15])])
    layout = layout_from_position_ids(pos)
    q, k, v = torch.randn(2, 4, 32, 8).double(), torch.randn(2, 2, 32, 8).double(), torch.randn(2, 2, 32, 8).double()
    out = attend_bhsd(q, k, v, layout, None, block=7)
    doc = (pos == 0).long().cumsum(1)
    mask = (doc[:, :, None] == doc[:, None, :]) & torch.ones(32, 32, dtype=torch.bool).tril()
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-10, rtol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA backends need a GPU")
@pytest.mark.parametrize("backend", ["varlen", "flex"])
def test_cuda_backends_match_blockwise(backend):  # pragma: no cover - no GPU here
    torch.manual_seed(6)
    layout = layout_from_position_ids(positions_for([100, 1, 413, 7], rows=2).cuda())
    t = layout.index.numel()
    q, k, v = (torch.randn(h, t, 64, device="cuda", dtype=torch.bfloat16) for h in (8, 2, 2))
    want, want_lse = packed_attention(q.float(), k.float(), v.float(), q_index=layout.index, q_start=layout.start,
                                      k_index=layout.index, backend="blockwise")
    got, got_lse = packed_attention(q, k, v, q_index=layout.index, q_start=layout.start, k_index=layout.index,
                                    backend=backend, layout=layout)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got_lse.float(), want_lse, atol=2e-2, rtol=2e-2)


def test_autocast_keeps_float32_scores():
    """Under bf16 autocast the kernel still computes in float32: same result as without autocast."""
    torch.manual_seed(7)
    layout = layout_from_position_ids(positions_for([13, 1, 30]))
    q, k, v = torch.randn(4, 44, 8), torch.randn(2, 44, 8), torch.randn(2, 44, 8)
    args = dict(q_index=layout.index, q_start=layout.start, k_index=layout.index, block_q=16, block_k=16)
    plain, _ = packed_attention(q, k, v, **args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, _ = packed_attention(q, k, v, **args)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain, atol=0, rtol=0)
