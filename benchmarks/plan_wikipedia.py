"""Heterogeneous SP planner on the Wikipedia length distribution: predicted speedups and latency.

    python benchmarks/plan_wikipedia.py [--lengths PATH] [--batches K] [--seed S] [--sweep N]

Runs `loomtrain plan` (in process) for 64 GPUs at 256K context -- the issue's goal: the
heterogeneous plan >= 1.5x faster than static SP and never slower than the best single degree --
then 32 and 128 GPUs at 128K, two cost-model variations of the main case (faster inter-node
links; full activation recomputation, which makes static SP fit inside one node), and the
planner's latency on 1,024-sequence batches for 64 ranks (goal < 100 ms). Times are the cost
model's predictions for 8-GPU H100 nodes (see `loomtrain/parallel/hetero/costmodel.py`), not
measurements; the latency is measured here, on whatever CPU runs this.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from loomtrain.launch.plan_command import add_arguments, simulate  # noqa: E402

DATA = os.path.join(os.path.dirname(HERE), "..", "shared", "data", "lengths-wikipedia.txt")
CASES = [  # (label, gpus, context, extra flags)
    ("64 GPUs, 256K (goal)", 64, 262144, []),
    ("32 GPUs, 128K", 32, 131072, []),
    ("128 GPUs, 128K", 128, 131072, []),
    ("64 GPUs, 256K, inter-node 50 GB/s", 64, 262144, ["--coeffs", '{"inter_bw": 50e9}']),
    ("64 GPUs, 256K, full recompute", 64, 262144, ["--coeffs", '{"recompute": true}']),
    ("latency: 1,024 seqs, 64 GPUs, 256K", 64, 262144, ["--batch-size", "1024"]),
]


def run_case(lengths: str, gpus: int, context: int, extra: list[str], batches: int, seed: int) -> dict:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ns = parser.parse_args(["--lengths", lengths, "--gpus", str(gpus), "--context-len", str(context),
                            "--batches", str(batches), "--seed", str(seed), *extra])
    return simulate(ns)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default=os.path.normpath(DATA))
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sweep", type=int, default=0, metavar="N",
                    help="also rerun the goal case with seeds 1..N (the spread of the sampling)")
    args = ap.parse_args()
    header = (f"{'case':<38}{'cap/GPU':>8}{'static d':>9}{'seqs':>6}{'static s':>9}{'1-deg s':>8}"
              f"{'hetero s':>9}{'vs static':>10}{'vs 1-deg':>9}{'hetero won':>11}{'plan ms':>8}{'cpu ms':>7}")
    print(f"lengths: {args.lengths}; {args.batches} batches per case, seed {args.seed}")
    print(header)
    results = {}
    for label, gpus, context, extra in CASES:
        r = run_case(args.lengths, gpus, context, extra, args.batches, args.seed)
        results[label] = r
        t = r["step_time_s"]
        print(f"{label:<38}{r['capacity']:>8,}{r['static_degree']:>9}{r['mean_sequences_per_batch']:>6.0f}"
              f"{t['static']:>9.3f}{t['best_homogeneous']:>8.3f}{t['hetero']:>9.3f}"
              f"{r['speedup_vs_static']:>9.2f}x{r['speedup_vs_best_homogeneous']:>8.2f}x"
              f"{r['hetero_chosen']:>6}/{r['batches']:<4}{r['planner_ms_per_batch']:>8.1f}"
              f"{r['planner_cpu_ms_per_batch']:>7.1f}", flush=True)
    goal = results[CASES[0][0]]
    latency = results[CASES[-1][0]]
    checks = [
        ("hetero >= 1.5x static SP (64 GPUs, 256K)", goal["speedup_vs_static"] >= 1.5,
         f"{goal['speedup_vs_static']:.3f}x"),
        ("hetero never slower than the best single degree (every case)",
         all(r["speedup_vs_best_homogeneous"] >= 1.0 for r in results.values()),
         ", ".join(f"{r['speedup_vs_best_homogeneous']:.3f}x" for r in results.values())),
        ("planner < 100 ms per 1,024-sequence batch on 64 ranks", latency["planner_ms_per_batch"] < 100,
         f"{latency['planner_ms_per_batch']:.1f} ms wall (max {latency['planner_ms_max']:.1f}),"
         f" {latency['planner_cpu_ms_per_batch']:.1f} ms CPU"),
    ]
    for name, ok, value in checks:
        print(f"{'PASS' if ok else 'MISS'}  {name}: {value}")
    if args.sweep:
        label, gpus, context, extra = CASES[0]
        runs = [goal] + [run_case(args.lengths, gpus, context, extra, args.batches, s)
                         for s in range(1, args.sweep + 1)]
        vs_static = sorted(r["speedup_vs_static"] for r in runs)
        vs_one = sorted(r["speedup_vs_best_homogeneous"] for r in runs)
        print(f"{label}, seeds 0..{args.sweep}: vs static {', '.join(f'{v:.3f}' for v in vs_static)}"
              f" (median {vs_static[len(runs) // 2]:.3f}); vs best single degree "
              f"{vs_one[0]:.3f}..{vs_one[-1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
