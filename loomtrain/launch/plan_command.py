"""`loomtrain plan`: predict what heterogeneous sequence parallelism buys on a cluster you may not have.

    loomtrain plan --lengths FILE --gpus N --context-len L [--gpus-per-node G] [--capacity TOKENS]
                   [--batch-tokens T | --batch-size B] [--batches K] [--seed S] [--coeffs JSON] [--json]
                   [--bound-seconds S]

Samples K global batches from a length distribution (FILE: one length per line, or a JSON list),
clips each length to the context length, plans every batch three ways with the cost model, and
prints the predicted step times: static SP at the degree the context length needs (what a fixed
Ulysses/ring degree must be set to), the best single degree for each batch, and the heterogeneous
plan, with the speedups and the planner's own latency, and how far the heterogeneous plan can be from
the best possible one: a lower bound on each batch's step time under the same cost model
(`parallel/hetero/bound.py`) and the optimality gap, plan / bound - 1. Speedups are ratios of the summed step
times, i.e. of throughput on the same tokens. Nothing here needs a GPU or torch: `cli` imports
this module's options for every command line it parses.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections import Counter

import numpy as np

from loomtrain.errors import LoomError
from loomtrain.parallel.hetero import CostModel, compare_plans, lower_bound, plan_batch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", required=True, metavar="FILE",
                   help="sequence lengths in tokens: one per line, or a JSON list")
    p.add_argument("--gpus", type=int, required=True, metavar="N",
                   help="data x context ranks to plan for (a power of two)")
    p.add_argument("--context-len", type=int, required=True, metavar="L",
                   help="maximum sequence length; longer ones are clipped to it")
    p.add_argument("--gpus-per-node", type=int, default=None, metavar="G",
                   help="GPUs per node (a power of two; default: the cost model's, 8)")
    p.add_argument("--capacity", type=int, default=None, metavar="TOKENS",
                   help="tokens one GPU holds in a micro-step (default: from the cost model's memory)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--batch-tokens", type=int, default=None, metavar="T",
                      help="tokens per global batch (default: GPUs x capacity)")
    size.add_argument("--batch-size", type=int, default=None, metavar="B",
                      help="sequences per global batch instead of a token budget")
    p.add_argument("--batches", type=int, default=20, metavar="K", help="batches to simulate (default 20)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default 0)")
    p.add_argument("--coeffs", default=None, metavar="JSON",
                   help="cost-model coefficients to override: an inline JSON object or a JSON file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--bound-seconds", type=float, default=2.0, metavar="S",
                   help="time limit of the lower bound's MILP per batch (default 2; 0: analytic bound only)")


_INT64_MAX = 2**63 - 1


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise LoomError(f"--lengths: cannot read {path} ({exc.strerror})") from None
    if bytes(1) in raw:
        raise LoomError(f"{path}: a binary file (NUL byte at offset {raw.index(bytes(1))}); expected lengths "
                        "as text, one per line or a JSON list")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LoomError(f"{path}: not UTF-8 text (offset {exc.start}); expected lengths as text, one per line "
                        "or a JSON list") from None


def read_lengths(path: str) -> np.ndarray:
    """Positive integer lengths (below 2**63) from FILE (one per line; blank lines skipped) or a JSON list."""
    if not os.path.isfile(path):
        raise LoomError(f"--lengths: no such file: {path}")
    text = _read_text(path)
    if text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LoomError(f"{path}: not a valid JSON list ({exc.msg} at line {exc.lineno})") from None
        except RecursionError:
            raise LoomError(f"{path}: not a JSON list of lengths (nested too deeply)") from None
        if not isinstance(values, list):
            raise LoomError(f"{path}: not a JSON list of lengths")
        bad = [(i, v) for i, v in enumerate(values)
               if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= _INT64_MAX]
        if bad:
            raise LoomError(f"{path}: item {bad[0][0]} is not a positive 64-bit integer: {str(bad[0][1])[:40]}")
        arr = np.asarray(values, dtype=np.int64)
    else:
        lines = [(n, s.strip()) for n, s in enumerate(text.splitlines(), 1) if s.strip()]
        for n, s in lines:  # str.isdigit is fast enough for millions of lines, and names the bad one
            if not (s.isascii() and s.isdigit()) or int(s[:20]) < 1:
                raise LoomError(f"{path}:{n}: not a positive integer: {s[:40]!r}")
            if len(s) > 19 or int(s) > _INT64_MAX:  # (int() of 4,300 digits or more raises)
                raise LoomError(f"{path}:{n}: {s[:40]} is beyond the 64-bit integer range")
        arr = np.array([s for _, s in lines]).astype(np.int64) if lines else np.zeros(0, np.int64)
    if arr.size == 0:
        raise LoomError(f"{path}: no lengths in the file")
    return arr


def sample_batches(lengths: np.ndarray, count: int, seed: int, batch_tokens: int | None = None,
                   batch_size: int | None = None) -> list[np.ndarray]:
    """`count` batches drawn with replacement: `batch_size` sequences, or as many as fit in
    `batch_tokens` (at least one). Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        if batch_size is not None:
            out.append(lengths[rng.integers(0, lengths.size, batch_size)])
            continue
        drawn = np.zeros(0, np.int64)
        while drawn.sum() <= batch_tokens:
            more = int(1.5 * batch_tokens / max(1.0, float(lengths.mean()))) + 16
            drawn = np.concatenate([drawn, lengths[rng.integers(0, lengths.size, more)]])
        keep = int(np.searchsorted(np.cumsum(drawn), batch_tokens, side="right"))
        out.append(drawn[:max(1, keep)])
    return out


