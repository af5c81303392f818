"""The `loomtrain` command line: parsing, one-line errors, `report`, and real launches through the
elastic agent (the hidden `_selfcheck` command: gloo all_reduce, no Trainer)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import torch.distributed as dist

from harness import free_port, launch_env
from loomtrain.errors import LoomError
from loomtrain.launch import cli, spec
from loomtrain.launch.agent import torchrun_argv
from loomtrain.launch.lifecycle import default_rdzv_id

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def loomtrain(*args: str, cwd: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loomtrain.launch", *args], cwd=cwd, env=launch_env(),
                          capture_output=True, text=True, timeout=timeout)


def assert_one_error_line(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("loomtrain: error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("argv", [
    ["run", "c.yaml", "train.max_steps=5", "model.config.hidden_size=64", "--nproc-per-node", "2"],
    ["run", "--nproc-per-node", "2", "c.yaml", "train.max_steps=5", "model.config.hidden_size=64"],
    ["run", "c.yaml", "--nproc-per-node=2", "train.max_steps=5", "model.config.hidden_size=64"],
    ["run", "c.yaml", "train.max_steps=5", "--nproc_per_node", "2", "model.config.hidden_size=64"],
])
def test_flags_before_or_after_config_and_overrides(argv):
    ns = cli.parse_args(argv)
    assert ns.command == "run" and ns.config == "c.yaml" and ns.nproc_per_node == "2"
    assert ns.overrides == ["train.max_steps=5", "model.config.hidden_size=64"]


def test_all_launch_flags():
    ns = cli.parse_args(["run", "--nnodes", "1:4", "-", "--node-rank", "1", "--rdzv-endpoint",
                         "10.0.0.1:29400", "--rdzv-id", "job7", "--max-restarts", "3", "optim.lr=0.1"])
    assert (ns.config, ns.overrides) == (None, ["optim.lr=0.1"])
    assert (ns.nnodes, ns.node_rank, ns.rdzv_endpoint, ns.rdzv_id, ns.max_restarts) == \
        ("1:4", 1, "10.0.0.1:29400", "job7", 3)
    assert ns.nproc_per_node == "1"  # default


@pytest.mark.parametrize("argv,config,overrides", [
    (["run"], None, []),
    (["run", "-"], None, []),
    (["run", "-", "train.seed=3"], None, ["train.seed=3"]),
    (["run", "train.seed=3", "data.source=synthetic"], None, ["train.seed=3", "data.source=synthetic"]),
    (["run", "dir/x=y.yaml"], "dir/x=y.yaml", []),
    (["run", "c.yaml", "optim.lr=-1e-3"], "c.yaml", ["optim.lr=-1e-3"]),
])
def test_config_may_be_omitted_or_dash(argv, config, overrides):
    ns = cli.parse_args(argv)
    assert (ns.config, ns.overrides) == (config, overrides)


@pytest.mark.parametrize("argv,needle", [
    (["run", "a.yaml", "b.yaml"], "'b.yaml' is not an override"),
    (["run", "--bogus"], "unrecognized arguments: --bogus"),
    (["frobnicate"], "unknown command 'frobnicate'"),
    (["--nproc-per-node", "2", "run"], "expected a command first"),
])
def test_usage_errors_are_loom_errors(argv, needle):
    with pytest.raises(LoomError, match=needle.replace("(", r"\(")):
        cli.parse_args(argv)


def test_launch_flag_checks(capsys):
    assert cli.main(["run", "-", "--nnodes", "2"]) == 2
    assert "--rdzv-endpoint" in capsys.readouterr().err
    assert cli.main(["run", "-", "--nnodes", "3:2"]) == 2
    assert "MIN:MAX" in capsys.readouterr().err
    assert cli.main(["run", "-", "--nproc-per-node", "zero"]) == 2
    assert "--nproc-per-node=zero" in capsys.readouterr().err


def test_worker_detection():
    assert not spec.in_worker({})
    assert spec.in_worker({"TORCHELASTIC_RUN_ID": "x"})
    assert spec.in_worker({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


def test_single_node_rendezvous_is_loopback():
    argv = torchrun_argv(spec.LaunchSpec(nproc_per_node=4), ["run", "-"])
    endpoint = argv[argv.index("--rdzv-endpoint") + 1]
    host, port = endpoint.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    assert argv[argv.index("--rdzv-backend") + 1] == "c10d"
    assert argv[argv.index("--local-addr") + 1] == "127.0.0.1"
    assert argv[argv.index("--redirects") + 1] == "1:3,2:3,3:3"  # only local rank 0 on the console
    assert argv[-4:] == ["--module", "loomtrain.launch", "run", "-"]
    multi = torchrun_argv(spec.LaunchSpec(nproc_per_node=2, nnodes="2", rdzv_endpoint="h:1", rdzv_id="job7"),
                          ["run", "-"])
    assert multi[multi.index("--rdzv-endpoint") + 1] == "h:1" and "--local-addr" not in multi
    assert multi[multi.index("--rdzv-id") + 1] == "job7"


def test_rendezvous_id_is_unique_per_launch_unless_shared():
    one = [torchrun_argv(spec.LaunchSpec(nproc_per_node=1, rdzv_endpoint="127.0.0.1:29400"), ["run", "-"])
           for _ in range(2)]
    ids = {argv[argv.index("--rdzv-id") + 1] for argv in one}
    assert len(ids) == 2 and "loomtrain" not in ids  # a second job cannot join the first one's rendezvous
    assert default_rdzv_id("mine", 4) == "mine"
    assert default_rdzv_id(None, 2, {"SLURM_JOB_ID": "812"}) == "loomtrain-812"  # what every node shares
    with pytest.raises(spec.UsageError, match="--rdzv-id"):
        default_rdzv_id(None, 2, {})


def test_busy_rendezvous_endpoint_is_one_line(tmp_path):
    # Another job's rendezvous store already listens on the endpoint.
    port = free_port()
    other = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    try:
        # it fails at once instead of waiting for the rendezvous timeout (600 s): the subprocess
        # timeout is the bound (no wall-clock assertion: at load 30 on 2 cores importing torch
        # alone can take 30 s)
        proc = loomtrain("_selfcheck", "--nproc-per-node", "2", "--rdzv-endpoint", f"127.0.0.1:{port}",
                         "--log-dir", str(tmp_path), cwd=str(tmp_path), timeout=240)
    finally:
        del other
    assert "selfcheck ok" not in proc.stdout  # it did not run inside the other job's rendezvous
    assert_one_error_line(proc, 2, f"--rdzv-endpoint 127.0.0.1:{port} is in use")


def test_help_lists_commands():
    for argv in (["--help"], ["run", "--help"]):
        proc = loomtrain(*argv, cwd=ROOT)
        assert proc.returncode == 0 and "report" in proc.stdout, proc.stdout


# ------------------------------------------------------------------- bad configs, one line each
def test_unknown_key(tmp_path):
    proc = loomtrain("run", "train.max_stepz=5", cwd=str(tmp_path))
    assert_one_error_line(proc, 2, "train.max_stepz", "max_steps")


def test_bad_type(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  max_steps: lots\n")
    proc = loomtrain("run", str(cfg), cwd=str(tmp_path))
    assert_one_error_line(proc, 2, "train.max_steps", "expected int")


def test_degrees_do_not_match_world_size(tmp_path):
    proc = loomtrain("run", "--nproc-per-node", "2", "parallel.dp_shard=3", cwd=str(tmp_path))
    assert_one_error_line(proc, 2, "world size is 2")


def test_missing_data_path(tmp_path):
    proc = loomtrain("run", "-", f"data.source={tmp_path / 'nope.jsonl'}", cwd=str(tmp_path))
    assert_one_error_line(proc, 2, "data.source", "nope.jsonl")


def test_missing_config_file(tmp_path):
    proc = loomtrain("run", str(tmp_path / "absent.yaml"), "--nproc-per-node", "2", cwd=str(tmp_path))
    assert_one_error_line(proc, 2, "config file not found", "absent.yaml")


# --------------------------------------------------------------------------------------- report
def _write_metrics(run_dir) -> str:
    rows = [{"step": s, "loss": 4.0 - s * 0.5, "tokens_per_s": 1000.0 * s, "mfu": 0.1 * s,
             "peak_mem_gb": 0.5 + s / 10} for s in (1, 2, 3)]
    rows.append({"step": 3, "loss": 2.25, "tokens_per_s": 3000.0, "mfu": 0.3, "peak_mem_gb": 0.8})
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path, "w") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')  # torn last line
    return path


def test_report_table(tmp_path, capsys):
    _write_metrics(str(tmp_path))
    assert cli.main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in out.splitlines()[1:])
    assert table["steps"].startswith("3 (step 1 to 3)")
    assert table["loss first"].startswith("3.5000") and table["loss last"].startswith("2.2500")
    assert table["tokens/s mean"].startswith("2,500")  # steps 2 and 3, the later step-3 record
    assert table["MFU mean"].startswith("25.00%")
    assert table["peak memory"] == "0.80 GB"


def test_report_plot(tmp_path, capsys, monkeypatch):
    jsonl = _write_metrics(str(tmp_path))
    calls = []

    def plot_metrics(src, png):
        calls.append((src, png))
        open(png, "wb").close()
        return png

    monkeypatch.setattr("loomtrain.runtime.metrics.plot_metrics", plot_metrics)
    assert cli.main(["report", "--plot", str(tmp_path)]) == 0
    png = os.path.join(str(tmp_path), "metrics.png")
    assert calls == [(jsonl, png)]
    assert capsys.readouterr().out.splitlines()[-1] == f"plot: {png}"


def test_report_missing_metrics(tmp_path):
    proc = loomtrain("report", str(tmp_path), cwd=str(tmp_path))
    assert_one_error_line(proc, 2, "metrics.jsonl")


# ------------------------------------------------------------------- real launches (agent path)
def test_selfcheck_launch(tmp_path):
    proc = loomtrain("_selfcheck", "--nproc-per-node", "2", "--log-dir", str(tmp_path), cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "selfcheck ok: world_size=2 sum=3 master=127.0.0.1:" in proc.stdout
    assert proc.stdout.count("selfcheck ok") == 1  # rank 1 is quiet


def test_worker_loom_error_is_one_line(tmp_path):
    proc = loomtrain("_selfcheck", "--fail-rank", "0", "--nproc-per-node", "2", "--log-dir", str(tmp_path),
                     cwd=str(tmp_path))
    assert_one_error_line(proc, 1, "loomtrain: error: rank 0: selfcheck: injected user error on rank 0")


def test_worker_crash_names_rank_exception_and_log(tmp_path):
    proc = loomtrain("_selfcheck", "--nproc-per-node", "2", "--crash-rank", "1",
                     "--log-dir", str(tmp_path / "logs"), cwd=str(tmp_path))
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("loomtrain:")]
    assert lines[0] == "loomtrain: error: rank 1 failed: RuntimeError: selfcheck: injected crash on rank 1"
    log = lines[1].rsplit(": ", 1)[1]
    assert lines[1].startswith("loomtrain: full log of rank 1: ") and log.startswith(str(tmp_path / "logs"))
    assert "injected crash on rank 1" in open(log).read()
