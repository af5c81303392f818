"""`loomtrain bench`: the real command, 2 gloo ranks, a tiny Llama, ZeRO-2 and ZeRO-3, with `--vs`.

One invocation runs loomtrain, the plain FSDP2 loop, DeepSpeed and the HF Trainer (when installed),
each as its own launch, over DDP, ZeRO-2 and ZeRO-3; the test checks the JSON's schema, that every
row has positive finite figures and a collective count, and that every peer's losses equal
loomtrain's on the first steps (the same weights and batches: what makes the comparison honest).
Speed is never asserted. On CPU the HF Trainer runs DDP only (accelerate's FSDP needs an
accelerator), and its ZeRO-2/3 rows must be reported as skipped with that reason.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
from harness import TINY, launch_env

from loomtrain.launch import cli
from loomtrain.launch.bench_spec import parse_layout, parse_layouts, parse_vs
from loomtrain.launch.spec import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
HAS_ACCELERATE = importlib.util.find_spec("accelerate") is not None
LAYOUTS = ("ddp", "zero2", "zero3")



def _bench(*args: str, cwd: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loomtrain.launch", "bench", *args], cwd=cwd, env=launch_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_layouts_and_peers_parse():
    assert parse_layout("zero3").overrides == ("parallel.zero=3",)
    assert parse_layout("ddp").overrides == ("parallel.zero=0",)
    assert parse_layout("zero3+compile").overrides == ("parallel.zero=3", "parallel.compile=true")
    assert parse_layout("zero3+compile").peer_reason() is None
    lay = parse_layout("parallel.zero=3,parallel.tp=2")
    assert lay.name == "parallel.zero=3,parallel.tp=2" and lay.zero(1) == 3
    assert "parallel.tp" in lay.peer_reason()
    ns = cli.parse_args(["bench", "c.yaml", "train.seed=3", "--layout", "zero2", "--layout", "zero3", "--vs",
                         "--json", "--nproc-per-node", "2"])
    assert (ns.config, ns.overrides, ns.layout, ns.vs, ns.json) == ("c.yaml", ["train.seed=3"],
                                                                    ["zero2", "zero3"], "all", True)
    for bad in (["--layout", "zero9"], ["--layout", "tp2"], ["--layout", "zero2+fast"], ["--vs=megatron"], ["--layout", "zero2", "--layout", "zero2"]):
        ns = cli.parse_args(["bench", *bad])
        with pytest.raises(UsageError):
            parse_layouts(ns.layout), parse_vs(ns.vs)


def test_bad_layout_is_one_line(tmp_path):
    proc = _bench("--layout", "zero9", cwd=str(tmp_path), timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("loomtrain: error: --layout"), proc.stderr


def test_bench_vs_json(tmp_path):
    args = [*TINY["llama"], "data.source=synthetic", "data.lengths=fixed", "data.seq_len=32",
            "data.global_batch_size=8", "data.micro_batch_size=1", "optim.warmup_steps=2",
            f"train.output_dir={tmp_path}/run", *[a for lay in LAYOUTS for a in ("--layout", lay)],
            "--vs", "--json", "--steps", "2", "--warmup", "1", "--nproc-per-node", "2",
            "--append", str(tmp_path / "RESULTS.md")]
    proc = _bench(*args, cwd=str(tmp_path), timeout=1500)
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = json.loads(proc.stdout)  # stdout is exactly one JSON object
    for key in ("results", "ratios", "skipped", "machine", "versions", "command", "losses_agree", "setup"):
        assert key in report, key
    assert report["command"].startswith("loomtrain bench ") and "--vs" in report["command"]
    assert report["versions"]["torch"] and report["machine"]["nproc_per_node"] == 2
    expected = {("loomtrain", lay) for lay in LAYOUTS} | {("fsdp2", "zero2"), ("fsdp2", "zero3")}
    if HAS_DEEPSPEED:
        expected |= {("deepspeed", lay) for lay in LAYOUTS}
    if HAS_ACCELERATE:
        expected |= {("hf", "ddp")} | ({("hf", "zero2"), ("hf", "zero3")} if report["gpu_measured"] else set())
    rows = {(r["system"], r["layout"]): r for r in report["results"]}
    assert expected <= set(rows), (sorted(expected - set(rows)), report["skipped"])
    for system, layout in expected:
        r = rows[(system, layout)]
        for key in ("step_time_s", "tokens_per_s", "tflops", "mfu", "mfu_exact", "peak_mem_gb"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (system, layout, key, r)
        assert r["step_time_spread"] >= 0 and r["steps_measured"] == 2
        assert isinstance(r["collectives_per_step"], int) and r["collectives_per_step"] > 0, r
        assert r["tokens_per_step"] == 8 * 32
    # Same weights, same batches: the peers' losses equal loomtrain's (fp32 reduction order only).
    for (system, layout), r in rows.items():
        if system == "loomtrain":
            continue
        ours = rows[("loomtrain", layout)]["losses"]
        assert len(ours) == len(r["losses"]) == 3
        for a, b in zip(ours, r["losses"]):
            assert abs(a - b) <= 1e-5 * abs(a), (system, layout, ours, r["losses"])
        assert r["loss_agrees"] is True
    assert report["losses_agree"] is True
    ratio_pairs = {(q["layout"], q["peer"]) for q in report["ratios"]}
    assert ratio_pairs == {(lay, s) for s, lay in rows if s != "loomtrain"}
    assert all(q["step_time_ratio"] > 0 for q in report["ratios"])
    skipped = {(s["system"], s["layout"]): s["reason"] for s in report["skipped"]}
    for peer in ("hf", "torchtitan"):  # never guessed: reported with the reason
        if (peer, "zero2") in skipped:
            assert skipped[(peer, "zero2")], skipped
        else:
            assert (peer, "zero2") in rows
    assert "no FSDP2 form" in skipped[("fsdp2", "ddp")]
    if not HAS_DEEPSPEED:
        assert "not installed" in skipped[("deepspeed", "zero2")]
    if not HAS_ACCELERATE:
        assert "accelerate is not installed" in skipped[("hf", "ddp")]
    elif not report["gpu_measured"]:
        assert "accelerators only" in skipped[("hf", "zero2")] and "accelerators only" in skipped[("hf", "zero3")]
    if not report["gpu_measured"]:
        assert "not measured" in report["gpu_note"]
    appended = (tmp_path / "RESULTS.md").read_text()  # --append: the same table, with the command
    assert "### loomtrain bench, " in appended and report["command"] in appended
    for system, layout in expected:
        assert f"| {system} | {layout} |" in appended
