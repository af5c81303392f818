"""Elastic recovery (`loomtrain run --max-restarts K`) in real 2-rank gloo runs through the CLI.

`fault.kill_rank=1 fault.kill_step=5` SIGKILLs rank 1 at the start of step 5 in the first attempt
only. With `--max-restarts 1` torchelastic restarts the group, which resumes from the last
committed checkpoint and runs to the end: the job exits 0, the launcher says it restarted and why,
and the loss of every step equals an uninterrupted run of the same config (steps after the resumed
checkpoint are logged twice in metrics.jsonl, once per attempt; the later record wins, as in
`loomtrain report`). Step 5, not 4: checkpoints commit in the background, and at load 20+ step 2's
had not committed by the start of step 4, so the restart rightly began at step 1. Step 4's save
request waits for step 2's commit (one checkpoint in flight), so by step 5 one is committed. With `--max-restarts 0` the same fault fails the job with one line naming
the dead rank. The three launches run at once: start-up dominates.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from harness import ROOT, case, launch_env

STEPS = 6
COMMON = [f"train.max_steps={STEPS}", "checkpoint.every=2", "resilience.startup_timeout_s=0",
          "resilience.hang_timeout_s=0", "resilience.checkpoint_timeout_s=0"]
KILL = ["fault.kill_rank=1", "fault.kill_step=5"]



def _start(out: str, restarts: int, *overrides: str) -> subprocess.Popen:
    fh = open(out + ".log", "w", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "loomtrain.launch", "run", "-",
                             *case("llama", f"train.output_dir={out}", *COMMON, *overrides),
                             "--nproc-per-node", "2", "--max-restarts", str(restarts)],
                            cwd=ROOT, env=launch_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_fh = fh
    return proc


def _finish(proc: subprocess.Popen, out: str) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.log_fh.close()
    with open(out + ".log", encoding="utf-8") as fh:
        return rc, fh.read()


def _losses(out: str) -> dict[int, float]:
    """step -> loss from metrics.jsonl; a step logged again after a restart: the later record."""
    losses: dict[int, float] = {}
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            losses[int(rec["step"])] = float(rec["loss"])
    return losses


def test_killed_rank_restarts_and_matches_uninterrupted(tmp_path):
    outs = {name: str(tmp_path / name) for name in ("clean", "restarted", "no_restart")}
    procs = {"clean": _start(outs["clean"], 1),
             "restarted": _start(outs["restarted"], 1, *KILL),
             "no_restart": _start(outs["no_restart"], 0, *KILL)}
    results = {name: _finish(proc, outs[name]) for name, proc in procs.items()}

    rc, log = results["clean"]
    assert rc == 0, log[-4000:]
    assert "loomtrain: restarted" not in log
    clean = _losses(outs["clean"])
    assert sorted(clean) == list(range(1, STEPS + 1)), clean

    rc, log = results["restarted"]
    assert rc == 0, log[-4000:]
    lines = [ln for ln in log.splitlines() if ln.startswith("loomtrain: restarted")]
    assert lines == ["loomtrain: restarted 1 time after rank 1 died (killed by SIGKILL)"], log[-4000:]
    restarted = _losses(outs["restarted"])
    assert sorted(restarted) == sorted(clean), restarted
    for step, loss in clean.items():
        assert abs(restarted[step] - loss) <= 1e-6 * abs(loss), (step, restarted[step], loss)
    # the second attempt resumed from a committed checkpoint instead of starting over
    with open(os.path.join(outs["restarted"], "metrics.jsonl"), encoding="utf-8") as fh:
        logged = [json.loads(line)["step"] for line in fh]
    assert logged[0] == 1 and logged.count(1) == 1 and len(logged) < 2 * STEPS, logged

    rc, log = results["no_restart"]
    assert rc != 0
    errors = [ln for ln in log.splitlines() if ln.startswith("loomtrain: error:")]
    assert errors == ["loomtrain: error: rank 1 failed: killed by signal SIGKILL"], log[-4000:]
