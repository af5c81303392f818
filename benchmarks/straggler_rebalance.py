"""Step time with one slow rank: heterogeneous plans as planned (`report`) against plans with the
measured speed factors (`rebalance`), in the same launch.

    python benchmarks/straggler_rebalance.py [--nproc 4] [--slow-rank 2] [--slow-factor 1.5]
                                             [--steps 10] [--rounds 2] [--json PATH]

Relaunches itself under torchrun (gloo, CPU). Rank `--slow-rank` is slowed by the `fault.*` keys
(`slow_factor` 1.5: 50% more CPU work on top of each step's own). A first round measures every
rank's CPU seconds per unit of predicted work, as the straggler monitor does (`window_rate`), and
turns it into speed factors (`speed_factors`, relative to the median). Then rounds alternate, in
alternating order so that drift on the machine hits both: `report` (the planner's plans, speeds
all 1) and `rebalance` (the same factors the monitor would hand the scheduler). Step time is the
wall time of a step followed by a barrier (the slowest rank's), median per mode, first two steps of
each round left out. Also printed: the slow rank's predicted work share in each mode, and the
critical path: per step, the most CPU seconds any rank computed (median over steps). That is the
step time on hardware where every rank has its own core; the wall time is it only there. On a
machine with fewer free cores than ranks the processes share cores, the wall time follows the
total CPU work of all ranks, and moving work between ranks cannot shorten it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _launch import main_or_worker  # noqa: E402


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--slow-rank", type=int, default=2)
    p.add_argument("--slow-factor", type=float, default=1.5)
    p.add_argument("--steps", type=int, default=10, help="steps per round")
    p.add_argument("--rounds", type=int, default=2, help="rounds per mode")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences per step)")
    p.add_argument("--tokens-per-rank", type=int, default=256)
    p.add_argument("--json", default=None, help="also write the result here")
    return p.parse_args(argv)


def _overrides(a) -> list[str]:
    return ["model.architecture=llama", f"model.config.hidden_size={a.hidden}",
            f"model.config.intermediate_size={a.hidden * 2}", f"model.config.num_hidden_layers={a.layers}",
            "model.config.num_attention_heads=4", "model.config.num_key_value_heads=2",
            "data.source=synthetic", "data.lengths=longtail", f"data.seq_len={a.seq_len}",
            f"data.global_batch_size={a.batch}", "data.micro_batch_size=2",
            "parallel.sequence_scheduler=hetero", f"parallel.hetero_tokens_per_rank={a.tokens_per_rank}",
            "resilience.straggler='off'", f"fault.slow_rank={a.slow_rank}", f"fault.slow_factor={a.slow_factor}",
            "train.progress=false", "train.tensorboard=false", "train.peak_tflops=1",
            f"train.max_steps={a.steps * (2 * a.rounds + 1)}", "train.output_dir=/tmp/loomtrain-bench-rebalance"]


def worker(a) -> None:
    import torch
    import torch.distributed as dist

    from loomtrain.config import load_config
    from loomtrain.parallel.hetero.speeds import work_shares
    from loomtrain.resilience.clock import compute_cpu_s
    from loomtrain.resilience.rebalance import Rebalancer, speed_factors
    from loomtrain.resilience.straggler import hetero_work, window_rate
    from loomtrain.runtime.trainer import Trainer

    dist.init_process_group("gloo")
    trainer = Trainer(load_config(None, _overrides(a))).setup()
    hetero, world = trainer.hetero, dist.get_world_size()
    rebalancer = Rebalancer(hetero)
    rebalancer.setup(None, world)

    def run_round() -> tuple[list[float], list[float], list[float], list[float]]:
        wall, cpu, work, share = [], [], [], []
        for _ in range(a.steps):
            dist.barrier()
            start, c0 = time.perf_counter(), compute_cpu_s()
            trainer.train_step()
            cpu.append(compute_cpu_s() - c0)
            dist.barrier()
            wall.append(time.perf_counter() - start)
            work.append(hetero_work(hetero.last_plan, hetero.executor.index))
            share.append(work_shares(hetero.last_plan)[hetero.executor.index])
        return wall[2:], cpu[2:], work[2:], share[2:]

    _, cpu, work, _ = run_round()  # measure, as the monitor would over a window
    rates = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(rates, torch.tensor([window_rate(cpu, work)], dtype=torch.float64))
    factors = speed_factors([float(r) for r in rates], 0.10)
    modes = {"report": [1.0] * world, "rebalance": factors}
    times = {m: [] for m in modes}
    critical = {m: [] for m in modes}  # per step: the most CPU seconds any rank computed
    shares = {m: [] for m in modes}
    for r in range(a.rounds):
        for mode in (("report", "rebalance") if r % 2 == 0 else ("rebalance", "report")):
            rebalancer.apply(modes[mode])
            wall, cpu, _, share = run_round()
            times[mode] += wall
            shares[mode] += share
            rows = [torch.zeros(len(cpu), dtype=torch.float64) for _ in range(world)]
            dist.all_gather(rows, torch.tensor(cpu, dtype=torch.float64))
            critical[mode] += torch.stack(rows).max(dim=0).values.tolist()
    mine = torch.tensor([statistics.mean(shares["report"]), statistics.mean(shares["rebalance"])],
                        dtype=torch.float64)
    everyone = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    if dist.get_rank() == 0:
        slow = a.slow_rank
        result = {"report_step_s": statistics.median(times["report"]),
                  "rebalance_step_s": statistics.median(times["rebalance"]),
                  "report_critical_cpu_s": statistics.median(critical["report"]),
                  "rebalance_critical_cpu_s": statistics.median(critical["rebalance"]),
                  "factors": factors, "slow_rank": slow, "slow_factor": a.slow_factor,
                  "slow_rank_share_report": float(everyone[slow][0]),
                  "slow_rank_share_rebalance": float(everyone[slow][1]),
                  "nproc": world, "steps_measured_each": len(times["report"]),
                  "hidden": a.hidden, "layers": a.layers, "seq_len": a.seq_len, "global_batch": a.batch,
                  "tokens_per_rank": a.tokens_per_rank}
        result["ratio"] = result["rebalance_step_s"] / result["report_step_s"]
        result["critical_ratio"] = result["rebalance_critical_cpu_s"] / result["report_critical_cpu_s"]
        print(json.dumps(result))
        print(f"report {result['report_step_s'] * 1e3:.1f} ms/step | rebalance {result['rebalance_step_s'] * 1e3:.1f} "
              f"ms/step | ratio {result['ratio']:.3f} (wall)\n"
              f"slowest rank's CPU per step: report {result['report_critical_cpu_s'] * 1e3:.1f} ms | rebalance "
              f"{result['rebalance_critical_cpu_s'] * 1e3:.1f} ms | ratio {result['critical_ratio']:.3f}\n"
              f"measured factors {factors} | rank {slow}'s predicted "
              f"work share {result['slow_rank_share_report']:.1%} -> {result['slow_rank_share_rebalance']:.1%}")
        if a.json:
            with open(a.json, "w", encoding="utf-8") as fh:
                json.dump(result, fh, indent=1)
    dist.destroy_process_group()


def main() -> None:
    main_or_worker(__file__, _args, worker, lambda a: a.nproc, threads=1)


if __name__ == "__main__":
    main()