def _check(ns: argparse.Namespace) -> None:
    def pow2(v):
        return v >= 1 and not v & (v - 1)
    if not pow2(ns.gpus):
        raise LoomError(f"--gpus {ns.gpus}: must be a power of two (groups are aligned power-of-two "
                        "blocks of ranks)")
    if ns.gpus_per_node is not None and not pow2(ns.gpus_per_node):
        raise LoomError(f"--gpus-per-node {ns.gpus_per_node}: must be a power of two")
    for flag in ("context_len", "capacity", "batch_tokens", "batch_size", "batches"):
        value = getattr(ns, flag)
        if value is not None and value < 1:
            raise LoomError(f"--{flag.replace('_', '-')} {value}: must be at least 1")
    bound_s = ns.bound_seconds
    if not (bound_s >= 0 and bound_s < float("inf")):
        raise LoomError(f"--bound-seconds {bound_s}: must be a finite number >= 0")


def simulate(ns: argparse.Namespace) -> dict:
    """Plan the sampled batches; the report `cmd_plan` prints (also the JSON output)."""
    _check(ns)
    cost = CostModel.from_json(ns.coeffs) if ns.coeffs else CostModel()
    if ns.gpus_per_node is not None:
        cost = dataclasses.replace(cost, gpus_per_node=ns.gpus_per_node)
    capacity = ns.capacity or cost.max_tokens_per_gpu()
    if capacity < 1:
        raise LoomError("the cost model leaves no GPU memory for activations; set --capacity or "
                        "lower state_gb/reserved_gb in --coeffs")
    static = 1  # the degree static SP must use: the smallest whose memory holds the context
    while static * capacity < ns.context_len:
        static *= 2
    if static > ns.gpus:
        raise LoomError(f"--context-len {ns.context_len:,} needs {static} GPUs at {capacity:,} tokens "
                        f"per GPU, more than --gpus {ns.gpus}")
    lengths = np.minimum(read_lengths(ns.lengths), ns.context_len)
    tokens = ns.batch_tokens or (None if ns.batch_size else ns.gpus * capacity)
    batches = sample_batches(lengths, ns.batches, ns.seed, tokens, ns.batch_size)
    rows, wall, cpu = [], [], []
    for batch in batches:
        seqs = batch.tolist()
        t0, c0 = time.perf_counter(), time.process_time()
        chosen = plan_batch(seqs, ns.gpus, capacity, cost)  # what the executor runs, timed alone
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        cmp = compare_plans(seqs, ns.gpus, capacity, cost, static_degree=static)
        assert cmp.best.fingerprint == chosen.fingerprint, "the planner is not deterministic"
        bound = lower_bound(seqs, ns.gpus, capacity, cost, seconds=ns.bound_seconds, upper=chosen.time)
        rows.append((cmp.static, cmp.best_homogeneous, chosen, len(seqs), sum(seqs), bound))
    names = ("static", "best_homogeneous", "hetero")
    total = {n: sum(r[j].time for r in rows) for j, n in enumerate(names)}
    gaps = [r[2].time / r[5].value - 1.0 for r in rows]
    return {
        "gpus": ns.gpus, "gpus_per_node": cost.gpus_per_node, "context_len": ns.context_len,
        "capacity": capacity, "batches": len(rows), "seed": ns.seed,
        "batch_tokens": tokens, "batch_size": ns.batch_size,
        "mean_sequences_per_batch": float(np.mean([r[3] for r in rows])),
        "mean_tokens_per_batch": float(np.mean([r[4] for r in rows])),
        "max_length": int(max(int(b.max()) for b in batches)),
        "static_degree": static,
        "step_time_s": {n: total[n] / len(rows) for n in names},
        "micro_steps": {n: float(np.mean([len(r[j].steps) for r in rows])) for j, n in enumerate(names)},
        "speedup_vs_static": total["static"] / total["hetero"],
        "speedup_vs_best_homogeneous": total["best_homogeneous"] / total["hetero"],
        "hetero_chosen": sum(r[2].strategy == "hetero" for r in rows),
        "best_homogeneous_degrees": dict(sorted(Counter(r[1].degree for r in rows).items())),
        "planner_ms_per_batch": 1e3 * float(np.mean(wall)),
        "planner_ms_max": 1e3 * float(np.max(wall)),
        "planner_cpu_ms_per_batch": 1e3 * float(np.mean(cpu)),
        "optimality_gap_mean": float(np.mean(gaps)),
        "optimality_gap_max": float(np.max(gaps)),
        "bound_step_time_s": float(np.mean([r[5].value for r in rows])),
        "bound_solved": sum(bool(r[5].solved) for r in rows),
        "bound_seconds": ns.bound_seconds,
        "cost_model": cost.to_dict(),
    }


