"""Nothing lost: SIGKILL a checkpointing job (`checkpoint.every=1`) at 12 points during saves; every
next start must load the newest committed checkpoint and continue, and the run that finally
completes must have trained exactly the steps (losses, global samples) of an uninterrupted run.

Kill points: each phase of a save -- mid-copy to host, copy done, data written (before the ranks
agree), manifest written (before the rename), renamed (before `latest` moved), `latest` moved
(before pruning), mid-pruning -- through the engine's LOOMTRAIN_CKPT_FAULT hook, plus kills from
the test after a random number of steps and a random delay (wherever the save happens to be).

To keep this under two minutes, single-process jobs are forked from a "zygote" process that has
imported torch and transformers once (a fresh process per job, killed with SIGKILL like any other);
two of the jobs are real 2-rank ZeRO-3 torchrun launches whose agent and workers are all killed at
once, as a lost node would take them down. Layouts change between starts (1 <-> 2 ranks), so losses are
compared to relative 1e-5 and sample ids exactly.
"""
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from harness import LOSS_RTOL, ROOT, case, free_port, reference
from loomtrain.checkpoint import format as fmt

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

STEPS = 70
PHASES = ["copy", "staged", "written", "manifest", "renamed", "pointer", "pruning"]
COMMITTED_AT = {"renamed", "pointer", "pruning"}  # the phases after the commit point (the rename)

ZYGOTE = r"""
import json, os, sys, traceback
from loomtrain.config import load_config
from loomtrain.runtime.trainer import Trainer
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.setsid()
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.environ.update(req["env"])
        code = 0
        try:
            Trainer(load_config(None, req["overrides"])).fit()
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"exit": pid, "status": status}), flush=True)
"""


def overrides(out):
    return case("llama", f"train.max_steps={STEPS}", f"train.output_dir={out}", "checkpoint.every=1",
                "checkpoint.keep=2", "checkpoint.resume=auto", "train.log_samples=true", "optim.warmup_steps=5")


class Zygote:
    def __init__(self):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=ROOT)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def start(self, args, log, env):
        self.proc.stdin.write(json.dumps({"overrides": args, "log": log, "env": env}) + "\n")
        self.proc.stdin.flush()
        return self.lines.get(timeout=60)["pid"]

    def wait(self, timeout=120):
        return self.lines.get(timeout=timeout)["status"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _lines(path):
    """JSON lines of a file another process appends to (a line still being written is skipped)."""
    out = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    except FileNotFoundError:
        pass
    return out


def _alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


class Job:
    """One start of the job: a forked single process, or a 2-rank torchrun launch."""

    def __init__(self, zygote, out, log, *, ranks=1, fault=None):
        env = {"LOOMTRAIN_CKPT_FAULT": fault or ""}
        args = overrides(out)
        self.zygote = None
        if ranks == 1:
            self.zygote, self.pid = zygote, zygote.start(args, log, env)
        else:
            env.update(os.environ, OMP_NUM_THREADS="1", LOOMTRAIN_CKPT_FAULT_SCOPE="job",
                       PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
                   "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "loomtrain.launch",
                   "run", "-", *args, "parallel.zero=3"]
            self.fh = open(log, "a", encoding="utf-8")
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.fh, stderr=subprocess.STDOUT,
                                         start_new_session=True)
            self.pid = self.proc.pid

    def running(self):
        return _alive(self.pid) if self.zygote else self.proc.poll() is None

    def kill(self):
        if self.zygote:
            os.kill(self.pid, signal.SIGKILL)
        else:  # torchrun starts each worker in a session of its own: kill them one by one, at once
            import psutil

            agent = psutil.Process(self.pid)
            for proc in agent.children(recursive=True) + [agent]:
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass

    def wait(self, timeout=120):
        if self.zygote:
            return self.zygote.wait(timeout)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.fh.close()


def _resumed_step(log):
    with open(log, encoding="utf-8") as fh:
        text = fh.read()
    for line in text.splitlines():
        if "checkpoint: resumed from" in line:
            return int(line.split("resumed from ")[1].split()[0].rsplit("step_", 1)[1])
        if "nothing to resume" in line:
            return 0
    raise AssertionError(f"the job did not say what it resumed from:\n{text[-3000:]}")


