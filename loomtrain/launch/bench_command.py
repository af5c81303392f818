"""`loomtrain bench`: loomtrain, and with `--vs` its peers, on the same model and data, one table.

    loomtrain bench [CONFIG.yaml|-] [section.key=value ...] [--layout zero2 --layout zero3 ...]
                    [--vs[=fsdp2,deepspeed,hf,torchtitan]] [--steps N] [--warmup N] [--json]
                    [--nproc-per-node N] [--out-dir DIR]

The launcher checks the config under every layout (as `run` does), fixes the per-device peak once
(`train.peak_tflops`, else the GPU's datasheet or a matmul measured here with the workers' thread
count) so MFU means the same for every system, and then starts one multi-process launch per
system, with the same `--nproc-per-node`: loomtrain first, then each installed peer. Each launch
runs every layout in turn (`bench_worker`); a peer that is not installed, or cannot run a layout,
is reported as skipped with the reason, never estimated. Then it prints a Markdown table (or with
`--json` one JSON object: `results`, `ratios`, `skipped`, `machine`, `versions`, `command`, ...).
Worker output goes to stderr, so `--json` leaves stdout to the one object.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import shlex
import sys
import time

import torch

from loomtrain.config import load_config
from loomtrain.launch.agent import launch, launch_spec, set_omp_threads, worker_main
from loomtrain.launch.bench_peers import PEER_RUNNERS
from loomtrain.launch.bench_report import compare_losses, ratios, summarize, table
from loomtrain.launch.bench_spec import (
    SYSTEM,
    Layout,
    check_counts,
    parse_layouts,
    parse_vs,
)
from loomtrain.launch.bench_worker import check_plan, run_system
from loomtrain.launch.spec import UsageError, in_worker
from loomtrain.runtime.metrics import device_peak_flops
from loomtrain.runtime.preflight import preflight
from loomtrain.version import __version__

GPU_NOT_MEASURED = ("no GPU here: the GPU part (MFU on a GPU, next to torchtitan in the same run) "
                    "was not measured")


def _finite(value):
    """Strict JSON: NaN and infinities become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _worker(system: str, plan: str) -> None:
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the launcher's (--json)
        run_system(system, plan)


def _device(cfg) -> torch.device:
    wants_cuda = cfg.train.device in ("auto", "cuda") and torch.cuda.is_available()
    return torch.device("cuda" if wants_cuda else "cpu")


def _peak_tflops(cfg, device: torch.device) -> tuple[float, str]:
    """One per-device peak for every system: measured here with the threads a worker gets."""
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and device.type == "cpu":
        torch.set_num_threads(int(threads))
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    flops, source = device_peak_flops(device, dtype, cfg.train.peak_tflops)
    return flops / 1e12, source


def _versions() -> dict:
    out = {"loomtrain": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "deepspeed", "accelerate", "torchtitan"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _machine(nproc: int) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"host": platform.node(), "platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(),
            "gpu": gpu, "gpus": torch.cuda.device_count() if gpu else 0, "nproc_per_node": nproc,
            "omp_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average": None}


def _load() -> float | None:
    return round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None


def _peer_reasons(peer: str, layouts: list[Layout], default_zero: int) -> dict[str, str | None]:
    reason_of = PEER_RUNNERS[peer][0]
    return {lay.name: lay.peer_reason() or reason_of(lay.zero(default_zero)) for lay in layouts}


def _launch_system(system: str, ns, plan: dict, out_dir: str, rnd: int) -> tuple[dict | None, str]:
    """One multi-process launch of `system`; (its results, or None, and why not)."""
    path = plan["result"] = os.path.join(out_dir, f"{system}.{rnd + 1}.json")  # every round's records kept
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    plan_path = os.path.join(out_dir, f"{system}.plan.json")
    with open(plan_path, "w", encoding="utf-8") as fh:
        json.dump(plan, fh, indent=1)
    spec, _ = launch_spec(ns, os.path.join(out_dir, "logs", f"{system}.{rnd + 1}"))  # a fresh rendezvous id
    print(f"loomtrain bench: round {rnd + 1}/{ns.repeat}: {system} on {spec.nproc_per_node} ranks x "
          f"{len(plan['layouts'])} layout(s) ...",
          file=sys.stderr, flush=True)
    rc = launch(spec, ["bench", "--worker", system, "--plan", plan_path])
    if rc != 0 or not os.path.isfile(path):
        return None, f"its launch failed (exit code {rc}; worker logs under {spec.log_dir})"
    with open(path, encoding="utf-8") as fh:
        return json.load(fh), ""


def _append(path: str, report: dict, text: str) -> None:
    """Append a dated section (machine, versions, the command and its table) to a Markdown file."""
    m, v = report["machine"], report["versions"]
    head = (f"\n### loomtrain bench, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
            f"{m['cpu']}, {m['cpus']} CPUs{', ' + m['gpu'] if m['gpu'] else ''}; {m['nproc_per_node']} ranks; "
            f"1-min load average at each launch and at the end {m['load_average']}; torch {v['torch']}, "
            f"transformers {v['transformers']}, deepspeed {v['deepspeed']}\n\n")
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(head + text + "\n")


