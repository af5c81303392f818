"""Heterogeneous sequence-parallel scheduling against static SP, trained for real on CPU ranks.

    python benchmarks/hetero_vs_static.py [--nproc 2] [--context 512] [--capacity 256] [--batch 24] [--steps 4]
    python benchmarks/hetero_vs_static.py --nproc 4 --context 65536 --capacity 16384 --batch 48 --long 1 \
        --steps 3 --hidden 64 --layers 1   # long context: a 64K document in every batch; ~15 min on 2 cores

Relaunches itself under torchrun (one thread per rank, so an idle rank cannot lend its core to
a busy one and hide the imbalance). The same model trains on the same long-tailed batches of
whole documents (lengths drawn from ../shared/data/lengths-wikipedia.txt, clipped to the
context length) under two plans per step, alternating:
- static: every sequence on groups of the one degree the context length needs (Ulysses with
  degree context / capacity), as a fixed SP degree sized for the longest sequence would;
- hetero: loomtrain's planner (mixed group degrees per micro-step, portfolio with homogeneous).
Reported: median step time of each and their ratio, and each rank's idle share of the step
(1 - its time in micro-steps / the slowest rank's). DDP (ZeRO-0) under `no_sync` is used so
that ranks wait for each other only inside their own groups, never between micro-steps: a rank
that finishes early shows up as idle time at the end of the step.

Long context (`--long N`): every batch also gets N documents of exactly `--context` tokens (random
token ids; measured steps only, not the warm-up), so each step really carries the longest sequence
the context allows; on Wikipedia
lengths alone a 64K document turns up in about one batch in twenty. Attention runs through
loomtrain's memory-linear kernel (`model.attn_implementation=auto`), so no rank ever holds an
S x S object; each rank holds at most `--capacity` tokens per micro-step.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _launch import ROOT, main_or_worker  # noqa: E402

LENGTHS = os.path.join(os.path.dirname(ROOT), "shared", "data", "lengths-wikipedia.txt")


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--capacity", type=int, default=256)
    p.add_argument("--batch", type=int, default=24, help="sequences per step")
    p.add_argument("--steps", type=int, default=4, help="steps per plan kind (after one warm-up each)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4, help="query = key/value heads (a multiple of the SP degree)")
    p.add_argument("--long", type=int, default=0, help="documents of exactly --context tokens added to every batch")
    p.add_argument("--lengths", default=LENGTHS)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def worker(a) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    from loomtrain.config import load_config
    from loomtrain.parallel.hetero.executor import MicroStepTiming
    from loomtrain.parallel.hetero.planner import plan_batch, plan_homogeneous
    from loomtrain.models.loss import token_loss_sum
    from loomtrain.runtime.trainer import Trainer

    dist.init_process_group("gloo")
    lengths_src = f"file:{a.lengths}" if os.path.isfile(a.lengths) else "longtail"
    trainer = Trainer(load_config(None, [
        "model.architecture=llama", f"model.config.hidden_size={a.hidden}", f"model.config.intermediate_size={2 * a.hidden}",
        f"model.config.num_hidden_layers={a.layers}", f"model.config.num_attention_heads={a.heads}",
        f"model.config.num_key_value_heads={a.heads}", "data.source=synthetic", f"data.lengths={lengths_src}",
        f"data.seq_len={a.context}", f"data.global_batch_size={a.batch}", "data.micro_batch_size=1",
        "parallel.zero=0", "parallel.sequence_scheduler=hetero", f"parallel.hetero_tokens_per_rank={a.capacity}",
        "train.progress=false", "train.tensorboard=false", "train.peak_tflops=1", "train.max_steps=1000",
        "train.output_dir=/tmp/loomtrain-bench-hetero"])).setup()
    ex = trainer.hetero.executor
    module = trainer.par.wrapper
    static_degree = 1
    while static_degree * a.capacity < a.context:
        static_degree *= 2

    def call(input_ids, position_ids):
        return module(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits

    results = {"static": [], "hetero": []}
    idle = {"static": [], "hetero": []}
    idle_s = {"static": [], "hetero": []}
    tokens, longest = [], []
    rank0 = dist.get_rank() == 0
    for step in range(a.steps + 1):
        _, docs = trainer.loader.next_sequences()
        rng = np.random.default_rng([step, 0x6C6F6E67])  # same on every rank
        # not in the warm-up step (it would cost as much as a measured one; its groups are warmed anyway)
        docs = docs + [rng.integers(0, trainer.loader.vocab_size, size=a.context + 1) for _ in range(a.long * (step > 0))]
        lengths = [int(d.size) - 1 for d in docs]
        plans = {"static": plan_homogeneous(lengths, ex.n, a.capacity, static_degree, trainer.hetero.cost),
                 "hetero": plan_batch(lengths, ex.n, a.capacity, trainer.hetero.cost)}
        for kind in (("static", "hetero") if step % 2 == 0 else ("hetero", "static")):
            timing = MicroStepTiming()
            dist.barrier()
            start = time.perf_counter()
            with module.no_sync():  # no gradient all-reduce: waiting shows up as idle time below
                ex.run(plans[kind], docs, call, token_loss_sum, timing=timing)
            busy = torch.tensor([sum(timing.seconds)])
            dist.barrier()
            elapsed = time.perf_counter() - start
            trainer.optimizer.zero_grad(set_to_none=True)
            everyone = [torch.zeros(1) for _ in range(ex.n)]
            dist.all_gather(everyone, busy)
            slowest = max(float(t) for t in everyone)
            if step > 0:
                results[kind].append(elapsed)
                idle[kind].append([1 - float(t) / slowest for t in everyone])
                idle_s[kind].append([slowest - float(t) for t in everyone])
            if rank0:  # progress on stderr: a long-context step takes minutes on CPU
                print(f"step {step}{' (warm-up)' if step == 0 else ''} {kind}: {elapsed:.1f} s, "
                      f"{len(plans[kind].steps)} micro-steps, {len(lengths)} docs, {sum(lengths)} tokens, "
                      f"longest {max(lengths)}", file=sys.stderr, flush=True)
        if step > 0:
            tokens.append(sum(lengths))
            longest.append(max(lengths))
    if rank0:
        med = {k: statistics.median(v) for k, v in results.items()}
        # tokens/s over the measured steps: each plan ran the same batches, so the ratio is the speedup
        tok_s = {k: sum(tokens) / sum(v) for k, v in results.items()}
        per_rank_idle = {k: [statistics.mean(s[r] for s in v) for r in range(ex.n)] for k, v in idle.items()}
        per_rank_idle_s = {k: [statistics.mean(s[r] for s in v) for r in range(ex.n)] for k, v in idle_s.items()}
        cores = os.cpu_count() or 1
        out = {"ranks": ex.n, "cores": cores, "context": a.context, "capacity": a.capacity, "batch": a.batch,
               "long": a.long, "hidden": a.hidden, "layers": a.layers, "heads": a.heads,
               "static_degree": static_degree, "step_s": med, "tokens_per_s": tok_s,
               "speedup": med["static"] / med["hetero"], "tokens_per_step": tokens, "longest_per_step": longest,
               "idle_share_per_rank": per_rank_idle, "idle_s_per_rank": per_rank_idle_s, "lengths": lengths_src}
        print(json.dumps(out))
        print(f"{ex.n} ranks, context {a.context}, {a.capacity} tokens/rank, {a.batch} sequences/step"
              + (f" + {a.long} of {a.context} tokens" if a.long else "")
              + f"; longest per measured step {longest}, tokens per step {tokens}")
        if ex.n > cores:
            print(f"note: the {ex.n} ranks share {cores} CPU cores, so wall-clock times and their ratio are "
                  "indicative only")
        for k in ("static", "hetero"):
            idle_txt = " ".join(f"{100 * x:.0f}% ({s:.1f} s)" for x, s in zip(per_rank_idle[k], per_rank_idle_s[k]))
            print(f"{k:<7} {med[k] * 1e3:8.0f} ms/step  {tok_s[k]:8.0f} tokens/s   idle per rank: {idle_txt}")
        print(f"hetero speedup over static SP (degree {static_degree}): {out['speedup']:.2f}x")
        if a.json:
            with open(a.json, "w", encoding="utf-8") as fh:
                json.dump(out, fh, indent=1)
    dist.destroy_process_group()


def main() -> None:
    main_or_worker(__file__, _args, worker, lambda a: a.nproc, threads=1)


if __name__ == "__main__":
    main()
