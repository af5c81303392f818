"""Shared by the benchmark scripts: run a script's worker under torchrun on loopback.

A benchmark script calls `main_or_worker(parse, worker, nproc_of, threads)`, or builds its own
launches with `torchrun_command` (several per run, say): started by a user it
relaunches itself under `torch.distributed.run` with `nproc_of(args)` ranks; started by torchrun
(RANK is set) it runs `worker(args)`. The script's own options travel in an environment variable
so that torchrun's parser never sees (and misreads) them.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ARGV = "LOOMTRAIN_BENCH_ARGV"


def torchrun_command(script: str, nproc: int, argv: list[str], threads: int | None = None,
                     **env_extra: str) -> tuple[list[str], dict[str, str]]:
    """The torchrun command line (loopback rendezvous, rank 0's output only) and environment that
    run `script` as a worker with the options `argv` (read back with `worker_argv()`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", "--local-ranks-filter=0", os.path.abspath(script)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **{_ARGV: json.dumps(argv)}, **env_extra)
    env["OMP_NUM_THREADS"] = str(threads) if threads else env.get(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // nproc)))
    return cmd, env


def worker_argv() -> list[str]:
    """Inside a worker started by `torchrun_command`: the script's own options."""
    return json.loads(os.environ[_ARGV])


def main_or_worker(script: str, parse, worker, nproc_of, threads: int | None = None) -> None:
    if "RANK" in os.environ:
        worker(parse(worker_argv()))
        return
    args = parse(sys.argv[1:])
    cmd, env = torchrun_command(script, nproc_of(args), sys.argv[1:], threads)
    sys.exit(subprocess.call(cmd, env=env))
