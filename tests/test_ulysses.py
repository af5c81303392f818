"""Ulysses attention (loomtrain/parallel/context/ulysses.py): all-to-all to head shards, then the
memory-linear packed kernel over the whole sequence, checked on 4 real gloo ranks (cp4 and two
side-by-side cp2 sub-groups) against float64 full attention, outputs and q/k/v gradients."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness import free_port
from loomtrain.parallel.context.ulysses import _kv_repeats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


@pytest.fixture(scope="module")
def ulysses_runs(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ulysses")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", os.path.join(ROOT, "tests", "ulysses_worker.py"), str(out_dir)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"ulysses worker failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-8000:]}"
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(4)]


@pytest.mark.parametrize("case", ["gqa_cp4_repeat", "mqa_cp4", "gqa_cp2_subgroup"])
def test_ulysses_matches_full_attention(ulysses_runs, case):
    for rank, res in enumerate(ulysses_runs):
        r = res[case]
        assert r["dtype"] == "torch.float32" and r["cached_equal"], (case, rank, r)
        for name in ("out", "dq", "dk", "dv"):
            assert r[name] <= TOL, f"{case} rank {rank}: {name} max abs error {r[name]:.3g} > {TOL}"


def test_kv_heads_are_repeated_only_as_far_as_the_scatter_needs():
    assert _kv_repeats(8, 4, 2) == 1  # enough KV heads: none repeated
    assert _kv_repeats(8, 2, 4) == 2  # 2 KV heads over 4 ranks: 4 copies in all, not 8
    assert _kv_repeats(4, 1, 4) == 4  # MQA: one copy per rank
    assert _kv_repeats(12, 2, 3) == 3  # 6 KV heads over 3 ranks, not 12
