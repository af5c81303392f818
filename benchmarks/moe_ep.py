"""Expert parallelism against ZeRO-3 alone, same MoE model (Mixtral geometry), data and ranks.

    python benchmarks/moe_ep.py [--nproc 2] [--ep 2] [--steps 6] [--rounds 2] [--hidden 256] ...

Runs alternating launches (ZeRO-3, ep, ep, ZeRO-3, ...; `--rounds` pairs), each its own torchrun
job so that each layout's peak memory is its own process's: a launch reports its median step time
(after 2 warm-up steps), the highest peak RSS over its ranks less the RSS before the model was
built (model, optimizer and step activations; not the interpreter and libraries), and the bytes
of parameters each rank holds. Prints the medians per layout and ep / ZeRO-3 ratios. Under ZeRO-3
every rank all-gathers every expert of a layer for its forward and backward; under ep it holds
E/ep experts whole (re-sharded over dp_shard/ep) and moves tokens instead.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from _launch import torchrun_command, worker_argv

_LAYOUT = "LOOMTRAIN_BENCH_LAYOUT"


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--steps", type=int, default=6, help="measured steps per launch (after 2 warm-up steps)")
    p.add_argument("--rounds", type=int, default=2, help="(ZeRO-3, ep) launch pairs, order alternating")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences per step)")
    p.add_argument("--json", default=None, help="also write the result here")
    return p.parse_args(argv)


def _overrides(a, layout: str) -> list[str]:
    return ["model.architecture=mixtral", f"model.config.hidden_size={a.hidden}",
            f"model.config.intermediate_size={2 * a.hidden}", f"model.config.num_hidden_layers={a.layers}",
            "model.config.num_attention_heads=4", "model.config.num_key_value_heads=4",
            f"model.config.num_local_experts={a.experts}", f"model.config.num_experts_per_tok={a.top_k}",
            "model.config.output_router_logits=true", "data.source=synthetic", "data.lengths=fixed",
            f"data.seq_len={a.seq_len}", f"data.global_batch_size={a.batch}",
            f"data.micro_batch_size={a.batch // a.nproc}", "parallel.zero=3", f"parallel.ep={a.ep if layout == 'ep' else 1}",
            "train.progress=false", "train.tensorboard=false", "train.peak_tflops=1",
            f"train.max_steps={a.steps + 2}", f"train.output_dir=/tmp/loomtrain-bench-moe-{layout}"]


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(a, layout: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from loomtrain.config import load_config
    from loomtrain.runtime.trainer import Trainer

    dist.init_process_group("gloo")
    base = _rss_bytes()
    trainer = Trainer(load_config(None, _overrides(a, layout))).setup()
    times = []
    for i in range(a.steps + 2):
        start = time.perf_counter()
        trainer.train_step()
        dist.barrier()
        if i >= 2:
            times.append(time.perf_counter() - start)
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
                for p in trainer.model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    stats = torch.tensor([float(peak), float(local)], dtype=torch.float64)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"layout": layout, "step_s": statistics.median(times),
                                      "peak_rss_gb": stats[0].item() / 1e9, "param_gb_per_rank": stats[1].item() / 1e9}),
              flush=True)
    dist.destroy_process_group()


def _launch(a, layout: str, argv: list[str]) -> dict:
    cmd, env = torchrun_command(__file__, a.nproc, argv, **{_LAYOUT: layout})
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"{layout} launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def main() -> None:
    if "RANK" in os.environ:
        worker(_args(worker_argv()), os.environ[_LAYOUT])
        return
    argv = sys.argv[1:]
    a = _args(argv)
    runs: dict[str, list[dict]] = {"zero3": [], "ep": []}
    for r in range(a.rounds):
        for layout in (("zero3", "ep") if r % 2 == 0 else ("ep", "zero3")):
            runs[layout].append(_launch(a, layout, argv))
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("step_s", "peak_rss_gb", "param_gb_per_rank")}
           for k, v in runs.items()}
    result = {"nproc": a.nproc, "ep_degree": a.ep, "hidden": a.hidden, "layers": a.layers, "experts": a.experts,
              "top_k": a.top_k, "seq_len": a.seq_len, "global_batch": a.batch, "steps_each": a.steps,
              "rounds": a.rounds, "zero3": med["zero3"], "ep": med["ep"],
              "step_time_ratio_ep_over_zero3": med["ep"]["step_s"] / med["zero3"]["step_s"],
              "peak_rss_ratio_ep_over_zero3": med["ep"]["peak_rss_gb"] / med["zero3"]["peak_rss_gb"]}
    print(json.dumps(result))
    print(f"ZeRO-3: {med['zero3']['step_s'] * 1e3:.0f} ms/step, peak {med['zero3']['peak_rss_gb']:.3f} GB | "
          f"ep{a.ep} x ZeRO-3: {med['ep']['step_s'] * 1e3:.0f} ms/step, peak {med['ep']['peak_rss_gb']:.3f} GB | "
          f"ratios ep/ZeRO-3: step {result['step_time_ratio_ep_over_zero3']:.2f}, "
          f"peak memory {result['peak_rss_ratio_ep_over_zero3']:.2f}")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
