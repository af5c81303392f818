"""Update-phase time with the optimizer state offloaded: no offload, FSDP2 `CPUOffloadPolicy`,
DeepSpeed ZeRO-Offload (where it imports), loomtrain `cpu` and loomtrain `interleaved`.

    python benchmarks/offload.py [--hidden 512] [--layers 4] [--steps 10] [--seq 256] [--batch 4]
                                 [--systems none,fsdp2_cpu_offload,deepspeed_offload,cpu,interleaved]
                                 [--gpu-fraction auto] [--json PATH] [--optimizer-only]

One invocation runs every system on the same Llama geometry and batch shape, each in its own
process (so each one's peak host memory is its own), one rank each. Per system it prints the
median step time and update-phase time over the steps after the first two, the peak host memory
(the process's peak resident set) and the peak device memory (GPU only), and the ratios of the
update phase against full CPU offload (loomtrain `cpu`) measured in the same run.

Without a GPU this is the CPU stand-in: the "device" path is host memory and a second thread
(`loomtrain.offload.paths`), the "link" a memcpy, and both paths share the same cores, so the
numbers say what the mechanism costs, not what a GPU gains. The script says which mode it ran.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from loomtrain.config import load_config  # noqa: E402
from loomtrain.hooks import Hook  # noqa: E402
from loomtrain.runtime.trainer import Trainer  # noqa: E402

SYSTEMS = ["none", "fsdp2_cpu_offload", "deepspeed_offload", "cpu", "interleaved"]


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--gpu-fraction", default="auto")
    p.add_argument("--json", default=None)
    p.add_argument("--optimizer-only", action="store_true",
                   help="time only the optimizer steps of none / cpu / interleaved (fractions 0.3, 0.7) in one "
                        "process, round-robin over --steps rounds: robust to a loaded machine")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one system, print JSON
    return p.parse_args(argv)


def _geometry(args) -> dict:
    heads = max(1, args.hidden // 64)
    return dict(hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 64 * 64 or 64,
                num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                vocab_size=258, max_position_embeddings=max(args.seq, 64))


def _peaks(device) -> dict:
    gpu = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"peak_host_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "peak_gpu_gb": gpu}


class UpdateTimer(Hook):
    """The update phase of a loomtrain step: `before_optimizer_step` to `after_optimizer_step`;
    also keeps every step's metrics record."""

    def __init__(self):
        self.times, self.records, self.start = [], [], 0.0

    def before_optimizer_step(self, loop):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def after_optimizer_step(self, loop):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.start)

    def after_step(self, loop, record):
        self.records.append(record)


def _loomtrain(args, mode: str) -> dict:
    g = _geometry(args)
    overrides = [f"model.config.{k}={v}" for k, v in g.items() if k != "vocab_size"] + [
        "data.source=synthetic", "data.lengths=fixed", f"data.seq_len={args.seq}",
        f"data.global_batch_size={args.batch}", f"data.micro_batch_size={args.batch}",
        f"train.max_steps={args.steps}", "train.progress=false", "train.tensorboard=false",
        "train.peak_tflops=1.0", f"train.output_dir={tempfile.mkdtemp(prefix='lt-offload-bench-')}"]
    if mode != "none":
        overrides.append(f"offload.optimizer={mode}")
    if mode == "interleaved":
        overrides.append(f"offload.gpu_fraction={args.gpu_fraction}")
    trainer = Trainer(load_config(None, overrides))
    timer = trainer.add_hook(UpdateTimer())
    trainer.fit()
    records = timer.records
    out = {"step_s": [r["step_time_s"] for r in records], "update_s": timer.times,
           "params": trainer.flops.total_params, **_peaks(trainer.env.device)}
    if mode != "none":
        out["update_pred_s"] = records[-1]["update_pred_s"]
        out["gpu_fraction"] = records[-1]["offload_gpu_fraction"]
    return out


def _hf_model(args):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**_geometry(args)))


def _init_one_rank():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", os.environ.get("LT_BENCH_PORT", "29581"))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1)


