"""`loomtrain plan-offload`: the interleaved-offload split and update time for a machine you may not have.

    loomtrain plan-offload --params 7B --shards 8 --h2d 25 --cpu-adam 1 --gpu-adam 50 --gpu-free-gb 10
                           [--d2h GBPS] [--state-bytes 12] [--grad-bytes 4] [--param-bytes 4]
                           [--gpu-fraction F] [--json]

Each of the `--shards` data-parallel ranks holds the optimizer state of params/shards parameters
(ZeRO); the planner (`loomtrain.offload.model.plan`) picks the sub-group size and the share of
sub-groups updated on the device that minimise the update phase, and prints it next to the closed
form of the paper's model. Nothing here needs torch: `cli` imports these options for every
command line it parses.
"""
from __future__ import annotations

import argparse
import json
import math

from loomtrain.errors import LoomError
from loomtrain.offload.model import Machine, closed_form, parse_count, plan


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", required=True, metavar="N", help="model parameters, e.g. 7B, 350M, 1.3e9")
    p.add_argument("--shards", type=int, default=1, metavar="K",
                   help="ranks the optimizer state is sharded over (ZeRO data-parallel degree; default 1)")
    p.add_argument("--h2d", type=float, required=True, metavar="GBPS", help="host -> device GB/s per rank")
    p.add_argument("--d2h", type=float, default=None, metavar="GBPS",
                   help="device -> host GB/s per rank (default: the same as --h2d)")
    p.add_argument("--cpu-adam", type=float, required=True, metavar="GPS",
                   help="CPU AdamW throughput per rank, G params/s")
    p.add_argument("--gpu-adam", type=float, required=True, metavar="GPS", help="device AdamW, G params/s")
    p.add_argument("--gpu-free-gb", type=float, required=True, metavar="GB",
                   help="device memory free for staging buffers during the update phase")
    p.add_argument("--state-bytes", type=float, default=12.0, metavar="B",
                   help="optimizer-state bytes per parameter (fp32 master + 2 moments: 12)")
    p.add_argument("--grad-bytes", type=float, default=4.0, metavar="B",
                   help="gradient bytes per parameter sent down for the CPU path (default 4)")
    p.add_argument("--param-bytes", type=float, default=4.0, metavar="B",
                   help="parameter bytes per parameter sent up for the CPU path (default 4; bf16: 2)")
    p.add_argument("--gpu-fraction", type=float, default=None, metavar="F",
                   help="fix the device share (0..1) instead of choosing it")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise LoomError(f"{name}={value}: must be finite and positive")


def cmd_plan_offload(ns: argparse.Namespace) -> int:
    try:
        total = parse_count(ns.params)
    except ValueError as exc:
        raise LoomError(f"--params: {exc}") from None
    if total < 1:
        raise LoomError(f"--params={ns.params}: must be at least 1")
    if ns.shards < 1:
        raise LoomError(f"--shards={ns.shards}: must be at least 1")
    d2h = ns.h2d if ns.d2h is None else ns.d2h
    for name, value in (("--h2d", ns.h2d), ("--d2h", d2h), ("--cpu-adam", ns.cpu_adam), ("--gpu-adam", ns.gpu_adam),
                        ("--state-bytes", ns.state_bytes)):
        _positive(name, value)
    for name, value in (("--gpu-free-gb", ns.gpu_free_gb), ("--grad-bytes", ns.grad_bytes),
                        ("--param-bytes", ns.param_bytes)):
        if not (math.isfinite(value) and value >= 0):
            raise LoomError(f"{name}={value}: must be finite and not negative")
    if ns.gpu_fraction is not None and not 0 <= ns.gpu_fraction <= 1:
        raise LoomError(f"--gpu-fraction={ns.gpu_fraction}: must be within [0, 1]")
    machine = Machine(h2d_gbps=ns.h2d, d2h_gbps=d2h, cpu_adam_gps=ns.cpu_adam, gpu_adam_gps=ns.gpu_adam,
                      gpu_free_gb=ns.gpu_free_gb)
    per_rank = math.ceil(total / ns.shards)
    chosen = plan(per_rank, machine, state_bytes=ns.state_bytes, grad_bytes=ns.grad_bytes,
                  param_bytes=max(ns.param_bytes, 0.0), fraction=ns.gpu_fraction)
    f_star, speedup_star = closed_form(machine, ns.state_bytes, max(ns.grad_bytes, ns.param_bytes))
    report = {"params_per_rank": per_rank, "gpu_fraction": round(chosen.fraction, 4),
              "group_size": chosen.group_size, "n_groups": chosen.n_groups, "device_groups": chosen.device_groups,
              "update_s": chosen.update_s, "cpu_only_s": chosen.cpu_only_s, "speedup": round(chosen.speedup, 4),
              "staging_gb": round(chosen.staging_gb, 4), "closed_form_fraction": round(f_star, 4),
              "closed_form_speedup": round(speedup_star, 4)}
    if ns.json:
        print(json.dumps(report))
        return 0
    print(f"loomtrain plan-offload: {total:,} params over {ns.shards} shard(s) = {per_rank:,} per rank; "
          f"link {ns.h2d:g}/{d2h:g} GB/s, CPU Adam {ns.cpu_adam:g} G/s, device Adam {ns.gpu_adam:g} G/s, "
          f"{ns.gpu_free_gb:g} GB free")
    print(f"  plan: {chosen.describe()}")
    print(f"  closed form (B/C - p)/(B/C - p + s): {f_star:.0%} on the device path, {speedup_star:.2f}x")
    print(f"  use: offload.optimizer=interleaved offload.gpu_fraction={chosen.fraction:.3f} "
          f"(or auto, to measure this machine at start-up)")
    return 0
