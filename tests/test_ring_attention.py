"""Ring attention (loomtrain/parallel/context/ring.py): zig-zag sharding, and exactness of outputs and
q/k/v gradients against single-process full attention with packed-document causal masks.

The multi-process checks run real gloo ranks through torchrun (tests/ring_worker.py): one 2-rank
and one 4-rank launch, started together because process start-up dominates their time. The worker
writes max abs errors per case; the asserts live here so a failure names the case and rank.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from loomtrain.parallel.context import ring
from loomtrain.parallel.context.common import zigzag_indices
from loomtrain.parallel.context.ring import ring_attention
from ring_worker import SHORT, UNEVEN, WHOLE, doc_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5  # float32 ring vs float64 reference


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ring_runs(tmp_path_factory):
    """Launch the 2-rank and 4-rank workers concurrently; return {nproc: [per-rank results]}."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = {}
    for nproc in (2, 4):
        out_dir = tmp_path_factory.mktemp(f"ring{nproc}")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
               os.path.join(ROOT, "tests", "ring_worker.py"), str(out_dir)]
        procs[nproc] = (out_dir, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                                  stderr=subprocess.STDOUT, text=True))
    results = {}
    for nproc, (out_dir, proc) in procs.items():
        log, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"{nproc}-rank ring worker failed ({proc.returncode}):\n{log[-8000:]}"
        results[nproc] = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(nproc)]
    return results


@pytest.mark.parametrize("nproc,case", [
    (2, "uneven_cp2"), (2, "noncausal_cp2"),
    (4, "uneven_cp4"), (4, "noncausal_cp4"), (4, "short_docs_cp4"), (4, "one_doc_cp4"),
    (4, "uneven_cp2_subgroup"),
])
def test_ring_matches_full_attention(ring_runs, nproc, case):
    for rank, res in enumerate(ring_runs[nproc]):
        r = res[case]
        assert r["finite"] and r["dtype"] == "torch.float32", (case, rank, r)
        for name in ("out", "dq", "dk", "dv"):
            assert r[name] <= TOL, f"{case} rank {rank}: {name} max abs error {r[name]:.3g} > {TOL}"


def _visible_blocks(rows, cp: int, rank: int) -> int:
    """How many of the cp KV blocks any of `rank`'s queries can see (causal document mask)."""
    doc, pos = doc_layout(rows)
    seq = doc.shape[1]
    mask = (doc[:, :, None] == doc[:, None, :]) & (pos[:, None, :] <= pos[:, :, None])
    mine = zigzag_indices(seq, cp, rank)
    return sum(bool(mask[:, mine][:, :, zigzag_indices(seq, cp, j)].any()) for j in range(cp))


def test_ring_skips_masked_blocks_and_balances_work(ring_runs):
    # Fully masked blocks are skipped in forward and backward; with 3-token documents that never
    # cross a chunk, only a rank's own block is computed.
    for rank, res in enumerate(ring_runs[4]):
        for case, rows in (("uneven_cp4", UNEVEN), ("short_docs_cp4", SHORT), ("one_doc_cp4", WHOLE)):
            want = _visible_blocks(rows, 4, rank)
            assert res[case]["fwd"] == res[case]["bwd"] == want, (case, rank, res[case], want)
        assert res["short_docs_cp4"]["fwd"] == 1
    # One causal document: each rank multiplies its own s x s block plus, from every other rank,
    # only the half of queries or keys that can see each other (cp-1 blocks of s x s/2), so the
    # zig-zag shards do equal work.
    s = 48 // 4
    areas = [res["one_doc_cp4"]["area"] for res in ring_runs[4]]
    assert areas == [s * s + 3 * s * s // 2] * 4, areas


def test_zigzag_indices_partition_and_balance():
    seq = 96
    for cp in (1, 2, 3, 4, 8):
        shards = [zigzag_indices(seq, cp, r) for r in range(cp)]
        assert all(len(s) == seq // cp for s in shards)
        every = torch.cat(shards)
        assert torch.equal(every.sort().values, torch.arange(seq)), f"cp={cp}: not a disjoint cover"
        # Causal work of a rank = number of (query, key <= query) pairs = sum over its positions of
        # (pos + 1); zig-zag makes it identical on every rank.
        work = {int((s + 1).sum()) for s in shards}
        assert len(work) == 1, f"cp={cp}: unbalanced causal work {work}"
    chunk = seq // 8
    assert torch.equal(zigzag_indices(seq, 4, 1),
                       torch.cat([torch.arange(chunk, 2 * chunk), torch.arange(6 * chunk, 7 * chunk)]))


def test_zigzag_indices_rejects_bad_lengths():
    with pytest.raises(ValueError, match=r"multiple of 2\*cp = 8"):
        zigzag_indices(60, 4, 0)
    with pytest.raises(ValueError, match="outside"):
        zigzag_indices(64, 4, 4)


def _reference(q, k, v, doc, pos, scale):
    mask = (doc[:, :, None] == doc[:, None, :]) & (pos[:, None, :] <= pos[:, :, None])
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                          attn_mask=mask[:, None], scale=scale)


def test_single_rank_gradcheck_and_bf16():
    # group=None: no communication; the custom backward checked numerically in float64.
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 10, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 10, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    doc = torch.tensor([[0, 0, 0, 1, 2, 2, 2, 2, 2, 2], [0] * 10])
    pos = torch.arange(10).expand(2, 10)
    fn = lambda q, k, v: ring_attention(q, k, v, doc, pos, group=None, scaling=0.4)  # noqa: E731
    assert (fn(q, k, v) - _reference(q, k, v, doc, pos, 0.4)).abs().max() < 1e-12
    assert torch.autograd.gradcheck(fn, (q, k, v))
    # bf16 inputs are computed in float32 and returned (with their gradients) in bf16.
    qb, kb, vb = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    out = ring_attention(qb, kb, vb, doc, pos, group=None, scaling=0.4)
    out.sum().backward()
    assert out.dtype == qb.grad.dtype == kb.grad.dtype == torch.bfloat16
    assert (out.double() - _reference(q, k, v, doc, pos, 0.4)).abs().max() < 3e-2


def test_rows_without_visible_keys_give_zero_not_nan():
    # Cannot happen under causal self-attention, but a fully masked row must stay finite.
    qg = torch.randn(1, 1, 1, 3, 4, requires_grad=False)
    k, v = torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
    mask = torch.ones(1, 3, 5, dtype=torch.bool)
    mask[:, 1] = False
    o, m, l = ring._block_forward(qg, k, v, mask, 0.5)
    acc = [torch.zeros_like(o), torch.full_like(m, float("-inf")), torch.zeros_like(l)]
    ring._merge(*acc, o, m, l)
    assert torch.isfinite(acc[0]).all() and acc[2][..., 1].item() == 0
    lse = torch.where(acc[2] > 0, acc[1] + acc[2].clamp_min(1e-30).log(), torch.full_like(l, float("inf")))
    grads = ring._block_backward(qg, k, v, torch.randn_like(qg), torch.zeros_like(l), lse, mask, 0.5)
    assert all(torch.isfinite(g).all() for g in grads)
    assert grads[0][..., 1, :].abs().max() == 0


def test_bad_shapes_are_rejected():
    q, k = torch.randn(1, 3, 8, 4), torch.randn(1, 2, 8, 4)
    doc = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        ring_attention(q, k, k, doc, doc, group=None, scaling=None)
    with pytest.raises(ValueError, match="integer tensor"):
        ring_attention(torch.randn(1, 2, 8, 4), k, k, doc.float(), doc, group=None, scaling=None)
