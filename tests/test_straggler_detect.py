"""The straggler/link statistics of `loomtrain.resilience.detect` on synthetic windows: pure and
fast (no processes). The multi-process behaviour is in tests/test_resilience.py; the 1,024-rank
figures come from benchmarks/straggler_sim.py, which is run here at a small size too."""
from __future__ import annotations

import importlib.util
import math
import pathlib

import numpy as np

from loomtrain.resilience.detect import DetectConfig, Detector, outliers

GROUPS_2X2 = [(0, 1), (2, 3), (0, 2), (1, 3)]


def _noisy(rng, n, base=0.05, sigma=0.02):
    return base * np.exp(rng.normal(0.0, sigma, n))


def test_slow_rank_of_four_is_named_in_three_windows():
    rng = np.random.default_rng(0)
    det = Detector(groups=GROUPS_2X2)
    reports = []
    for window in range(1, 6):
        compute = _noisy(rng, 4)
        compute[2] *= 1.3
        reports += [(window, f) for f in det.update(compute, _noisy(rng, 4, base=0.002))]
    assert len(reports) == 1, reports
    window, finding = reports[0]
    assert window == 3 and finding.kind == "straggler" and finding.rank == 2, reports
    assert 0.2 < finding.slowdown < 0.4 and finding.z > 3.5 and finding.windows == 3
    assert "compute" in finding.evidence() and "z" in finding.evidence()


def test_clean_windows_report_nothing():
    rng = np.random.default_rng(1)
    for n in (3, 4, 8, 64):
        det = Detector(groups=[tuple(range(i, i + 2)) for i in range(0, n - 1, 2)])
        for _ in range(500):
            assert det.update(_noisy(rng, n, sigma=0.015), _noisy(rng, len(det.groups), 0.002, 0.03)) == []


def test_transient_slowness_is_not_reported():
    """Flagged in 2 of every 5 windows (a GC storm, a checkpoint): never persistent."""
    det = Detector()
    for window in range(40):
        compute = [0.05, 0.05, 0.0501, 0.0499]
        if window % 5 in (0, 2):
            compute[1] = 0.08
        assert det.update(compute) == []


def test_slow_group_is_the_link_not_a_rank():
    rng = np.random.default_rng(2)
    det = Detector(groups=GROUPS_2X2)
    found = []
    for _ in range(5):
        probes = _noisy(rng, 4, base=0.002, sigma=0.03)
        probes[1] += 0.02  # group (2, 3)
        found += det.update(_noisy(rng, 4), probes)
    assert [(f.kind, f.group, f.rank) for f in found] == [("link", (2, 3), None)]
    assert found[0].slowdown > 5


def test_slow_member_is_a_straggler_not_a_link():
    """A rank that computes slowly makes its groups' probes late too: it is named, not the link."""
    det = Detector(groups=GROUPS_2X2)
    found = []
    for _ in range(5):
        found += det.update([0.05, 0.05, 0.07, 0.05], [0.002, 0.01, 0.01, 0.002])
    assert [(f.kind, f.rank) for f in found] == [("straggler", 2)]


def test_pipeline_stages_are_compared_within_themselves():
    """Stage 0 (embeddings) does more work than stage 1 by design: no rank of it is a straggler;
    a slow rank is found among its own stage's peers."""
    stage0, stage1 = [0.08] * 4, [0.05] * 4
    det = Detector(cohorts=[(0, 1, 2, 3), (4, 5, 6, 7)])
    assert all(det.update(stage0 + stage1) == [] for _ in range(6))
    slow = stage0 + [0.05, 0.05, 0.065, 0.05]
    found = [f for _ in range(3) for f in det.update(slow)]
    assert [(f.kind, f.rank) for f in found] == [("straggler", 6)]
    assert Detector().flags(stage0 + stage1)[0] != {}  # without cohorts stage 0 would be flagged


def test_floor_mad_floor_and_absent_ranks():
    cfg = DetectConfig()
    # identical peers (MAD 0): 8% slower is below the slowdown threshold (10%), 12% is above
    assert outliers([1.0, 1.0, 1.0, 1.08], z=cfg.z, min_slowdown=cfg.min_slowdown, floor=cfg.floor_s,
                    mad_floor=cfg.mad_floor) == {}
    flagged = outliers([1.0, 1.0, 1.0, 1.12], z=cfg.z, min_slowdown=cfg.min_slowdown, floor=cfg.floor_s,
                       mad_floor=cfg.mad_floor)
    assert list(flagged) == [3] and math.isclose(flagged[3].slowdown, 0.12, rel_tol=1e-9)
    # 50% slower but only 50 microseconds: under the absolute floor
    assert outliers([1e-4, 1e-4, 1e-4, 1.5e-4], z=cfg.z, min_slowdown=cfg.min_slowdown, floor=cfg.floor_s,
                    mad_floor=cfg.mad_floor) == {}
    # NaN = a rank that did no work this window; two present ranks have too few peers
    assert outliers([float("nan"), 1.0, 1.5], z=cfg.z, min_slowdown=cfg.min_slowdown, floor=cfg.floor_s,
                    mad_floor=cfg.mad_floor) == {}
    flagged = outliers([float("nan"), 1.0, 1.0, 1.0, 1.5], z=cfg.z, min_slowdown=cfg.min_slowdown,
                       floor=cfg.floor_s, mad_floor=cfg.mad_floor)
    assert list(flagged) == [4]


def test_reported_once_and_again_after_recovery():
    det = Detector()
    slow, clean = [0.05, 0.05, 0.05, 0.08], [0.05, 0.05, 0.05, 0.05]
    seq = [slow] * 8 + [clean] * 5 + [slow] * 3
    counts = [len(det.update(c)) for c in seq]
    assert counts == [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]


def test_simulation_small():
    """benchmarks/straggler_sim.py at 256 ranks: every slow rank in 3 windows, no false positive."""
    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "straggler_sim.py"
    spec = importlib.util.spec_from_file_location("straggler_sim", path)
    sim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sim)
    assert sim.main(["--ranks", "256", "--seeds", "3", "--clean-windows", "300"]) == 0
