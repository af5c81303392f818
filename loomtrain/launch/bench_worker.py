"""The worker side of `loomtrain bench`: one system (loomtrain or one peer), every layout in turn.

The launcher writes a plan (JSON: config, overrides, layouts, steps, the per-device peak) and starts
one multi-process launch per system; each worker runs the plan's layouts one after another in the
same process group, and rank 0 writes the plan's `result` file (`{out_dir}/{system}.{round}.json`):
per layout, every step's record (loomtrain's `metrics.jsonl` fields, plus `collectives`), or why
the layout was skipped.

Between layouts the peak-memory counter is reset (CUDA's allocator statistics; on Linux the
process's peak RSS, through `/proc/self/clear_refs`), so each layout reports its own peak.
"""
from __future__ import annotations

import gc
import json
import os

import torch
import torch.distributed as dist

from loomtrain.config import load_config
from loomtrain.errors import LoomError
from loomtrain.hooks import Hook, LoopState
from loomtrain.launch.bench_collectives import Counter, counter
from loomtrain.launch.bench_peers import PEER_RUNNERS, PeerRun, PeerSkipped
from loomtrain.launch.bench_spec import SYSTEM
from loomtrain.mesh import init_distributed
from loomtrain.runtime.trainer import Trainer


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak-memory measurement (best effort on CPU: Linux only)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets the peak RSS that getrusage reports
    except OSError:
        pass


class _Recorder(Hook):
    """Keeps every step's record of a Trainer, with the collectives it issued."""

    def __init__(self, count: Counter):
        self.count = count
        self.records: list[dict] = []

    def after_setup(self, loop: LoopState) -> None:
        self.count.read()

    def after_step(self, loop: LoopState, record: dict) -> None:
        rec = dict(record)
        rec["collectives"] = self.count.read()
        self.records.append(rec)


def _layout_cfg(plan: dict, layout: dict, system: str):
    name = "".join(c if c.isalnum() else "_" for c in layout["name"])
    fixed = [f"train.max_steps={plan['warmup'] + plan['steps']}", "train.progress=false",
             "train.tensorboard=false", f"train.peak_tflops={plan['peak_tflops']}",
             f"train.output_dir={os.path.join(plan['out_dir'], system, name)}"]
    return load_config(plan["config"], [*plan["overrides"], *layout["overrides"], *fixed])


def _run_loomtrain(plan: dict, layout: dict, count: Counter) -> list[dict]:
    trainer = Trainer(_layout_cfg(plan, layout, SYSTEM))
    recorder = trainer.add_hook(_Recorder(count))
    try:
        trainer.fit()
    finally:
        trainer.close()
    return recorder.records


def _run_peer(system: str, plan: dict, layout: dict, count: Counter, env) -> tuple[list[dict], str | None]:
    cfg = _layout_cfg(plan, layout, system)
    reason_of, runner = PEER_RUNNERS[system]
    reason = layout.get("peer_reason") or reason_of(cfg.parallel.zero)
    if reason is not None or runner is None:
        return [], reason or "not built"
    run = PeerRun(cfg, env, cfg.parallel.zero, plan["warmup"] + plan["steps"], plan["peak_tflops"] * 1e12, count)
    try:
        return runner(run), None
    except PeerSkipped as skip:
        return [], str(skip)


def run_system(system: str, plan_path: str) -> None:
    """Worker body: every layout of the plan through `system`; rank 0 writes the results."""
    with open(plan_path, encoding="utf-8") as fh:
        plan = json.load(fh)
    env = init_distributed(plan["device"])
    count = counter(plan.get("count_collectives", True))
    rows = []
    for layout in plan["layouts"]:
        reset_peak_memory(env.device)
        count.read()
        if system == SYSTEM:
            records, reason = _run_loomtrain(plan, layout, count), None
        else:
            records, reason = _run_peer(system, plan, layout, count, env)
        rows.append({"layout": layout["name"], "status": "skipped" if reason else "ok", "reason": reason,
                     "records": records, "counter": count.name})
        if dist.is_initialized():
            dist.barrier()
    if env.rank == 0:
        path = plan.get("result") or os.path.join(plan["out_dir"], f"{system}.json")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({"system": system, "rows": rows}, fh)
        os.replace(tmp, path)
    if env.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


def check_plan(path: str | None) -> str:
    if not path or not os.path.isfile(path):
        raise LoomError(f"bench worker: no plan file at {path}")
    return path
