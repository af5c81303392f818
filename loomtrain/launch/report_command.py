"""`loomtrain report RUN_DIR [--plot]`: a run's metrics.jsonl as a table (steps, loss, tokens/s,
MFU, peak memory) and the resilience events of events.jsonl (stragglers, slow links, rebalances,
restarts); with --plot its curves as a PNG and, when the straggler monitor logged per-step
figures, a rank x step heat-map with the events marked (`loomtrain.resilience.heatmap`)."""
from __future__ import annotations

import argparse
import json
import math
import os

from loomtrain.errors import LoomError
from loomtrain.resilience import heatmap, runlog
from loomtrain.runtime import metrics


def read_metrics(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise LoomError(f"no metrics file at {path} (is this a run's train.output_dir?)")
    rows, bad = [], 0
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise LoomError(f"{path}: cannot read the metrics ({exc.strerror})") from None
    for line in raw.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            bad += 1  # e.g. a line cut short by a crash, or a file that is not metrics at all
            continue
        if isinstance(row, dict):
            rows.append(row)
    if not rows:
        raise LoomError(f"{path}: no metrics records" + (f" ({bad} unreadable lines)" if bad else ""))
    return rows


def _values(rows: list[dict], key: str) -> list[float]:
    out = []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append(float(v))
    return out


def summarize(rows: list[dict]) -> list[tuple[str, str]]:
    """(label, value) rows: steps, first/last loss, mean tokens/s and MFU, peak memory.

    A resumed run may log a step twice; the later record wins. Means leave out the first step
    (start-up, allocator warm-up) when there are more.
    """
    by_step: dict = {}
    for i, row in enumerate(rows):
        step = row.get("step", i + 1)
        if not isinstance(step, (int, float)) or isinstance(step, bool) or not math.isfinite(step):
            step = i + 1  # a record damaged by hand or by the disk keeps its place
        by_step.pop(step, None)
        by_step[step] = row
    rows = list(by_step.values())
    steps = _values(rows, "step")
    losses = [(r.get("step", "?"), float(r["loss"])) for r in rows
              if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    timed = rows[1:] if len(rows) > 1 else rows
    tps, mfu = _values(timed, "tokens_per_s"), _values(timed, "mfu")
    mem = _values(rows, "peak_mem_gb")
    na, note = "n/a", " (first step excluded)" if len(rows) > 1 else ""
    span = f" (step {int(min(steps))} to {int(max(steps))})" if steps else ""
    return [
        ("steps", f"{len(rows)}{span}"),
        ("loss first", f"{losses[0][1]:.4f} (step {losses[0][0]})" if losses else na),
        ("loss last", f"{losses[-1][1]:.4f} (step {losses[-1][0]})" if losses else na),
        ("tokens/s mean", f"{sum(tps) / len(tps):,.0f}{note}" if tps else na),
        # `mfu` is a fraction; a value above 1 can only be a percentage already
        ("MFU mean", (f"{sum(mfu) / len(mfu) * (100 if max(mfu) <= 1.0 else 1):.2f}%{note}"
                      if mfu else na)),
        ("peak memory", f"{max(mem):.2f} GB" if mem else na),
    ]


def cmd_report(ns: argparse.Namespace) -> int:
    run_dir = ns.run_dir
    jsonl = run_dir if os.path.isfile(run_dir) else os.path.join(run_dir, "metrics.jsonl")
    rows = read_metrics(jsonl)
    print(f"run: {os.path.dirname(os.path.abspath(jsonl))}")
    run = os.path.dirname(jsonl) or "."
    events = runlog.events_summary(run)
    table = summarize(rows) + [("events", f"{len(events)}" + (":" if events else
                                          " (no straggler, slow link, hang, rebalance or restart recorded)"))]
    width = max(len(k) for k, _ in table)
    for key, value in table:
        print(f"  {key:<{width}}  {value}")
    for line in events:
        print(f"    {line}")
    if ns.plot:
        if runlog.load_trace(run) is not None:
            print(f"heat-map: {heatmap.plot_heatmap(run)}")
        else:
            print("heat-map: none (no per-step straggler figures: the monitor runs at 3+ ranks on CPU)")
        png = ns.png or os.path.join(run, "metrics.png")
        out = metrics.plot_metrics(jsonl, png)  # a LoomError when matplotlib is missing
        print(f"plot: {out if isinstance(out, (str, os.PathLike)) else png}")
    return 0
