"""Reading back what the resilience components wrote into a run directory, for `loomtrain report`.

* `events.jsonl`: one record per detection or response (`straggler`, `link`, `hang`, `restart`,
  `rebalance`), written by rank 0 as it happens.
* `straggler_windows.jsonl`: one record per detection window (`StragglerMonitor`), with each
  rank's per-step compute seconds, wall seconds and work, which `heatmap.py` lays out as a
  rank x step grid.

Lines cut short by a crash are skipped, not fatal: a report of a run that died is the point.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

EVENTS = "events.jsonl"
WINDOWS = "straggler_windows.jsonl"


def read_jsonl(path: str) -> list[dict]:
    """The JSON objects of a JSON-lines file; [] when it does not exist; unreadable lines skipped."""
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, "rb") as fh:
        for line in fh:
            try:
                rec = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


@dataclass(frozen=True)
class Trace:
    """Per-rank, per-step figures of a run: rows are ranks, columns `steps` (None: not measured)."""

    steps: tuple[int, ...]
    compute_s: tuple[tuple[float | None, ...], ...]
    wall_s: tuple[tuple[float | None, ...], ...]
    work: tuple[tuple[float | None, ...], ...]

    @property
    def ranks(self) -> int:
        return len(self.compute_s)

    def relative_compute(self) -> list[list[float | None]]:
        """Compute seconds per unit of work over the step's median across ranks: 1.0 is typical,
        1.3 a rank 30% slower. Per unit of work, so the heterogeneous planner's uneven shares by
        design show as 1.0."""
        cols = []
        for j in range(len(self.steps)):
            rates = [_div(self.compute_s[r][j], self.work[r][j]) for r in range(self.ranks)]
            known = sorted(v for v in rates if v is not None)
            med = known[len(known) // 2] if len(known) % 2 else (
                (known[len(known) // 2 - 1] + known[len(known) // 2]) / 2 if known else None)
            cols.append([None if v is None or not med else v / med for v in rates])
        return [[cols[j][r] for j in range(len(self.steps))] for r in range(self.ranks)]


def _div(a, b):
    if not _finite(a) or not _finite(b) or b <= 0:
        return None
    return a / b


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_trace(run_dir: str) -> Trace | None:
    """The run's per-step trace from `straggler_windows.jsonl`; None when no window holds one
    (monitor off, fewer than 3 ranks, or a run from before the per-step figures were logged).
    A step logged twice (a resumed run) keeps its later figures."""
    by_step: dict[int, tuple[list, list, list]] = {}
    ranks = 0
    for rec in read_jsonl(os.path.join(run_dir, WINDOWS)):
        steps = rec.get("steps")
        tables = [rec.get(k) for k in ("step_compute_s", "step_wall_s", "step_work")]
        if not isinstance(steps, list) or not all(isinstance(t, list) for t in tables):
            continue
        ranks = max(ranks, len(tables[0]))
        for j, step in enumerate(steps):
            if isinstance(step, int):
                by_step[step] = tuple([_cell(row, j) for row in t] for t in tables)
    if not by_step:
        return None
    steps = sorted(by_step)

    def grid(k):
        return tuple(tuple(by_step[s][k][r] if r < len(by_step[s][k]) else None for s in steps)
                     for r in range(ranks))

    return Trace(tuple(steps), grid(0), grid(1), grid(2))


def _cell(row, j):
    if isinstance(row, list) and j < len(row) and _finite(row[j]):
        return float(row[j])
    return None


def describe_event(rec: dict) -> str:
    """One line for the end-of-run summary."""
    kind, step = rec.get("event", "?"), rec.get("step", "?")
    slow = rec.get("slowdown")
    slow_txt = f", {slow:.0%} slower" if _finite(slow) else ""
    if kind == "straggler":
        host = f" ({rec['host']})" if rec.get("host") else ""
        return f"step {step}: straggler rank {rec.get('rank')}{host}{slow_txt}"
    if kind == "link":
        group = ",".join(str(r) for r in rec.get("group") or [])
        return f"step {step}: slow link {rec.get('dim') or ''} group {group}{slow_txt}".replace("  ", " ")
    if kind == "rebalance":
        speeds = rec.get("speeds") or []
        slow_ranks = [f"rank {r} x{s:.2f}" for r, s in enumerate(speeds) if _finite(s) and s != 1.0]
        return (f"step {step}: rebalanced the heterogeneous plan from step {rec.get('from_step', '?')} "
                f"({', '.join(slow_ranks) or 'all ranks equal'})")
    if kind == "hang":
        return f"step {step}: hang, rank {rec.get('rank', '?')} ({rec.get('evidence', '')})"
    if kind == "restart":
        return f"step {step}: restart ({rec.get('evidence', rec.get('reason', ''))})"
    return f"step {step}: {kind}"


def events_summary(run_dir: str) -> list[str]:
    """The events of a run as summary lines, in the order they happened."""
    return [describe_event(rec) for rec in read_jsonl(os.path.join(run_dir, EVENTS))]
