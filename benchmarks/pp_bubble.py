"""Measured pipeline bubble of GPipe, 1F1B and Interleaved1F1B side by side, with theory.

    python benchmarks/pp_bubble.py [--pp 2] [--microbatches 8] [--steps 6] [--layers 8]

Relaunches itself under torchrun with `--pp` ranks (one thread each, so ranks do not steal each
other's cores). For each schedule it trains the same model on the same batches, records every
stage's forward/backward chunks for each step, and reports the median over steps (after one
warm-up step) of the measured idle fraction 1 - busy / (ranks x step span), next to the
theoretical (p-1)/(m+p-1) for GPipe and 1F1B and (p-1)/(v*m+p-1) for interleaving with v
virtual stages per rank (Narayanan et al. 2021, section 2.2).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _launch import main_or_worker  # noqa: E402

SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B")


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--virtual", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def worker(a) -> None:
    import torch.distributed as dist

    from loomtrain.config import load_config
    from loomtrain.runtime.timeline import bubble_summary
    from loomtrain.runtime.trainer import Trainer

    dist.init_process_group("gloo")
    rows = []
    for schedule in SCHEDULES:
        cfg = load_config(None, [
            "model.architecture=llama", f"model.config.hidden_size={a.hidden}",
            f"model.config.intermediate_size={a.hidden * 2}", f"model.config.num_hidden_layers={a.layers}",
            "data.source=synthetic", f"data.seq_len={a.seq_len}", f"data.global_batch_size={a.microbatches}",
            "data.micro_batch_size=1", f"parallel.pp={a.pp}", f"parallel.pp_schedule={schedule}",
            f"parallel.pp_virtual_stages={a.virtual}", "train.progress=false", "train.tensorboard=false",
            "train.peak_tflops=1", f"train.max_steps={a.steps}", "train.output_dir=/tmp/loomtrain-bench-bubble"])
        trainer = Trainer(cfg).setup()
        timeline = trainer.pipeline.timeline
        timeline.enabled = True
        measured = []
        for step in range(a.steps):
            timeline.events.clear()
            trainer.train_step()
            gathered = [None] * a.pp
            dist.all_gather_object(gathered, timeline.events, group=trainer.pp_group)
            if step > 0:
                measured.append(bubble_summary(gathered, a.microbatches)["bubble_measured"])
        v = a.virtual if schedule == "Interleaved1F1B" else 1
        theory = (a.pp - 1) / (v * a.microbatches + a.pp - 1)
        rows.append({"schedule": schedule, "bubble_measured": statistics.median(measured),
                     "bubble_theory": theory, "virtual_stages": v})
    if dist.get_rank() == 0:
        result = {"pp": a.pp, "microbatches": a.microbatches, "layers": a.layers, "schedules": rows}
        print(json.dumps(result))
        print(f"pipeline bubble, p={a.pp}, m={a.microbatches} (median of {a.steps - 1} steps)")
        print(f"{'schedule':<18}{'measured':>10}{'theory':>10}")
        for r in rows:
            print(f"{r['schedule']:<18}{100 * r['bubble_measured']:>9.1f}%{100 * r['bubble_theory']:>9.1f}%")
        if a.json:
            with open(a.json, "w", encoding="utf-8") as fh:
                json.dump(result, fh, indent=1)
    dist.destroy_process_group()


def main() -> None:
    main_or_worker(__file__, _args, worker, lambda a: a.pp, threads=1)


if __name__ == "__main__":
    main()
