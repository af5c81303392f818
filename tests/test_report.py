"""`loomtrain report`: the resilience events in the end-of-run summary and the rank x step heat-map
(`loomtrain.resilience.runlog`, `loomtrain.resilience.heatmap`).

The real run is in tests/test_resilience.py (`test_report_names_the_event_and_draws_the_heat_map`
reports on its 4-rank slow-rank run); here, run directories written by hand check the parts a
run does not reach: a resumed run's repeated steps, lines cut short by a crash, every event kind,
a run without per-step figures.
"""
from __future__ import annotations

import json
import os
import re

import pytest

from loomtrain.errors import LoomError
from loomtrain.launch import cli
from loomtrain.resilience import heatmap, runlog


def _write(path: str, records: list[dict], tail: str = "") -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
        fh.write(tail)


def _window(steps: list[int], slow_rank: int, work=(1.0, 1.0, 1.0, 1.0)) -> dict:
    comp = [[0.1 * w * (1.5 if r == slow_rank else 1.0) for _ in steps] for r, w in enumerate(work)]
    return {"step": steps[-1], "compute_s": [0.1] * 4, "work": list(work), "steps": steps,
            "step_compute_s": comp, "step_wall_s": [[0.2 for _ in steps] for _ in work],
            "step_work": [[w for _ in steps] for w in work]}


@pytest.fixture
def run_dir(tmp_path):
    _write(str(tmp_path / "metrics.jsonl"), [{"step": s, "loss": 3.0 - 0.1 * s} for s in range(1, 9)])
    _write(str(tmp_path / "events.jsonl"), [
        {"event": "straggler", "step": 4, "rank": 2, "host": "h2", "slowdown": 0.5, "evidence": "compute"},
        {"event": "link", "step": 4, "group": [0, 1], "dim": "dp_shard", "slowdown": 0.3},
        {"event": "rebalance", "step": 4, "from_step": 5, "speeds": [1.0, 1.0, 1.5, 1.0]},
    ], tail='{"event": "straggler", "st')  # a line cut short by a crash
    # steps 5-6 logged twice (a resumed run): the later figures win; uneven work by design
    _write(str(tmp_path / "straggler_windows.jsonl"),
           [_window([1, 2, 3, 4], 2), _window([5, 6], 1), _window([5, 6, 7, 8], 2, work=(1, 2, 3, 4))])
    return str(tmp_path)


def test_trace_is_rank_by_step_and_relative_per_unit_of_work(run_dir):
    trace = runlog.load_trace(run_dir)
    assert trace.steps == tuple(range(1, 9)) and trace.ranks == 4
    rel = trace.relative_compute()
    for j in range(8):  # rank 2 is 1.5x the median everywhere, even where the work differs 4x
        assert rel[2][j] == pytest.approx(1.5 / 1.0)
        assert rel[0][j] == rel[1][j] == rel[3][j] == pytest.approx(1.0)


def test_report_lists_every_event_and_draws_the_heat_map(run_dir, capsys):
    assert cli.main(["report", run_dir, "--plot"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  events +3:$", out, re.M), out
    assert "step 4: straggler rank 2 (h2), 50% slower" in out
    assert "step 4: slow link dp_shard group 0,1, 30% slower" in out
    assert "step 4: rebalanced the heterogeneous plan from step 5 (rank 2 x1.50)" in out
    png = os.path.join(run_dir, heatmap.HEATMAP)
    assert f"heat-map: {png}" in out and os.path.getsize(png) > 1000


def test_report_without_per_step_figures(tmp_path, capsys):
    _write(str(tmp_path / "metrics.jsonl"), [{"step": 1, "loss": 2.0}])
    assert cli.main(["report", str(tmp_path), "--plot"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  events +0 \(no straggler", out, re.M) and "heat-map: none" in out
    assert not os.path.exists(tmp_path / heatmap.HEATMAP)
    with pytest.raises(LoomError, match="no per-step straggler figures"):
        heatmap.plot_heatmap(str(tmp_path))
