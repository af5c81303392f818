"""The pipeline timeline of one step: which rank ran which stage's forward (F), backward (B) or
weight-gradient (W) chunk, and when; the bubble it leaves; and a picture of it.

Events carry wall-clock times (`time.time()`), which all processes of one machine share, so the
ranks' rows line up; across machines they are as good as the clocks' sync.
"""
from __future__ import annotations

import json

from loomtrain.errors import LoomError

_COLORS = {"F": "#4C72B0", "B": "#DD8452", "W": "#55A868"}


def bubble_summary(events_by_rank: list[list[dict]], n_microbatches: int) -> dict:
    """Measured idle fraction of the step (1 - busy / (ranks x span)) next to the theoretical
    GPipe/1F1B bubble (p - 1) / (m + p - 1) for p pipeline ranks and m micro-batches."""
    p = len(events_by_rank)
    starts = [e["t0"] for events in events_by_rank for e in events]
    ends = [e["t1"] for events in events_by_rank for e in events]
    if not starts:
        return {"ranks": p, "microbatches": n_microbatches, "bubble_measured": None,
                "bubble_theory": (p - 1) / (n_microbatches + p - 1)}
    span = max(ends) - min(starts)
    busy = [sum(e["t1"] - e["t0"] for e in events) for events in events_by_rank]
    return {"ranks": p, "microbatches": n_microbatches, "span_s": span, "busy_s": busy,
            "bubble_measured": 1.0 - sum(busy) / (p * span) if span > 0 else 0.0,
            "bubble_theory": (p - 1) / (n_microbatches + p - 1)}


def write_timeline(path: str, events_by_rank: list[list[dict]], n_microbatches: int, schedule: str) -> dict:
    origin = min((e["t0"] for events in events_by_rank for e in events), default=0.0)
    summary = bubble_summary(events_by_rank, n_microbatches)
    record = {"schedule": schedule, **summary,
              "events": [[{**e, "t0": e["t0"] - origin, "t1": e["t1"] - origin} for e in events]
                         for events in events_by_rank]}
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(record, fh)
    return record


def draw_timeline(timeline_json: str, out_png: str) -> str:
    """One row per pipeline rank, a box per chunk labelled stage/micro-batch; gaps are the bubble."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LoomError("drawing the pipeline timeline needs matplotlib: pip install matplotlib") from None
    with open(timeline_json, encoding="utf-8") as fh:
        record = json.load(fh)
    rows = record["events"]
    fig, ax = plt.subplots(figsize=(12, 0.7 * len(rows) + 1.2))
    for rank, events in enumerate(rows):
        for e in events:
            ax.barh(rank, e["t1"] - e["t0"], left=e["t0"], color=_COLORS.get(e["kind"], "gray"),
                    edgecolor="white", height=0.8)
            ax.text((e["t0"] + e["t1"]) / 2, rank, f"{e['kind']}{e['stage']}.{e['mb']}", ha="center",
                    va="center", fontsize=6, color="white")
    ax.set_yticks(range(len(rows)), [f"pp rank {r}" for r in range(len(rows))])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    measured = record.get("bubble_measured")
    ax.set_title(f"{record['schedule']}: bubble {100 * (measured or 0):.1f}% measured, "
                 f"{100 * record['bubble_theory']:.1f}% theory (p={record['ranks']}, m={record['microbatches']}); "
                 "F forward, B backward, W weight grad")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
