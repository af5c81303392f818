"""Fused linear + cross-entropy (`loomtrain.kernels.fused_loss`) against `lm_head` + `cross_entropy`:
peak memory and time of one forward + backward of the head and the loss, at several vocabularies.

    python benchmarks/fused_loss.py [--tokens 2048] [--dim 1024] [--vocabs 32768,65536,131072]
                                    [--chunk 0] [--reps 3] [--dtype float32] [--json]

Inputs: hidden [tokens, dim] and a head [vocab, dim], both needing gradients, random labels with
one in eight ignored; `reduction="sum"` as the training step uses. Memory is the peak of live
tensor bytes during the step counted by torch's `MemTracker` (inputs, gradients, logits and every
temporary; not the allocator's cache), so CPU figures are exact and repeatable, minus the bytes
alive before the step (inputs), i.e. what the loss itself adds. Time is the median of `--reps`
runs after a warm-up, stock and fused alternating in the same process; on this shared CPU only
the ratio means anything. On CUDA (`--device cuda`) memory is `torch.cuda.max_memory_allocated`
and liger-kernel is measured too when installed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.distributed._tools.mem_tracker import MemTracker

from loomtrain.kernels.fused_loss import auto_chunk_tokens, fused_linear_cross_entropy, liger_available, liger_loss


def stock(hidden, weight, labels):
    return F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=-100, reduction="sum")


def fused(chunk):
    return lambda hidden, weight, labels: fused_linear_cross_entropy(hidden, weight, labels, chunk_tokens=chunk)


def step(fn, hidden, weight, labels):
    hidden.grad = weight.grad = None
    fn(hidden, weight, labels).backward()


def peak_mb(fn, hidden, weight, labels) -> float:
    """MB of live tensors the step adds at its peak over what was alive before it."""
    hidden.grad = weight.grad = None
    if hidden.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(fn, hidden, weight, labels)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    tracker = MemTracker()
    tracker.track_external(hidden, weight, labels)
    with tracker:
        before = tracker.get_tracker_snapshot("current")[hidden.device]["Total"]
        step(fn, hidden, weight, labels)
    return (tracker.get_tracker_snapshot("peak")[hidden.device]["Total"] - before) / 2**20


def seconds(fn, hidden, weight, labels) -> float:
    if hidden.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step(fn, hidden, weight, labels)
    if hidden.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--vocabs", default="32768,65536,131072")
    ap.add_argument("--chunk", type=int, default=0, help="tokens per chunk (0 = auto)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    for vocab in (int(v) for v in args.vocabs.split(",")):
        g = torch.Generator().manual_seed(vocab)
        hidden = torch.randn(args.tokens, args.dim, generator=g).to(device, dtype).requires_grad_(True)
        weight = (torch.randn(vocab, args.dim, generator=g) * 0.02).to(device, dtype).requires_grad_(True)
        labels = torch.randint(0, vocab, (args.tokens,), generator=g).to(device)
        labels[::8] = -100
        paths = {"stock": stock, "fused": fused(args.chunk)}
        if device.type == "cuda" and liger_available():
            paths["liger"] = lambda h, w, y: liger_loss(h, w, y)
        for fn in paths.values():
            step(fn, hidden, weight, labels)  # warm-up
        times = {name: [] for name in paths}
        for _ in range(args.reps):
            for name, fn in paths.items():  # alternate: drift on a shared machine hits both alike
                times[name].append(seconds(fn, hidden, weight, labels))
        row = {"vocab": vocab, "tokens": args.tokens, "dim": args.dim, "dtype": args.dtype,
               "chunk": args.chunk or auto_chunk_tokens(vocab)}
        for name, fn in paths.items():
            row[f"{name}_peak_mb"] = round(peak_mb(fn, hidden, weight, labels), 1)
            row[f"{name}_s"] = round(statistics.median(times[name]), 4)
        row["memory_ratio"] = round(row["stock_peak_mb"] / row["fused_peak_mb"], 2)
        row["time_ratio"] = round(row["fused_s"] / row["stock_s"], 3)
        rows.append(row)
        if not args.json:
            print(f"vocab {vocab:6d}: peak stock {row['stock_peak_mb']:8.1f} MB  fused {row['fused_peak_mb']:8.1f} MB "
                  f"({row['memory_ratio']:.2f}x less) | time stock {row['stock_s']:.3f} s  fused {row['fused_s']:.3f} s "
                  f"(fused/stock {row['time_ratio']:.3f}) | chunk {row['chunk']} tokens", flush=True)
    if args.json:
        print(json.dumps({"device": str(device), "torch": torch.__version__, "results": rows}))


if __name__ == "__main__":
    main()