def _check_committed(root):
    """Every committed checkpoint is complete and intact (a partial one never looks committed)."""
    committed = fmt.list_committed(root)
    for step, path in committed:
        man = fmt.read_manifest(path)
        problem = fmt.verify_files(path, man, sorted(man["files"]), check="sha256")
        assert problem is None, f"{path} looks committed but is damaged: {problem}"
        assert fmt.read_meta(path)["step"] == step
    return committed[0][0] if committed else 0


def test_sigkill_at_random_points_during_saves(tmp_path):
    rng = random.Random(int(os.environ.get("LOOMTRAIN_CRASH_SEED", "20240605")))
    out = str(tmp_path / "run")
    root = os.path.join(out, "checkpoints")
    metrics = os.path.join(out, "metrics.jsonl")
    ref_losses, _ = reference([a for a in overrides(str(tmp_path / "ref")) if not a.startswith("checkpoint.")],
                              str(tmp_path / "ref"))
    ref_samples = _lines(os.path.join(tmp_path, "ref", "samples.jsonl"))

    # Twelve kills: every save phase (hook) and five at random moments (two of them 2-rank jobs).
    plan = [("random", 1), ("phase", "copy"), ("phase", "written"), ("random", 2), ("phase", "manifest"),
            ("phase", "renamed"), ("random", 1), ("phase", "staged"), ("phase", "pointer"), ("random", 2),
            ("phase", "pruning"), ("random", 1)]
    zygote = Zygote()
    expected, history = 0, []
    try:
        for i, (kind, what) in enumerate(plan):
            log = str(tmp_path / f"start{i}.log")
            before = len(_lines(metrics))
            ranks = what if kind == "random" else 1
            fault = None
            if kind == "phase":
                at = expected + 2 + rng.randrange(2)  # a step this start will reach, after >= 1 commit of its own
                fault = f"{what}@{at}"
            job = Job(zygote, out, log, ranks=ranks, fault=fault)
            if kind == "random":
                k, delay = rng.randint(2, 5), rng.uniform(0.0, 0.05)
                deadline = time.monotonic() + 120
                while job.running() and len(_lines(metrics)) < before + k and time.monotonic() < deadline:
                    time.sleep(0.005)
                time.sleep(delay)
                assert job.running(), f"start {i} ended before it could be killed:\n{open(log).read()[-3000:]}"
                job.kill()
            status = job.wait()
            assert status in (signal.SIGKILL, -signal.SIGKILL), \
                f"start {i} ({kind} {what}) ended with {status}, not by SIGKILL:\n{open(log).read()[-3000:]}"
            assert _resumed_step(log) == expected, f"start {i} resumed from the wrong checkpoint"
            new = _lines(metrics)[before:]
            if new:
                assert new[0]["step"] == expected + 1, "step numbers must continue from the checkpoint"
            newest = _check_committed(root)
            if kind == "phase":
                if what in COMMITTED_AT:
                    assert newest == at, f"killed after the commit point ({what}) but step {at} is not committed"
                else:
                    assert newest == at - 1, f"killed before the commit point ({what}) yet step {at} is committed"
                if what == "renamed":  # `latest` still names the previous one: readers must not need it
                    assert fmt.read_latest(root) == fmt.step_dir_name(at - 1)
            history.append((kind, what, expected, newest))
            expected = newest
        log = str(tmp_path / "final.log")
        job = Job(zygote, out, log)
        assert job.wait(timeout=300) == 0, open(log).read()[-3000:]
        assert _resumed_step(log) == expected
    finally:
        zygote.close()
    assert len(history) >= 10 and len({h[3] for h in history}) >= 7, history  # kills at many different steps

    final = {}
    for record in _lines(metrics):  # a step redone after a crash: the later record wins
        final[record["step"]] = record["loss"]
    assert sorted(final) == list(range(1, STEPS + 1))
    for step, loss in final.items():
        ref = ref_losses[step - 1]
        assert abs(loss - ref) <= LOSS_RTOL * abs(ref), f"step {step}: {loss!r} vs uninterrupted {ref!r}"
    samples = {}
    for record in _lines(os.path.join(out, "samples.jsonl")):
        samples[record["step"]] = record["samples"]
    assert [samples[s] for s in sorted(samples)] == [r["samples"] for r in ref_samples]
    assert not [n for n in os.listdir(root) if fmt.is_leftover(n)]  # the last start cleaned up
    assert [s for s, _ in fmt.list_committed(root)] == [STEPS, STEPS - 1]
