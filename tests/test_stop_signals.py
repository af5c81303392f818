"""A stop request commits the final checkpoint however many times it is delivered.

Schedulers signal every process of a job and torch's elastic agent forwards what it got, so a
worker nearly always sees a stop request twice or more. Real `loomtrain run` launches (2 gloo
workers, checkpoints only at the end) are stopped the two ways that happens in practice:
SIGTERM to the launcher and every worker at once, and SIGINT to the launcher's process group
(Ctrl-C), each delivered three times. The console's promise must be kept: the checkpoint it
names is committed, intact, and the next start resumes from it.
"""
import os
import signal
import subprocess
import sys
import time

import pytest

from harness import ROOT, case, launch_env
from loomtrain.checkpoint import format as fmt
from loomtrain.checkpoint.signals import StopOnSignal


# ------------------------------------------------------------------------------- in process
def test_repeats_within_grace_are_absorbed_then_a_late_one_aborts():
    stop = StopOnSignal(is_main=False, grace_s=0.5)
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGTERM and stop.absorbed == 2 and not stop.abort
        time.sleep(0.6)
        with pytest.raises(SystemExit) as info:
            os.kill(os.getpid(), signal.SIGTERM)
        assert info.value.code == 128 + signal.SIGTERM and stop.abort
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# ------------------------------------------------------------------------------ real launches

def _launch(out, log, *extra):
    args = case("llama", f"train.output_dir={out}", f"checkpoint.dir={out}/ckpt", "checkpoint.resume=auto",
                "train.max_steps=100000", "optim.schedule=constant", "parallel.zero=3",
                # big enough that a step and the final commit take longer than the signals' spacing,
                # as they do for real models
                "model.config.hidden_size=256", "model.config.intermediate_size=1024", "data.seq_len=128", *extra)
    fh = open(log, "w", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "loomtrain.launch", "run", "-", *args, "--nproc-per-node", "2"],
                            cwd=ROOT, env=launch_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_fh = fh
    return proc


def _children(pid):
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out += [int(p) for p in fh.read().split()]
        except FileNotFoundError:
            pass
    return out


def _wait_for_steps(proc, out, log, n, timeout=180):
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended early:\n{open(log).read()[-3000:]}"
        if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {n} steps in {timeout} s:\n{open(log).read()[-3000:]}")


def _stop(proc, how, times=3):
    for _ in range(times):
        if how == "term-all":  # a scheduler: every process of the job at once
            for pid in [proc.pid, *_children(proc.pid)]:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        else:  # Ctrl-C in a terminal: the launcher's process group
            os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.1)


def _promised(text):
    """The checkpoint the console said it committed ('stopped by SIG... ; checkpoint PATH committed')."""
    lines = [ln for ln in text.splitlines() if "loomtrain: stopped by SIG" in ln and "after step" in ln]
    assert len(lines) == 1, f"expected one 'stopped by' line from rank 0:\n{text[-4000:]}"
    assert "; checkpoint " in lines[0] and lines[0].endswith(" committed"), lines[0]
    return lines[0].split("; checkpoint ", 1)[1].rsplit(" committed", 1)[0]


@pytest.mark.parametrize("how, sig", [("term-all", signal.SIGTERM), ("int-group", signal.SIGINT)])
def test_repeated_stop_signal_commits_the_promised_checkpoint(tmp_path, how, sig):
    out, log = str(tmp_path / "run"), str(tmp_path / "first.log")
    proc = _launch(out, log)
    try:
        _wait_for_steps(proc, out, log, 3)
        _stop(proc, how)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            for pid in [proc.pid, *_children(proc.pid)]:
                os.kill(pid, signal.SIGKILL)
        proc.log_fh.close()
    text = open(log).read()
    path = _promised(text)
    assert "stops at once without it" in text  # the promise says when it no longer holds
    assert code == 128 + sig, f"exit code {code}:\n{text[-4000:]}"
    committed = fmt.list_committed(os.path.join(out, "ckpt"))
    assert committed and os.path.abspath(committed[0][1]) == os.path.abspath(path), (committed, path)
    man = fmt.read_manifest(path)
    assert fmt.verify_files(path, man, sorted(man["files"]), check="sha256") is None

    # Resumable: the next start continues from exactly that checkpoint.
    step = committed[0][0]
    log2 = str(tmp_path / "second.log")
    proc = _launch(out, log2, f"train.max_steps={step + 1}")
    try:
        assert proc.wait(timeout=180) == 0, open(log2).read()[-4000:]
    finally:
        proc.log_fh.close()
    assert f"checkpoint: resumed from {path} (step {step}," in open(log2).read()
