"""Validate the straggler/link statistics (`loomtrain.resilience.detect`) at scale by simulation.

Synthetic timing matrices for `--ranks` ranks (default 1,024): every rank has a small persistent
speed offset (chip-to-chip variation, sigma `--offset`), every step gets multiplicative noise
(sigma `--noise`) and, with probability `--spike-p`, a GC-like spike of +20..100% of a step. A rank
reports the lower quartile of its `--steps` per-step figures in a window, as `resilience.straggler` does.
Groups of `--group` ranks (a node's shard group) are probed every window: a probe is the min of 3
small all-reduces with lognormal jitter (sigma `--probe-noise`) and occasional spikes.

Scenarios, each over `--seeds` seeds:
  * one slow rank (10/20/30/50% slower): windows until it is reported, and that it is named;
  * one slow group link (10/20/30/50%) whose members compute normally: windows until the link is
    reported, and that no rank is named instead;
  * `--clean-windows` clean windows per seed: every report is a false positive.

    python benchmarks/straggler_sim.py --seeds 20 --clean-windows 5000
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from loomtrain.resilience.detect import DetectConfig, Detector


class Cluster:
    """One simulated job: `window(rng)` gives a window's (compute, probes)."""

    def __init__(self, args, rng, slow_rank=None, slow_factor=1.0, slow_group=None, link_factor=1.0):
        self.a = args
        self.offset = 1.0 + rng.normal(0.0, args.offset, args.ranks)
        self.factor = np.ones(args.ranks)
        if slow_rank is not None:
            self.factor[slow_rank] = slow_factor
        self.groups = [tuple(range(s, s + args.group)) for s in range(0, args.ranks, args.group)]
        self.link = np.ones(len(self.groups))
        if slow_group is not None:
            self.link[slow_group] = link_factor

    def window(self, rng):
        a = self.a
        steps = a.step_s * self.offset[:, None] * self.factor[:, None] * np.exp(
            rng.normal(0.0, a.noise, (a.ranks, a.steps)))
        spikes = rng.random((a.ranks, a.steps)) < a.spike_p
        steps = steps + spikes * rng.uniform(0.2, 1.0, (a.ranks, a.steps)) * a.step_s
        compute = np.sort(steps, axis=1)[:, (a.steps - 1) // 4]  # detect.low_quartile, vectorised
        reps = a.probe_s * self.link[:, None] * np.exp(rng.normal(0.0, a.probe_noise, (len(self.groups), 3)))
        reps = reps + (rng.random(reps.shape) < 0.02) * rng.uniform(1.0, 5.0, reps.shape) * a.probe_s
        return compute, reps.min(axis=1)


def windows_to_report(args, rng, cluster, want, limit=30):
    """Windows until the first report, and whether it was the wanted one (kind, key)."""
    det = Detector(groups=cluster.groups, cfg=DetectConfig())
    for w in range(1, limit + 1):
        compute, probes = cluster.window(rng)
        for f in det.update(compute, probes):
            key = f.rank if f.kind == "straggler" else f.group
            return w, (f.kind, key) == want
    return None, False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=1024)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--clean-windows", type=int, default=5000)
    p.add_argument("--steps", type=int, default=8, help="steps per window")
    p.add_argument("--step-s", type=float, default=0.5)
    p.add_argument("--noise", type=float, default=0.02)
    p.add_argument("--offset", type=float, default=0.005)
    p.add_argument("--spike-p", type=float, default=0.02)
    p.add_argument("--probe-s", type=float, default=0.002)
    p.add_argument("--probe-noise", type=float, default=0.05)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    ok = True
    print(f"{args.ranks} ranks, groups of {args.group}, {args.steps} steps/window, noise {args.noise:.0%}, "
          f"spikes p={args.spike_p} per step, {args.seeds} seeds")
    for kind in ("straggler", "link"):
        for slow in (0.10, 0.15, 0.20, 0.30, 0.50):
            found, right = [], 0
            for seed in range(args.seeds):
                rng = np.random.default_rng(1000 * seed + int(slow * 100) + (7 if kind == "link" else 0))
                if kind == "straggler":
                    target = int(rng.integers(args.ranks))
                    cluster = Cluster(args, rng, slow_rank=target, slow_factor=1 + slow)
                    want = ("straggler", target)
                else:
                    target = int(rng.integers(args.ranks // args.group))
                    cluster = Cluster(args, rng, slow_group=target, link_factor=1 + slow)
                    want = ("link", cluster.groups[target])
                w, good = windows_to_report(args, rng, cluster, want)
                found.append(w if w is not None else float("inf"))
                right += good
            arr = np.array(found, dtype=float)
            fin = arr[np.isfinite(arr)]
            within3 = int(np.sum(arr <= 3))
            med = float(np.median(arr)) if fin.size else float("inf")
            print(f"{kind:9s} {slow:4.0%} slower: reported in {fin.size}/{args.seeds} seeds, named right "
                  f"{right}/{args.seeds}, within 3 windows {within3}/{args.seeds}, median {med:.0f}, "
                  f"max {arr.max():.0f} windows")
            # a rank exactly at the threshold (10%) measures 10% +- noise: reported, but not always
            # within 3 windows; from 15% on every seed must be
            if kind == "straggler" and slow >= 0.15 and (within3 < args.seeds or right < args.seeds):
                ok = False
    false_pos = 0
    total = 0
    for seed in range(args.seeds):
        rng = np.random.default_rng(99991 + seed)
        cluster = Cluster(args, rng)
        det = Detector(groups=cluster.groups, cfg=DetectConfig())
        for _ in range(args.clean_windows):
            compute, probes = cluster.window(rng)
            false_pos += len(det.update(compute, probes))
            total += 1
    print(f"clean: {false_pos} false positives in {total} windows "
          f"({false_pos / total:.4%} per window); {time.perf_counter() - t0:.1f} s")
    ok = ok and false_pos / total < 0.001
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
