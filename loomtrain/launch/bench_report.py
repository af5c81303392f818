"""`loomtrain bench` results: from the workers' per-step records to the rows, ratios and table.

Definitions (every figure is over the measured steps, i.e. after `--warmup`, on rank 0):

* `step_time_s`: the median step time; `tokens_per_s` = global tokens per step / that median;
* `tflops`, `mfu` (PaLM convention), `mfu_exact` (exact packed causal count): loomtrain's own
  per-step figures (`runtime.metrics.step_record`, the same for every system) taken at the median
  step time, so that they are consistent with `tokens_per_s`;
* `peak_mem_gb`: the peak over the layout's run (CUDA: allocated; CPU: the process's peak RSS);
* `step_time_spread`: (slowest - fastest) / median: how noisy the figure is;
* `collectives_per_step`: the median count of collectives a rank issued per step (None: unknown);
* `loss_rel_diff`: the largest relative difference of a peer's loss from loomtrain's over the first
  steps (up to 3) of the same layout. Same weights and batches give the same losses up to float
  reduction order; a larger difference means the comparison is not like for like, and it is said.
"""
from __future__ import annotations

import math
import statistics

from loomtrain.launch.bench_spec import SYSTEM

LOSS_STEPS = 3
# Losses agree when within this relative difference (fp32 reduction order / bf16 rounding).
LOSS_TOL = {"float32": 1e-4, "bfloat16": 2e-2}


def _median(values: list) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.median(vals) if vals else None


def _at_median(records: list[dict], key: str, step: float | None) -> float | None:
    """A per-step rate (TFLOP/s, MFU) at the median step time, like `tokens_per_s`: the step's
    work (rate x time, the same every step for fixed-length rows) over that median."""
    work = _median([r[key] * r["step_time_s"] for r in records if isinstance(r.get(key), (int, float))])
    return work / step if work is not None and step else None


def summarize(system: str, rounds: list[dict], warmup: int) -> dict:
    """One results row from a layout's per-step records, pooled over the rounds (`--repeat`)."""
    records = [r for row in rounds for r in row["records"]]
    measured = [r for row in rounds for r in (row["records"][warmup:] or row["records"])]
    times = [r["step_time_s"] for r in measured]
    step = _median(times)
    tokens = measured[-1]["tokens"]
    coll = _median([r.get("collectives") for r in measured])
    return {
        "system": system, "layout": rounds[0]["layout"],
        "step_time_s": step, "tokens_per_s": tokens / step if step else None,
        "tflops": _at_median(measured, "tflops", step),
        "mfu": _at_median(measured, "mfu", step),
        "mfu_exact": _at_median(measured, "mfu_exact", step),
        "peak_mem_gb": max(r["peak_mem_gb"] for r in records),
        "step_time_spread": (max(times) - min(times)) / step if step else None,
        "collectives_per_step": None if coll is None else round(coll),
        "steps_measured": len(measured), "rounds": len(rounds), "tokens_per_step": tokens,
        "losses": [r["loss"] for r in rounds[0]["records"][:LOSS_STEPS]],
    }


def compare_losses(results: list[dict], dtype: str) -> list[dict]:
    """Add `loss_rel_diff` and `loss_agrees` to every peer row (against loomtrain, same layout)."""
    ours = {r["layout"]: r for r in results if r["system"] == SYSTEM}
    tol = LOSS_TOL.get(dtype, LOSS_TOL["bfloat16"])
    for r in results:
        base = ours.get(r["layout"])
        if r["system"] == SYSTEM or base is None:
            continue
        pairs = list(zip(base["losses"], r["losses"]))
        diff = max((abs(a - b) / max(abs(a), 1e-12) for a, b in pairs), default=None)
        r["loss_rel_diff"] = diff
        r["loss_agrees"] = diff is not None and diff <= tol
    return results


def ratios(results: list[dict]) -> list[dict]:
    """loomtrain's step time over each peer's, per layout (below 1: loomtrain is faster)."""
    ours = {r["layout"]: r for r in results if r["system"] == SYSTEM}
    out = []
    for r in results:
        base = ours.get(r["layout"])
        if r["system"] != SYSTEM and base and base["step_time_s"] and r["step_time_s"]:
            out.append({"layout": r["layout"], "peer": r["system"],
                        "step_time_ratio": base["step_time_s"] / r["step_time_s"],
                        "collectives": [base["collectives_per_step"], r["collectives_per_step"]]})
    return out


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value * scale if scale != 1.0 else value, spec)


def table(results: list[dict], skipped: list[dict], ratio_rows: list[dict]) -> str:
    """A Markdown table (it pastes into benchmarks/RESULTS.md as is), ratios, skips, loss checks."""
    head = ("| system | layout | step ms | spread | tokens/s | TFLOP/s | MFU | MFU exact | peak GB "
            "| collectives/step | loss step 1 |")
    lines = [head, "|" + " --- |" * head.count(" | ") + " --- |"]
    for r in results:
        lines.append(f"| {r['system']} | {r['layout']} | {_fmt(r['step_time_s'], '.1f', 1e3)} "
                     f"| {_fmt(r['step_time_spread'], '.0%')} | {_fmt(r['tokens_per_s'], ',.0f')} "
                     f"| {_fmt(r['tflops'], '.3g')} | {_fmt(r['mfu'], '.2%')} | {_fmt(r['mfu_exact'], '.2%')} "
                     f"| {_fmt(r['peak_mem_gb'], '.2f')} | {_fmt(r['collectives_per_step'], 'd')} "
                     f"| {_fmt(r['losses'][0] if r['losses'] else None, '.6f')} |")
    if ratio_rows:
        lines += ["", "loomtrain step time / peer step time (below 1: loomtrain is faster):"]
        for q in ratio_rows:
            ours_c, peer_c = q["collectives"]
            lines.append(f"  {q['layout']:<12} vs {q['peer']:<10} {q['step_time_ratio']:.3f}x"
                         f"   collectives/step {_fmt(ours_c, 'd')} vs {_fmt(peer_c, 'd')}")
    for r in results:
        if "loss_agrees" in r and not r["loss_agrees"]:
            lines.append(f"WARNING: {r['system']} {r['layout']}: losses differ from loomtrain's by "
                         f"{_fmt(r['loss_rel_diff'], '.2e')} (relative) over the first steps: not the same "
                         "computation, so its ratio does not compare like with like")
    checked = [r for r in results if "loss_agrees" in r]
    if checked and all(r["loss_agrees"] for r in checked):
        worst = max(r["loss_rel_diff"] for r in checked)
        lines.append(f"losses of every peer agree with loomtrain's over the first {LOSS_STEPS} steps "
                     f"(largest relative difference {worst:.1e}): same weights, same batches")
    for s in skipped:
        lines.append(f"skipped: {s['system']} {s['layout']}: {s['reason']}")
    return "\n".join(lines)
