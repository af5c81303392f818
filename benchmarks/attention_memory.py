"""Peak memory per rank of one training step (forward + backward) against tokens per rank, for
every attention path: the plain packed kernel, Ulysses cp2, ring cp2, and HF's sdpa with the dense
document mask (the old plain path, only up to 16K tokens: it is quadratic).

    python benchmarks/attention_memory.py [--tokens 2048,4096,16384,65536] [--sdpa-max 16384]
                                          [--time-tokens 4096,16384]

Model: a tiny 2-layer Llama (hidden 256, 4 query / 2 KV heads) on one row of packed long-tailed
documents (lognormal lengths, a few as long as the row), float32 on the CPU. Memory is the peak of
live tensor bytes during the step, counted by torch's `MemTracker` (parameters, gradients,
activations and temporaries; not the allocator's cache or the Python heap), so CPU figures are
exact and repeatable. Runs on 2 gloo ranks; the single-process paths run on rank 0 while rank 1
waits. It prints, per path, the growth ratio (peak(16K) - peak(2K)) / (peak(4K) - peak(2K)):
linear memory gives 7, quadratic 63; the goal is <= 8.

`--time-tokens`: seconds of one attention forward + backward (the kernel alone, one head of 64) for
the blockwise kernel against SDPA with a dense mask, on long-tailed documents and on one causal
document, as ratios measured in the same run (best of 2 after a warm-up).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.device_mesh import init_device_mesh
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _launch import main_or_worker  # noqa: E402

from loomtrain.kernels.attention import packed_attention  # noqa: E402
from loomtrain.kernels.blockplan import layout_from_position_ids  # noqa: E402
from loomtrain.kernels.hf import use_packed  # noqa: E402
from loomtrain.parallel.context.apply import apply_cp  # noqa: E402
from loomtrain.parallel.context.common import sequence_indices  # noqa: E402

PATHS = ("packed", "ulysses_cp2", "ring_cp2", "sdpa_dense")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="2048,4096,16384,65536", help="tokens per rank, comma-separated")
    p.add_argument("--sdpa-max", type=int, default=16384, help="largest token count for the dense sdpa path")
    p.add_argument("--time-tokens", default="", help="token counts for the kernel vs SDPA timing (e.g. 4096,16384)")
    p.add_argument("--hidden", type=int, default=256)
    return p.parse_args(argv)


def positions(total: int, seed: int = 0) -> torch.Tensor:
    """[1, total] position ids of long-tailed documents packed into one row."""
    rng = np.random.default_rng(seed)
    lengths, left = [], total
    while left > 0:
        n = int(min(left, max(1, rng.lognormal(mean=6.0, sigma=1.6))))
        lengths.append(n)
        left -= n
    return torch.cat([torch.arange(n) for n in lengths])[None]


def build(hidden: int, impl: str) -> torch.nn.Module:
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                      max_position_embeddings=1 << 20)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    if impl == "packed":
        use_packed(model)
    return model


def step_peak_mb(model, ids, pos) -> float:
    """Peak live tensor MB during one forward + backward (parameters included)."""
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
        loss.backward()
    model.zero_grad(set_to_none=True)
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] / 2**20


def measure(path: str, tokens: int, hidden: int, rank: int, mesh) -> float | None:
    if path in ("packed", "sdpa_dense"):
        if rank != 0:
            return None
        model = build(hidden, "packed" if path == "packed" else "sdpa")
        pos = positions(tokens)
        ids = torch.randint(0, 256, pos.shape, generator=torch.Generator().manual_seed(1))
        return step_peak_mb(model, ids, pos)
    impl = "ulysses" if path.startswith("ulysses") else "ring"
    model = build(hidden, "cp")
    apply_cp(model, mesh["cp"], impl)
    cp = mesh["cp"].size()
    pos = positions(tokens * cp)
    ids = torch.randint(0, 256, pos.shape, generator=torch.Generator().manual_seed(1))
    mine = sequence_indices(tokens * cp, cp, mesh["cp"].get_local_rank(), impl)
    return step_peak_mb(model, ids[:, mine], pos[:, mine])


def time_kernels(tokens: int, reps: int = 2, one_document: bool = False) -> tuple[float, float]:
    """Seconds of one attention forward + backward, best of `reps`: blockwise kernel, SDPA with the
    dense mask. Long-tailed documents, or one causal document (the kernel's worst case: nothing
    but the future to skip)."""
    pos = torch.arange(tokens)[None] if one_document else positions(tokens)
    layout = layout_from_position_ids(pos)
    gen = torch.Generator().manual_seed(2)
    # One query and one KV head: SDPA's dense [S, S] scores, mask and gradients stay a few GB at 16K.
    q, k, v = (torch.randn(1, tokens, 64, generator=gen, requires_grad=True) for _ in range(3))
    doc = (pos[0] == 0).cumsum(0)
    mask = (doc[:, None] == doc[None, :]) & torch.ones(tokens, tokens, dtype=torch.bool).tril()

    def kernel():
        out, _ = packed_attention(q, k, v, q_index=layout.index, q_start=layout.start, k_index=layout.index)
        out.sum().backward()

    def sdpa():
        out = torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask,
                                                               enable_gqa=True)
        out.sum().backward()

    times = []
    for fn in (kernel, sdpa):
        fn()  # warm-up
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        times.append(best)
    return times[0], times[1]


def worker(args) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("cp",))
    token_list = [int(t) for t in args.tokens.split(",") if t]
    table: dict[str, dict[int, float]] = {p: {} for p in PATHS}
    for tokens in token_list:
        for path in PATHS:
            if path == "sdpa_dense" and tokens > args.sdpa_max:
                continue
            peak = measure(path, tokens, args.hidden, rank, mesh)
            if rank == 0:
                table[path][tokens] = peak
                print(f"{path:12s} {tokens:6d} tokens/rank: peak {peak:9.1f} MB", flush=True)
            dist.barrier()
    if rank == 0:
        print("\n| tokens/rank | " + " | ".join(PATHS) + " |")
        print("|---" * (len(PATHS) + 1) + "|")
        for tokens in token_list:
            cells = [f"{table[p][tokens]:.1f}" if tokens in table[p] else "not run" for p in PATHS]
            print(f"| {tokens} | " + " | ".join(cells) + " |")
        lo, mid, hi = 2048, 4096, 16384
        for path in PATHS:
            t = table[path]
            if all(x in t for x in (lo, mid, hi)):
                ratio = (t[hi] - t[lo]) / (t[mid] - t[lo])
                print(f"{path}: growth 2K->16K is {ratio:.1f}x the growth 2K->4K (linear 7, goal <= 8)")
        for tokens in [int(t) for t in args.time_tokens.split(",") if t]:
            for one in (False, True):
                kern, sdpa = time_kernels(tokens, one_document=one)
                docs = "one document" if one else "long-tailed documents"
                print(f"attention fwd+bwd, {tokens} tokens of {docs}: blockwise {kern:.3f} s, "
                      f"sdpa dense mask {sdpa:.3f} s, ratio {kern / sdpa:.2f}x", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main_or_worker(__file__, parse, worker, lambda args: 2)