def _fsdp2(args) -> dict:
    _init_one_rank()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mesh = init_device_mesh(device.type, (1,))
    model = _hf_model(args).to(device)
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, offload_policy=CPUOffloadPolicy(pin_memory=device.type == "cuda"))
    fully_shard(model, mesh=mesh, offload_policy=CPUOffloadPolicy(pin_memory=device.type == "cuda"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    gen = torch.Generator().manual_seed(1)
    step_s, update_s = [], []
    for _ in range(args.steps):
        ids = torch.randint(0, 256, (args.batch, args.seq), generator=gen).to(device)
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        mid = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        end = time.perf_counter()
        step_s.append(end - start)
        update_s.append(end - mid)
    return {"step_s": step_s, "update_s": update_s, **_peaks(device)}


def _deepspeed(args) -> dict:
    try:
        import deepspeed
    except Exception as exc:  # noqa: BLE001 -- optional peer
        return {"skipped": f"deepspeed does not import ({type(exc).__name__})"}
    _init_one_rank()
    model = _hf_model(args)
    config = {"train_batch_size": args.batch, "train_micro_batch_size_per_gpu": args.batch,
              "gradient_accumulation_steps": 1, "gradient_clipping": 1.0, "steps_per_print": 10**9,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
              "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    gen = torch.Generator().manual_seed(1)
    step_s, update_s = [], []
    for _ in range(args.steps):
        ids = torch.randint(0, 256, (args.batch, args.seq), generator=gen).to(engine.device)
        start = time.perf_counter()
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        mid = time.perf_counter()
        engine.step()
        end = time.perf_counter()
        step_s.append(end - start)
        update_s.append(end - mid)
    return {"step_s": step_s, "update_s": update_s, **_peaks(engine.device)}


def run_one(args) -> dict:
    if args.one == "fsdp2_cpu_offload":
        return _fsdp2(args)
    if args.one == "deepspeed_offload":
        return _deepspeed(args)
    return _loomtrain(args, args.one)


def optimizer_only(args) -> dict:
    """Round-robin optimizer steps over the model's parameters with random gradients: every system
    sees the same machine load, so their ratios hold even when absolute times do not."""
    from loomtrain.offload.optimizer import OffloadAdamW
    model = _hf_model(args)
    opts = {}
    for name, fraction, size in (("none", None, 0), ("cpu", 0.0, 0), ("interleaved_0.3", 0.3, 1 << 16),
                                 ("interleaved_0.7", 0.7, 1 << 16)):
        params = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
        for p in params:
            p.grad = torch.randn_like(p)
        if fraction is None:
            opts[name] = torch.optim.AdamW(params, lr=1e-4, fused=True)
            continue
        opt = OffloadAdamW(params, lr=1e-4)
        opt.materialize(size or sum(p.numel() for p in params))
        opt.set_split(round(fraction * len(opt.subgroups)))
        opts[name] = opt
    times = {name: [] for name in opts}
    for _ in range(args.steps):
        for name, opt in opts.items():
            start = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - start)
    for opt in opts.values():
        if isinstance(opt, OffloadAdamW):
            opt.close()
    n = sum(p.numel() for p in model.parameters())
    base = statistics.median(times["cpu"][1:])
    print(f"optimizer step only, {n / 1e6:.1f}M params, median of {args.steps - 1} round-robin rounds:")
    out = {}
    for name, ts in times.items():
        ms = statistics.median(ts[1:]) * 1e3
        out[name] = {"update_ms": ms, "vs_cpu": base * 1e3 / ms}
        print(f"  {name:<16} {ms:8.1f} ms  {base * 1e3 / ms:5.2f}x vs loomtrain cpu")
    return out


def main() -> None:
    args = parse(sys.argv[1:])
    if args.optimizer_only:
        out = {"mode": "gpu" if torch.cuda.is_available() else "cpu-standin", "load_avg_1m": os.getloadavg()[0],
               "optimizer_only": optimizer_only(args)}
        print(json.dumps(out))
        return
    if args.one:
        print("BENCH_JSON " + json.dumps(run_one(args)), flush=True)
        return
    gpu = torch.cuda.is_available()
    mode = "GPU" if gpu else "CPU stand-in (no GPU: the device path is host memory and a thread; not GPU figures)"
    load_start = os.getloadavg()[0]
    print(f"offload benchmark: Llama hidden {args.hidden} x {args.layers} layers, batch {args.batch} x {args.seq}, "
          f"{args.steps} steps per system, one rank; mode: {mode}; load average {load_start:.1f}", flush=True)
    results = {}
    for i, system in enumerate(args.systems.split(",")):
        if system not in SYSTEMS:
            raise SystemExit(f"unknown system {system!r} (known: {', '.join(SYSTEMS)})")
        cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--one", system]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   LT_BENCH_PORT=str(29581 + i))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
        if proc.returncode != 0 or line is None:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            results[system] = {"skipped": f"failed ({tail[:160]})"}
        else:
            results[system] = json.loads(line[len("BENCH_JSON "):])
    base = results.get("cpu", {})
    base_update = statistics.median(base["update_s"][2:]) if base.get("update_s") else None
    print(f"{'system':<20} {'step ms':>9} {'update ms':>10} {'vs cpu':>7} {'pred ms':>8} {'device %':>8} "
          f"{'host GB':>8} {'GPU GB':>7}")
    summary = {}
    for system, r in results.items():
        if "skipped" in r:
            print(f"{system:<20} skipped: {r['skipped']}")
            summary[system] = r
            continue
        step = statistics.median(r["step_s"][2:]) * 1e3
        update = statistics.median(r["update_s"][2:]) * 1e3
        ratio = base_update * 1e3 / update if base_update else float("nan")
        pred = r.get("update_pred_s")
        frac = r.get("gpu_fraction")
        print(f"{system:<20} {step:9.1f} {update:10.1f} {ratio:6.2f}x {pred * 1e3 if pred else float('nan'):8.1f} "
              f"{frac * 100 if frac is not None else float('nan'):8.0f} {r['peak_host_gb']:8.2f} "
              f"{r['peak_gpu_gb'] if r['peak_gpu_gb'] is not None else float('nan'):7.2f}")
        summary[system] = {"step_ms": step, "update_ms": update, "update_speedup_vs_cpu": ratio,
                           "update_pred_ms": pred * 1e3 if pred else None, "gpu_fraction": frac,
                           "peak_host_gb": r["peak_host_gb"], "peak_gpu_gb": r["peak_gpu_gb"]}
    load_end = os.getloadavg()[0]
    out = {"mode": "gpu" if gpu else "cpu-standin", "load_avg_1m": load_end, "load_avg_1m_start": load_start,
           "results": summary}
    if not gpu:
        print(f"CPU stand-in run (load average {load_start:.1f} at start, {load_end:.1f} at end): the device path "
              "was host memory and a thread; the GPU part (streams, pinned copies, the >= 2x goal) was not measured.")
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
