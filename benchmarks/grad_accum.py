"""Gradient accumulation: reducing once per step against reducing after every micro-batch.

    python benchmarks/grad_accum.py [--nproc 2] [--micro 4] [--zero 2 3] [--steps 16] ...

Relaunches itself under torchrun. For each ZeRO stage it builds two trainers on the same model,
seed and data, `parallel.grad_sync=step` (the default: DDP `no_sync` / FSDP2 without gradient
sync before the last micro-batch, ZeRO-2 keeping its gathered parameters) and
`parallel.grad_sync=micro_batch` (what loomtrain did before: reduce-scatter, and under ZeRO-2
re-gather, around every micro-batch), alternates their steps so both see the same machine noise,
and prints the median step time of each (after one warm-up step each), the median of the paired
step-time ratios, and the collectives per step counted from torch's flight recorder
(`loomtrain.runtime.collectives`). It also checks that both curves are the same numbers.
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

os.environ.setdefault("TORCH_FR_BUFFER_SIZE", "20000")  # before the process group: count collectives


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--micro", type=int, default=4, help="micro-batches per rank and step")
    p.add_argument("--zero", type=int, nargs="+", default=[2, 3], choices=[0, 1, 2, 3])
    p.add_argument("--steps", type=int, default=16, help="measured steps of each (after one warm-up step)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--json", default=None, help="also write the result here")
    return p.parse_args(argv)


def _overrides(a, zero: int, sync: str) -> list[str]:
    return ["model.architecture=llama", f"model.config.hidden_size={a.hidden}",
            f"model.config.intermediate_size={a.hidden * 8 // 3 // 8 * 8}",
            f"model.config.num_hidden_layers={a.layers}", "model.config.num_attention_heads=4",
            "model.config.num_key_value_heads=4", "data.source=synthetic", "data.lengths=fixed",
            f"data.seq_len={a.seq_len}", f"data.global_batch_size={a.micro * a.nproc}", "data.micro_batch_size=1",
            f"parallel.zero={zero}", f"parallel.grad_sync={sync}", "optim.grad_clip=1.0", "train.progress=false",
            "train.tensorboard=false", "train.peak_tflops=1", f"train.max_steps={a.steps + 1}",
            f"train.output_dir=/tmp/loomtrain-bench-accum/z{zero}_{sync}"]


def _step(trainer, counter) -> tuple[float, int, float]:
    """One timed step: (seconds, collectives, loss)."""
    import torch.distributed as dist

    mark = counter.mark()  # outside the timed window: reading the recorder costs milliseconds
    dist.barrier()
    start = time.perf_counter()
    record = trainer.train_step()
    dist.barrier()
    seconds = time.perf_counter() - start
    return seconds, counter.since(mark).total - 2, record["loss"]  # less the two barriers


def worker(a) -> None:
    import torch.distributed as dist

    from loomtrain.config import load_config
    from loomtrain.runtime.collectives import CollectiveCounter
    from loomtrain.runtime.trainer import Trainer

    dist.init_process_group("gloo")
    results = []
    for zero in a.zero:
        trainers = {s: Trainer(load_config(None, _overrides(a, zero, s))).setup() for s in ("step", "micro_batch")}
        counter = CollectiveCounter()
        for t in trainers.values():  # one step each: lazy initialisation and DDP's bucket rebuild
            t.train_step()
        times = {s: [] for s in trainers}
        counts = {s: [] for s in trainers}
        losses = {s: [] for s in trainers}
        ratios = []
        # Steps alternate between the two (A B, then B A, ...) so that the machine's drift hits
        # both alike; the ratio of each pair is taken as well as the medians.
        for i in range(a.steps):
            order = ("step", "micro_batch") if i % 2 == 0 else ("micro_batch", "step")
            pair = {}
            for s in order:
                pair[s], c, loss = _step(trainers[s], counter)
                times[s].append(pair[s])
                counts[s].append(c)
                losses[s].append(loss)
            ratios.append(pair["step"] / pair["micro_batch"])
        for t in trainers.values():
            t.close()  # stops its watchdog; the process group is this script's and stays
        diff = max(abs(x - y) / abs(y) for x, y in zip(losses["step"], losses["micro_batch"]))
        row = {"zero": zero, "nproc": a.nproc, "micro_batches": a.micro, "hidden": a.hidden, "layers": a.layers,
               "seq_len": a.seq_len, "steps_measured_each": len(times["step"]),
               "pair_ratio_median": statistics.median(ratios),
               "pair_ratio_quartiles": statistics.quantiles(ratios, n=4)[::2],
               "step_s_once": statistics.median(times["step"]),
               "step_s_every_micro_batch": statistics.median(times["micro_batch"]),
               "collectives_per_step_once": statistics.mean(counts["step"]),
               "collectives_per_step_every_micro_batch": statistics.mean(counts["micro_batch"]),
               "max_rel_loss_diff": diff}
        row["ratio"] = row["step_s_once"] / row["step_s_every_micro_batch"]  # of the medians
        results.append(row)
        if dist.get_rank() == 0:
            print(f"ZeRO-{zero}, {a.nproc} ranks x {a.micro} micro-batches: reduce once "
                  f"{row['step_s_once'] * 1e3:.1f} ms/step, {row['collectives_per_step_once']:.0f} collectives | "
                  f"every micro-batch {row['step_s_every_micro_batch'] * 1e3:.1f} ms/step, "
                  f"{row['collectives_per_step_every_micro_batch']:.0f} collectives | ratio of medians "
                  f"{row['ratio']:.3f}, median of paired ratios {row['pair_ratio_median']:.3f} "
                  f"(quartiles {row['pair_ratio_quartiles'][0]:.3f}-{row['pair_ratio_quartiles'][1]:.3f}) | "
                  f"losses differ by {diff:.1e} (relative)", flush=True)
        del trainers
    if dist.get_rank() == 0:
        print(json.dumps({"results": results}))
        if a.json:
            with open(a.json, "w", encoding="utf-8") as fh:
                json.dump({"results": results}, fh, indent=1)
    dist.destroy_process_group()


def main() -> None:
    main_or_worker(__file__, _args, worker, lambda a: a.nproc, threads=None)


if __name__ == "__main__":
    main()
