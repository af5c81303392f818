"""loomtrain's step time against a plain hand-written FSDP2 loop, same model, data and ranks.

    python benchmarks/fsdp_overhead.py [--nproc 2] [--steps 20] [--rounds 2] [--hidden 256] ...

Relaunches itself under torchrun. Inside one launch it alternates rounds of (loomtrain, plain
loop) so both see the same machine noise, and reports the median step time of each, excluding
each round's first two steps (warm-up). The plain loop is what a user would write by hand:
`AutoModelForCausalLM`, `fully_shard` per block and root, fused AdamW, HF's own loss on the same
token batches. Goal: loomtrain <= 1.02x the plain loop.
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
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences per step)")
    p.add_argument("--zero", type=int, default=3, choices=[2, 3])
    p.add_argument("--json", default=None, help="also write the result here")
    return p.parse_args(argv)


def _overrides(a) -> list[str]:
    return ["model.architecture=llama", f"model.config.hidden_size={a.hidden}",
            f"model.config.intermediate_size={a.hidden * 8 // 3 // 8 * 8}",
            f"model.config.num_hidden_layers={a.layers}", "model.config.num_attention_heads=4",
            "model.config.num_key_value_heads=4", "data.source=synthetic", "data.lengths=fixed",
            f"data.seq_len={a.seq_len}", f"data.global_batch_size={a.batch}",
            f"data.micro_batch_size={a.batch // a.nproc}", f"parallel.zero={a.zero}",
            "optim.grad_clip=1.0", "train.progress=false", "train.tensorboard=false", "train.peak_tflops=1",
            f"train.max_steps={a.steps * a.rounds}", "train.output_dir=/tmp/loomtrain-bench-overhead"]


def _plain_loop(trainer, batches, steps: int) -> list[float]:
    """A hand-written FSDP2 loop over the same model geometry and the same token batches."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(trainer.hf_config)
    mesh = trainer.mesh["dp_shard_cp"]
    for i, layer in enumerate(model.model.layers):
        fully_shard(layer, mesh=mesh, reshard_after_forward=trainer.cfg.parallel.zero == 3
                    and i < len(model.model.layers) - 1)
    fully_shard(model, mesh=mesh, reshard_after_forward=trainer.cfg.parallel.zero == 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        for mb in batches[step % len(batches)]:
            out = model(input_ids=mb.input_ids, labels=mb.input_ids)
            out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dist.barrier()
        times.append(time.perf_counter() - start)
    return times


def worker(a) -> None:
    import torch.distributed as dist

    from loomtrain.config import load_config
    from loomtrain.runtime.trainer import Trainer

    dist.init_process_group("gloo")
    trainer = Trainer(load_config(None, _overrides(a))).setup()
    batches = [trainer.loader.next_step() for _ in range(4)]
    trainer.loader.load_state_dict({"samples_consumed": 0})
    ours, plain = [], []

    def ours_round() -> list[float]:
        times = []
        for _ in range(a.steps):
            start = time.perf_counter()
            trainer.train_step()
            dist.barrier()
            times.append(time.perf_counter() - start)
        return times

    for r in range(a.rounds):  # alternate who goes first, so drift on the machine hits both
        if r % 2 == 0:
            ours += ours_round()[2:]
            plain += _plain_loop(trainer, batches, a.steps)[2:]
        else:
            plain += _plain_loop(trainer, batches, a.steps)[2:]
            ours += ours_round()[2:]
    if dist.get_rank() == 0:
        result = {"loomtrain_step_s": statistics.median(ours), "plain_fsdp2_step_s": statistics.median(plain),
                  "nproc": a.nproc, "zero": a.zero, "hidden": a.hidden, "layers": a.layers,
                  "seq_len": a.seq_len, "global_batch": a.batch, "steps_measured_each": len(ours)}
        result["ratio"] = result["loomtrain_step_s"] / result["plain_fsdp2_step_s"]
        print(json.dumps(result))
        print(f"loomtrain {result['loomtrain_step_s'] * 1e3:.1f} ms/step | plain FSDP2 loop "
              f"{result['plain_fsdp2_step_s'] * 1e3:.1f} ms/step | ratio {result['ratio']:.3f} (goal <= 1.02)")
        if a.json:
            with open(a.json, "w", encoding="utf-8") as fh:
                json.dump(result, fh, indent=1)
    dist.destroy_process_group()


def main() -> None:
    main_or_worker(__file__, _args, worker, lambda a: a.nproc, threads=None)


if __name__ == "__main__":
    main()