def _run_systems(ns, plan: dict, runs: list, out_dir: str) -> tuple[list[dict], list[dict]]:
    """Every system once per round, in the order given, reversed every other round (so that drift on
    a shared machine falls on every system alike); a row pools its measured steps over the rounds.
    Returns the results rows and the skipped (system, layout, reason) entries."""
    skipped = [{"system": s, "layout": n, "reason": r} for s, reasons in runs for n, r in reasons.items() if r]
    active = [(s, reasons) for s, reasons in runs if not all(reasons.values())]
    pooled: dict[tuple[str, str], list[dict]] = {}
    failed: set[str] = set()
    loads = plan.setdefault("load_averages", [])  # 1-minute load at each launch and at the end
    for rnd in range(ns.repeat):
        for system, reasons in (active if rnd % 2 == 0 else active[::-1]):
            if system in failed:
                continue
            sys_plan = dict(plan, layouts=[dict(lay, peer_reason=reasons[lay["name"]]) for lay in plan["layouts"]])
            loads.append(_load())
            data, why = _launch_system(system, ns, sys_plan, out_dir, rnd)
            if data is None:
                failed.add(system)
                skipped += [{"system": system, "layout": n, "reason": why} for n, r in reasons.items() if not r]
                continue
            for row in data["rows"]:
                if row["status"] == "ok" and row["records"]:
                    pooled.setdefault((system, row["layout"]), []).append(row)
                elif rnd == 0 and not reasons.get(row["layout"]):
                    skipped.append({"system": system, "layout": row["layout"], "reason": row["reason"] or "no steps"})
    loads.append(_load())
    order = [(s, lay["name"]) for s, _ in runs for lay in plan["layouts"]]
    results = [summarize(s, pooled[(s, n)], ns.warmup) for s, n in order if (s, n) in pooled and s not in failed]
    return results, skipped


def cmd_bench(ns: argparse.Namespace) -> int:
    if in_worker():
        if not ns.worker:
            raise UsageError("loomtrain bench starts its own workers: run it without torchrun")
        return worker_main(_worker, ns.worker, check_plan(ns.plan))
    if ns.worker or ns.plan:
        raise UsageError("--worker and --plan are internal to loomtrain bench")
    check_counts(ns.steps, ns.warmup, ns.repeat)
    layouts, peers = parse_layouts(ns.layout), parse_vs(ns.vs)
    cfg = load_config(ns.config, ns.overrides)
    out_dir = os.path.abspath(ns.out_dir or os.path.join(cfg.train.output_dir, "bench"))
    os.makedirs(out_dir, exist_ok=True)
    spec, world = launch_spec(ns, os.path.join(out_dir, "logs"))
    for lay in layouts:  # every layout's config is checked before anything starts
        preflight(load_config(ns.config, [*ns.overrides, *lay.overrides]), world_size=world, log_dir=spec.log_dir)
    set_omp_threads(spec.nproc_per_node)
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", "20000")  # the collective counter's record
    device = _device(cfg)
    peak, peak_source = _peak_tflops(cfg, device)
    plan = {"config": ns.config, "overrides": list(ns.overrides), "steps": ns.steps, "warmup": ns.warmup,
            "peak_tflops": peak, "out_dir": out_dir, "device": cfg.train.device, "count_collectives": True,
            "layouts": [{"name": lay.name, "overrides": list(lay.overrides)} for lay in layouts]}

    runs = [(SYSTEM, {lay.name: None for lay in layouts})]
    runs += [(peer, _peer_reasons(peer, layouts, cfg.parallel.zero)) for peer in peers]
    results, skipped = _run_systems(ns, plan, runs, out_dir)
    compare_losses(results, cfg.model.dtype)
    ratio_rows = ratios(results)
    gpu_note = None if device.type == "cuda" else GPU_NOT_MEASURED
    report = {
        "results": results, "ratios": ratio_rows, "skipped": skipped,
        "losses_agree": all(r.get("loss_agrees", True) for r in results),
        "gpu_measured": device.type == "cuda", "gpu_note": gpu_note,
        "setup": {"steps": ns.steps, "warmup": ns.warmup, "repeat": ns.repeat,
                  "layouts": [dataclasses.asdict(lay) for lay in layouts],
                  "peers": peers, "world_size": world, "seq_len": cfg.data.seq_len,
                  "global_batch_size": cfg.data.global_batch_size, "micro_batch_size": cfg.data.micro_batch_size,
                  "model": {"architecture": cfg.model.architecture, "path": cfg.model.path,
                            "config": dict(cfg.model.config), "dtype": cfg.model.dtype},
                  "peak_tflops_per_device": peak, "peak_source": peak_source,
                  "collective_counter": "flight_recorder", "out_dir": out_dir},
        "machine": dict(_machine(spec.nproc_per_node), load_average=plan["load_averages"]),
        "versions": _versions(),
        "command": "loomtrain " + shlex.join(sys.argv[1:]),
    }
    text = "\n".join([f"`{report['command']}`", "", table(results, skipped, ratio_rows)]
                     + ([gpu_note] if gpu_note else []))
    if ns.append:
        _append(ns.append, report, text)
    if ns.json:
        print(json.dumps(_finite(report), allow_nan=False, default=str), flush=True)
    else:
        print(text)
    return 0 if any(r["system"] == SYSTEM for r in results) else 1
