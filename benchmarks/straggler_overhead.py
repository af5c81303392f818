"""What the always-on straggler monitor costs, as a share of step time (issue 12's goal: < 1%).

    python benchmarks/straggler_overhead.py [--nproc 4] [--steps 60] [--rounds 2] [--hidden 64]
                                            [--seq-len 32] [--window 10] [--json PATH]

Relaunches itself under torchrun (gloo, CPU) and trains the same model in one process group,
rounds alternating `resilience.straggler=off` and `report` (the default), in alternating order so
that drift on the machine hits both. Two figures:

* measured: the monitor's own time (its three hook points per step plus each window's probes and
  all-gather, timed by the monitor itself: `straggler_monitor_cost`, the same figure its
  end-of-run line prints), over the loop's time; the largest over the ranks, median over rounds.
  This is what the monitor adds, free of the machine's noise.
* A/B: mean step time with the monitor over mean step time without it (rank 0's `step_time_s`,
  the first 2 steps of each round left out). On a loaded machine the noise between rounds is
  larger than the effect, so this ratio is indicative only.

The defaults are a tiny model (tens of ms per step), a worst case: the monitor's cost per step is
fixed, so larger steps make it smaller.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _launch import main_or_worker  # noqa: E402


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--steps", type=int, default=60, help="steps per round")
    p.add_argument("--rounds", type=int, default=2, help="rounds per mode")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences per step)")
    p.add_argument("--window", type=int, default=10, help="resilience.window_steps")
    p.add_argument("--out", default="/tmp/loomtrain-bench-straggler-overhead")
    p.add_argument("--json", default=None, help="also write the result here")
    return p.parse_args(argv)


def _overrides(a, mode: str, name: str) -> list[str]:
    return ["model.architecture=llama", f"model.config.hidden_size={a.hidden}",
            f"model.config.intermediate_size={a.hidden * 2}", f"model.config.num_hidden_layers={a.layers}",
            "model.config.num_attention_heads=4", "model.config.num_key_value_heads=2",
            "data.source=synthetic", "data.lengths=longtail", f"data.seq_len={a.seq_len}",
            f"data.global_batch_size={a.batch}", "data.micro_batch_size=2",
            f"resilience.straggler='{mode}'", f"resilience.window_steps={a.window}",
            "train.progress=false", "train.tensorboard=false", "train.peak_tflops=1",
            f"train.max_steps={a.steps}", f"train.output_dir={os.path.join(a.out, name)}"]


def _step_times(out_dir: str) -> list[float]:
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        recs = [json.loads(line) for line in fh]
    return [float(r["step_time_s"]) for r in recs if int(r["step"]) > 2]


def worker(a) -> None:
    import torch.distributed as dist

    from loomtrain.config import load_config
    from loomtrain.runtime.trainer import Trainer

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    times: dict[str, list[float]] = {"off": [], "report": []}
    costs: list[float] = []
    for r in range(a.rounds):
        for mode in (("off", "report") if r % 2 == 0 else ("report", "off")):
            name = f"{mode}_{r}"
            trainer = Trainer(load_config(None, _overrides(a, mode, name)))
            with contextlib.redirect_stdout(io.StringIO()):
                trainer.fit()
            cost = [None] * dist.get_world_size()
            dist.all_gather_object(cost, trainer.loop.extra.get("straggler_monitor_cost"))
            trainer.close()
            if mode == "report":
                costs.append(max(c for c in cost if c is not None))
            if rank == 0:
                times[mode] += _step_times(os.path.join(a.out, name))
    if rank == 0:
        off, on = statistics.fmean(times["off"]), statistics.fmean(times["report"])
        load = os.getloadavg()
        res = {"nproc": a.nproc, "steps": a.steps, "rounds": a.rounds, "window_steps": a.window,
               "step_s_off": round(off, 5), "step_s_report": round(on, 5),
               "step_s_off_median": round(statistics.median(times["off"]), 5),
               "step_s_report_median": round(statistics.median(times["report"]), 5),
               "ab_ratio": round(on / off, 4), "monitor_cost": round(statistics.median(costs), 5),
               "monitor_cost_rounds": [round(c, 5) for c in costs], "loadavg": [round(x, 2) for x in load]}
        print(f"straggler monitor cost (measured by itself, worst rank, median of {len(costs)} rounds): "
              f"{res['monitor_cost']:.3%} of the loop's time", flush=True)
        print(f"step time with the monitor / without (A/B, {a.rounds} rounds each, {a.steps} steps): "
              f"{res['ab_ratio']:.3f}x (mean {on * 1e3:.1f} vs {off * 1e3:.1f} ms; median "
              f"{res['step_s_report_median'] * 1e3:.1f} vs {res['step_s_off_median'] * 1e3:.1f} ms)", flush=True)
        print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}", flush=True)
        if a.json:
            with open(a.json, "w", encoding="utf-8") as fh:
                json.dump(res, fh, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main_or_worker(__file__, _args, worker, lambda a: a.nproc, threads=1)
