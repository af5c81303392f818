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
from ring_worker import SHORT, UNEVEN, WHOLE, doc_layout, ring_indices

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
    # A ring step whose KV block no query can see makes no kernel call, forward or backward; with
    # 3-token documents that never cross a chunk, only a rank's own block is computed.
    for rank, res in enumerate(ring_runs[4]):
        for case, rows in (("uneven_cp4", UNEVEN), ("short_docs_cp4", SHORT), ("one_doc_cp4", WHOLE)):
            want = _visible_blocks(rows, 4, rank)
            assert res[case]["fwd"] == res[case]["bwd"] == want, (case, rank, res[case], want)
        assert res["short_docs_cp4"]["fwd"] == 1
    # One causal document per row, kernel blocks of one zig-zag chunk: rank r's chunks r and 7-r
    # see (r+1) + (8-r) = 9 key chunks of the 16 around the ring, per row, on every rank: the
    # kernel skips the masked chunk pairs and zig-zag makes the work equal.
    pairs = [res["one_doc_cp4"]["pairs"] for res in ring_runs[4]]
    assert pairs == [2 * 9] * 4, pairs


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


def _single(q, k, v, rows, block=3):
    """ring_attention on one rank (group=None) in the HF layout [b, H, S, D]."""
    q_last, q_start, k_all = ring_indices(rows, 1, 0, True)
    b, hq, s, d = q.shape
    flat = lambda t: t.transpose(0, 1).reshape(t.shape[1], b * s, d)  # noqa: E731
    out = ring_attention(flat(q), flat(k), flat(v), q_index=q_last, q_start=q_start, k_index_all=k_all,
                         group=None, scaling=0.4, block=block)
    return out.reshape(hq, b, s, d).transpose(0, 1)


def test_single_rank_gradcheck_and_bf16():
    # group=None: no communication; the custom backward checked numerically in float64.
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 10, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 10, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    rows = [[3, 1, 6], [10]]
    doc, pos = doc_layout(rows)
    fn = lambda q, k, v: _single(q, k, v, rows)  # noqa: E731
    assert (fn(q, k, v) - _reference(q, k, v, doc, pos, 0.4)).abs().max() < 1e-12
    assert torch.autograd.gradcheck(fn, (q, k, v))
    # bf16 inputs are computed in float32 and returned (with their gradients) in bf16.
    qb, kb, vb = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    out = _single(qb, kb, vb, rows)
    out.sum().backward()
    assert out.dtype == qb.grad.dtype == kb.grad.dtype == torch.bfloat16
    assert (out.double() - _reference(q, k, v, doc, pos, 0.4)).abs().max() < 3e-2


def test_merge_keeps_rows_without_visible_keys_at_zero():
    # A row that has seen nothing on either side stays 0 / -inf, never NaN.
    out = torch.randn(1, 3, 4)
    lse = torch.tensor([[0.5, float("-inf"), 1.0]])
    acc_out, acc_lse = ring._merge(torch.zeros(1, 3, 4), torch.full((1, 3), float("-inf")), out, lse)
    assert torch.isfinite(acc_out).all() and acc_out[0, 1].abs().max() == 0
    assert torch.isinf(acc_lse[0, 1]) and torch.equal(acc_out[0, 0], out[0, 0])


def test_bad_shapes_are_rejected():
    q, k = torch.randn(3, 8, 4), torch.randn(2, 8, 4)
    idx = torch.arange(8)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        ring_attention(q, k, k, q_index=idx, q_start=idx, k_index_all=idx[None], group=None, scaling=None)
    with pytest.raises(ValueError, match="integer tensor"):
        ring_attention(torch.randn(2, 8, 4), k, k, q_index=idx.float(), q_start=idx, k_index_all=idx[None],
                       group=None, scaling=None)
