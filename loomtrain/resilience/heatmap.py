"""`loomtrain report RUN_DIR --plot`: a rank x step heat-map of the run's timing, events marked.

Two panels sharing the step axis:
* compute per unit of work relative to the step's median across ranks (1.0 typical, 1.3 = 30%
  slower): what the straggler detector judges, so a slow rank is a bright row, and uneven
  heterogeneous work by design is not;
* wall seconds of each rank's step: what the run actually paid.

Events from `events.jsonl` are drawn on both: a straggler as a cross on its row, a slow link as a
bar over its group's rows, a rebalance or restart as a vertical line across all rows.
matplotlib is optional (the `plot` extra); without it this is one clear error line.
"""
from __future__ import annotations

import math
import os

import numpy as np

from loomtrain.errors import LoomError
from loomtrain.resilience.runlog import EVENTS, Trace, load_trace, read_jsonl

HEATMAP = "straggler_heatmap.png"


def _grid(rows, clip_hi: float | None = None):
    """Rows of floats/None as a list of lists of floats (NaN for None), optionally clipped."""
    out = []
    for row in rows:
        vals = [float("nan") if v is None else float(v) for v in row]
        if clip_hi is not None:
            vals = [min(v, clip_hi) if math.isfinite(v) else v for v in vals]
        out.append(vals)
    return out


def _high(rows, q: float = 0.98) -> float | None:
    vals = sorted(v for row in rows for v in row if v is not None and math.isfinite(v))
    return vals[min(len(vals) - 1, int(q * len(vals)))] if vals else None


def plot_heatmap(run_dir: str, png: str | None = None) -> str:
    """Draw the heat-map of `run_dir` into `png` (default RUN_DIR/straggler_heatmap.png)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise LoomError("the straggler heat-map needs matplotlib: pip install 'loomtrain[plot]'") from None
    trace = load_trace(run_dir)
    if trace is None:
        raise LoomError(f"{run_dir}: no per-step straggler figures to plot (the monitor runs at 3+ ranks on "
                        "CPU with resilience.straggler other than off)")
    png = png or os.path.join(run_dir, HEATMAP)
    events = read_jsonl(os.path.join(run_dir, EVENTS))
    fig = Figure(figsize=(max(6.0, min(16.0, 2 + 0.06 * len(trace.steps))), min(20.0, 2.5 + 0.6 * trace.ranks)))
    FigureCanvasAgg(fig)  # attaches the Agg canvas: no pyplot, no global backend switch
    rel = trace.relative_compute()
    panels = ((rel, "compute / work vs step median", 2.0), (trace.wall_s, "step wall time (s)", None))
    axes = [fig.add_subplot(2, 1, i + 1) for i in range(len(panels))]
    for ax, (rows, title, cap) in zip(axes, panels):
        hi = cap if cap is not None else _high(rows)
        data = np.ma.masked_invalid(np.asarray(_grid(rows, hi), dtype=float))
        lo = 0.5 if cap is not None else 0.0
        img = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="magma", vmin=lo, vmax=hi,
                        extent=(trace.steps[0] - 0.5, trace.steps[-1] + 0.5, trace.ranks - 0.5, -0.5))
        fig.colorbar(img, ax=ax, fraction=0.04, pad=0.01)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("rank")
        ax.set_yticks(range(trace.ranks))
        _mark(ax, events, trace)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    return png


def _mark(ax, events: list[dict], trace: Trace) -> None:
    """Draw the run's events on one panel (see the module docstring)."""
    labelled: set[str] = set()
    for rec in events:
        step, kind = rec.get("step"), rec.get("event")
        if not isinstance(step, (int, float)):
            continue
        label = None if kind in labelled else kind
        labelled.add(kind)
        if kind == "straggler" and isinstance(rec.get("rank"), int):
            ax.plot([step], [rec["rank"]], marker="x", color="cyan", markersize=10, mew=2, linestyle="", label=label)
        elif kind == "link" and rec.get("group"):
            group = [r for r in rec["group"] if isinstance(r, int)]
            if group:
                ax.vlines(step, min(group) - 0.4, max(group) + 0.4, colors="lime", linewidth=3, label=label)
        else:  # a rebalance takes effect at its from_step: the line sits just before that step
            at = rec["from_step"] - 0.5 if isinstance(rec.get("from_step"), (int, float)) else step
            ax.axvline(at, color="white" if kind == "rebalance" else "red", linestyle="--", linewidth=1,
                       label=label)
    if labelled:
        ax.legend(loc="upper left", fontsize=7, framealpha=0.6)