def format_report(r: dict, cost_text: str) -> str:
    size = (f"{r['batch_size']:,} sequences" if r["batch_size"]
            else f"<= {r['batch_tokens']:,} tokens")
    t, m = r["step_time_s"], r["micro_steps"]
    lines = [cost_text, "",
             f"{r['gpus']} GPUs ({r['gpus_per_node']} per node), context {r['context_len']:,} tokens,"
             f" {r['capacity']:,} tokens per GPU; {r['batches']} batches of {size} (seed {r['seed']}):"
             f" {r['mean_sequences_per_batch']:,.0f} sequences, {r['mean_tokens_per_batch']:,.0f} tokens"
             f" on average, longest {r['max_length']:,}",
             f"  {'plan':<34}{'step time (s)':>14}{'micro-steps':>13}{'hetero speedup':>16}"]
    for key, label, speedup in (
            ("static", f"static SP, degree {r['static_degree']}", r["speedup_vs_static"]),
            ("best_homogeneous", "best single degree per batch", r["speedup_vs_best_homogeneous"]),
            ("hetero", "heterogeneous (portfolio)", None)):
        ratio = f"{speedup:.2f}x" if speedup else "-"
        lines.append(f"  {label:<34}{t[key]:>14.3f}{m[key]:>13.1f}{ratio:>16}")
    degrees = ", ".join(f"d={d} x{n}" for d, n in r["best_homogeneous_degrees"].items())
    lines += [f"  best single degrees: {degrees}; heterogeneous plan chosen in {r['hetero_chosen']}"
              f" of {r['batches']} batches (else the best single degree)",
              f"  planner: {r['planner_ms_per_batch']:.1f} ms per batch wall"
              f" ({r['planner_cpu_ms_per_batch']:.1f} ms CPU, max {r['planner_ms_max']:.1f} ms)",
              f"  optimality gap (plan / lower bound - 1): mean {100 * r['optimality_gap_mean']:.2f}%,"
              f" worst {100 * r['optimality_gap_max']:.2f}%; bound {r['bound_step_time_s']:.3f} s per step,"
              f" MILP solved to optimality in {r['bound_solved']} of {r['batches']} batches"]
    return "\n".join(lines)


def cmd_plan(ns: argparse.Namespace) -> int:
    report = simulate(ns)
    if ns.json:
        print(json.dumps(report, indent=2))
    else:
        cost = CostModel.from_dict(report["cost_model"])
        g, n = cost.gpus_per_node, report["gpus"]
        degrees = sorted({1, min(g, n), min(2 * g, n), n})
        lengths = sorted({min(4096, ns.context_len), min(32768, ns.context_len), ns.context_len})
        print(format_report(report, cost.describe(lengths, degrees, report["capacity"])))
    return 0
