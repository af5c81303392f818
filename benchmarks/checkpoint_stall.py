"""How long checkpointing stalls the training loop: loomtrain's lazy save against synchronous
`torch.save`, synchronous DCP and DCP's `async_save` (default and asynchronous staging), all in one
run on one model.

    python benchmarks/checkpoint_stall.py [--hidden 768] [--layers 8] [--blocks 3] [--json PATH]

One process (a gloo group of one, so every save goes through the same process-group code as a
multi-rank job) trains a Llama (~60M parameters at the defaults: fp32 weights + AdamW state
~0.7 GB) with one compute thread; checkpoint I/O runs on the machine's other core, as it would on
the host CPU of a GPU node. Measured, in this order, on the same Trainer:

* blocking per checkpoint (the time the loop cannot train) for
  - `torch.save` of the full state (model, optimizer, schedule) to one file + fsync,
  - synchronous `dcp.save` of `get_state_dict(model, optimizer)`,
  - `dcp.async_save` with its default stager, which copies the state to host memory inside the
    call (the call, plus any wait for the previous save before the next one),
  - `dcp.async_save` with DCP's own asynchronous staging, `DefaultStager(StagingOptions(...))`:
    the copy runs on a background thread and the call returns an `AsyncSaveResponse`. Blocking =
    the call (plus any wait for the previous save's upload before the next one, as above) + the
    wait for its `staging_completion` right before the next optimizer step (an optimizer step pre-
    hook), since that step would change the tensors being copied. This row, not the one above,
    is DCP's counterpart of loomtrain's lazy save, which also copies in the background and waits
    before the optimizer step. Pinned memory and non-blocking copies are used when CUDA is
    available; on a CPU-only build DCP ignores `use_pinned_memory` (with a warning) and
    `use_non_blocking_copy` raises, so both are off and the row's label says so. Shared memory is
    off: it only serves the PROCESS checkpointer, and this is the THREAD one,
  - loomtrain's lazy save (request + the wait before the next optimizer step), from the
    every-10-steps blocks; and from the every-step blocks, where a save takes longer than a
    step and the engine's back-pressure makes each request wait for the previous write;
* the per-save timeline of the lazy save (medians): copy, write (DCP + fsync/hash), hash_s (the
  fsync overlapped with sha256 and the fast checksum of this rank's files), checksum_s (the fast
  checksum's share of hash_s: what integrity-on-load costs the writer), commit;
* end-to-end slowdown: blocks of 10 steps with one loomtrain checkpoint each (the save requested
  at the block start, the block ends when it is committed) against blocks of 10 steps without,
  alternating; the same with a checkpoint every step (blocks of 4). Reported as the median over
  the block pairs of (with / without) - 1, and as the ratio of the sums.

The machine's 1-minute load average at the start and the end is printed: with other jobs on a
2-core machine the background write competes with them, and block times vary by +-20%.

Prints a table and a JSON line (`--json` also writes it). Goals (issue #5): blocking <= 1/20 of
the synchronous save; <= 5% slowdown when checkpointing every 10 steps.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=2, help="sequences per step")
    p.add_argument("--saves", type=int, default=3, help="saves per baseline method")
    p.add_argument("--blocks", type=int, default=3, help="alternating block pairs per end-to-end figure")
    p.add_argument("--threads", type=int, default=1, help="compute threads of the training loop")
    p.add_argument("--dir", default="/tmp/loomtrain-bench-ckpt", help="where checkpoints are written (removed)")
    p.add_argument("--json", default=None, help="also write the result here")
    return p.parse_args(argv)


def _overrides(a) -> list[str]:
    return ["model.architecture=llama", f"model.config.hidden_size={a.hidden}",
            f"model.config.intermediate_size={a.intermediate}", f"model.config.num_hidden_layers={a.layers}",
            f"model.config.num_attention_heads={a.hidden // 64}", f"model.config.num_key_value_heads={a.hidden // 64}",
            "data.source=synthetic", "data.lengths=fixed", f"data.seq_len={a.seq_len}",
            f"data.global_batch_size={a.batch}", f"data.micro_batch_size={a.batch}",
            "train.progress=false", "train.tensorboard=false", "train.peak_tflops=1", "train.max_steps=100000",
            "optim.warmup_steps=2", f"train.output_dir={a.dir}/run", f"checkpoint.dir={a.dir}/lazy",
            "checkpoint.keep=1"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(a) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from loomtrain.checkpoint import integrity
    from loomtrain.checkpoint import state as st
    from loomtrain.config import load_config
    from loomtrain.runtime.trainer import Trainer

    torch.set_num_threads(a.threads)
    shutil.rmtree(a.dir, ignore_errors=True)
    os.makedirs(a.dir)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    io_group = dist.new_group(backend="gloo")  # DCP's saves get their own group too (DESIGN.md)

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    trainer = Trainer(load_config(None, _overrides(a))).setup()
    ckpt = trainer.checkpointer
    n_params = sum(p.numel() for p in trainer.model.parameters())
    print(f"model: {n_params / 1e6:.1f}M parameters, set up in {time.perf_counter() - t0:.1f} s", flush=True)

    def step() -> float:
        start = time.perf_counter()
        trainer.train_step()
        ckpt.after_step(trainer.loop)  # keeps the checkpointer's view of the data position current
        return time.perf_counter() - start

    for _ in range(2):  # warm-up: allocator, optimizer state
        step()
    state_bytes = sum(t.numel() * t.element_size() for _, t in
                      st.model_entries(trainer.model) + st.optim_entries(trainer.model, trainer.optimizer))
    print(f"state: {state_bytes / 1e9:.2f} GB", flush=True)

    blocking: dict[str, list[float]] = {}

    # -- synchronous torch.save of the full state -------------------------------------------
    for i in range(a.saves):
        step()
        path = os.path.join(a.dir, f"torch_save_{i}.pt")
        start = time.perf_counter()
        with open(path, "wb") as fh:
            torch.save({"model": trainer.model.state_dict(), "optim": trainer.optimizer.state_dict(),
                        "scheduler": trainer.scheduler.state_dict(), "step": trainer.step}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        blocking.setdefault("torch.save (sync)", []).append(time.perf_counter() - start)
        os.remove(path)
        print(f"torch.save      {blocking['torch.save (sync)'][-1] * 1e3:9.1f} ms", flush=True)

    # -- synchronous DCP ----------------------------------------------------------------------
    for i in range(a.saves):
        step()
        path = os.path.join(a.dir, f"dcp_sync_{i}")
        start = time.perf_counter()
        msd, osd = get_state_dict(trainer.model, trainer.optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=path, process_group=io_group)
        blocking.setdefault("dcp.save (sync)", []).append(time.perf_counter() - start)
        shutil.rmtree(path)
        print(f"dcp.save        {blocking['dcp.save (sync)'][-1] * 1e3:9.1f} ms", flush=True)

    # -- DCP async_save -------------------------------------------------------------------------
    fut, prev = None, None
    for i in range(a.saves):
        step()
        path = os.path.join(a.dir, f"dcp_async_{i}")
        start = time.perf_counter()
        if fut is not None:
            fut.result()  # at most one in flight: the loop waits for the previous save
            shutil.rmtree(prev)
        msd, osd = get_state_dict(trainer.model, trainer.optimizer)
        fut = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=path, process_group=io_group)
        prev = path
        blocking.setdefault("dcp.async_save", []).append(time.perf_counter() - start)
        print(f"dcp.async_save  {blocking['dcp.async_save'][-1] * 1e3:9.1f} ms", flush=True)
        step()
    fut.result()
    shutil.rmtree(prev)

    # -- DCP async_save with asynchronous staging ---------------------------------------------------
    pinned = torch.cuda.is_available()  # DCP pins only for CUDA; non-blocking copies need an accelerator
    stager = DefaultStager(StagingOptions(use_pinned_memory=pinned, use_shared_memory=False,
                                          use_async_staging=True, use_non_blocking_copy=pinned))
    staged = "dcp.async_save (async staging, " + ("pinned)" if pinned else "unpinned: no accelerator)")
    staging = None

    def wait_for_staging(*_):
        nonlocal staging
        if staging is not None:
            start = time.perf_counter()
            staging.result()
            blocking[staged][-1] += time.perf_counter() - start
            staging = None

    hook = trainer.optimizer.register_step_pre_hook(wait_for_staging)
    resp, prev = None, None
    for i in range(a.saves):
        step()
        path = os.path.join(a.dir, f"dcp_staged_{i}")
        start = time.perf_counter()
        if resp is not None:
            resp.upload_completion.result()  # the stager reuses its host buffers: one save in flight
            shutil.rmtree(prev)
        upload = time.perf_counter() - start
        msd, osd = get_state_dict(trainer.model, trainer.optimizer)
        resp = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=path, process_group=io_group,
                              async_stager=stager)
        staging, prev = resp.staging_completion, path
        blocking.setdefault(staged, []).append(time.perf_counter() - start)
        call = blocking[staged][-1] - upload
        step()  # its optimizer step first waits for the staging (wait_for_staging)
        print(f"dcp.async_save, async staging {blocking[staged][-1] * 1e3:9.1f} ms (previous upload "
              f"{upload * 1e3:.1f} ms, call {call * 1e3:.1f} ms, staging wait "
              f"{(blocking[staged][-1] - upload - call) * 1e3:.1f} ms)", flush=True)
    resp.upload_completion.result()
    shutil.rmtree(prev)
    hook.remove()
    stager.close()

    # -- loomtrain lazy save and end-to-end slowdown ------------------------------------------------
    def block(n_steps: int, every: int) -> float:
        """n_steps steps; with every > 0 a lazy save after every `every`-th step (and the first one
        at the block start); the block ends when the last checkpoint is committed."""
        start = time.perf_counter()
        if every:
            ckpt.save()
        for i in range(1, n_steps + 1):
            step()
            if every and i % every == 0 and i < n_steps:
                ckpt.save()
        if every:
            ckpt.engine.wait()
        return time.perf_counter() - start

    e2e: dict[str, dict[str, list[float]]] = {}
    for every, n_steps in ((10, 10), (1, 4)):
        key = f"every {every}"
        first = len(ckpt.engine.records)
        for _ in range(a.blocks):
            e2e.setdefault(key, {}).setdefault("base", []).append(block(n_steps, 0))
            e2e[key].setdefault("ckpt", []).append(block(n_steps, every))
            print(f"{key:9s} block: base {e2e[key]['base'][-1]:.2f} s, with checkpoints {e2e[key]['ckpt'][-1]:.2f} s",
                  flush=True)
        recs = ckpt.engine.records[first:]
        name = "loomtrain lazy" if every == 10 else "loomtrain lazy, every step"
        blocking[name] = [r.stall_s for r in recs]
        e2e[key]["records"] = [{k: getattr(r, k) for k in ("request_block_s", "optimizer_wait_s", "copy_s",
                                                            "write_s", "hash_s", "checksum_s", "commit_s", "total_s")}
                               for r in recs]
    ckpt.end_fit(trainer.loop, None)
    dist.destroy_process_group()
    shutil.rmtree(a.dir, ignore_errors=True)

    sync = statistics.median(blocking["torch.save (sync)"])
    result = {
        "model_params": n_params, "state_gb": state_bytes / 1e9, "threads": a.threads,
        "loadavg_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],  # other jobs on the machine
        "step_s": statistics.median(e2e["every 10"]["base"]) / 10,
        "blocking_ms": {k: statistics.median(v) * 1e3 for k, v in blocking.items()},
        "blocking_max_ms": {k: max(v) * 1e3 for k, v in blocking.items()},
        "blocking_ratio_vs_torch_save": {k: statistics.median(v) / sync for k, v in blocking.items()},
        # Blocks alternate (base, with checkpoints); the median of the pairs' ratios resists a burst
        # of load from other jobs in one block better than the ratio of the sums (also given).
        "slowdown": {k: statistics.median(c / b for b, c in zip(v["base"], v["ckpt"])) - 1 for k, v in e2e.items()},
        "slowdown_sum_ratio": {k: sum(v["ckpt"]) / sum(v["base"]) - 1 for k, v in e2e.items()},
        "blocks_s": {k: {"base": v["base"], "ckpt": v["ckpt"]} for k, v in e2e.items()},
        "lazy_timeline_s": {k: {f: statistics.median(r[f] for r in v["records"])
                                for f in v["records"][0]} for k, v in e2e.items()},
        "lazy_records": {k: v["records"] for k, v in e2e.items()},
        "fast_checksum": integrity.FAST,
    }
    return result


def report(r: dict) -> None:
    print(f"\ncheckpoint stall: {r['model_params'] / 1e6:.1f}M params, {r['state_gb']:.2f} GB state, "
          f"{r['step_s']:.2f} s per step ({r['threads']} compute thread); machine load "
          f"{r['loadavg_1min'][0]} -> {r['loadavg_1min'][1]} (1-min average, start -> end)")
    w = max(map(len, r["blocking_ms"]))
    print(f"{'method':{w}s} {'blocking (median)':>18s} {'max':>10s} {'vs torch.save':>14s}")
    for k, v in r["blocking_ms"].items():
        print(f"{k:{w}s} {v:15.1f} ms {r['blocking_max_ms'][k]:7.1f} ms {r['blocking_ratio_vs_torch_save'][k]:14.4f}")
    for k, v in r["slowdown"].items():
        print(f"end-to-end slowdown, checkpoint {k:8s}: {100 * v:+.1f}% (median of block pairs; "
              f"ratio of sums {100 * r['slowdown_sum_ratio'][k]:+.1f}%)")
    for k, v in r["lazy_timeline_s"].items():
        print(f"lazy save ({k}): " + ", ".join(f"{f} {1e3 * s:.0f} ms" for f, s in v.items()))
    print(f"fast checksum ({r['fast_checksum']}): {1e3 * r['lazy_timeline_s']['every 10']['checksum_s']:.0f} ms "
          f"per save for {r['state_gb']:.2f} GB, in the background writer")
    goal_block = r["blocking_ratio_vs_torch_save"]["loomtrain lazy"] <= 1 / 20
    goal_e2e = r["slowdown"]["every 10"] <= 0.05
    print(f"goals: blocking <= 1/20 of torch.save: {'met' if goal_block else 'MISSED'}; "
          f"<= 5% slowdown every 10 steps: {'met' if goal_e2e else 'MISSED'}")
    print(json.dumps(r))


if __name__ == "__main__":
    args = _args()
    res = run(args)
    report(res)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(res, fh, indent=1)
