"""What every part of the launcher shares: the usage error, the argument parser that raises it,
whether this process is a torchrun worker, and the checked launch flags (`LaunchSpec`).

Imports nothing of torch, so that parsing a command line stays instant.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from loomtrain.errors import LoomError

_WORKER_ENV = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "RANK", "WORLD_SIZE")


class UsageError(LoomError):
    """Bad command-line usage (printed as one line, exit code 2, like any LoomError)."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are `UsageError`s: one `loomtrain: error:` line, exit code 2."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def in_worker(env=None) -> bool:
    """True when torchrun (ours or the user's) started this process."""
    env = os.environ if env is None else env
    return any(name in env for name in _WORKER_ENV)


@dataclass
class LaunchSpec:
    """The launch flags, checked (see `agent.torchrun_argv` for how they become torchrun's)."""

    nproc_per_node: int
    nnodes: str = "1"  # N or MIN:MAX
    node_rank: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    max_restarts: int = 0
    log_dir: str | None = None
    verbose: bool = False
    # After the first SIGTERM/SIGINT: repeats within `stop_grace_s` are absorbed, and the workers
    # get up to `shutdown_timeout_s` to commit their checkpoint before the agent SIGKILLs them.
    stop_grace_s: float = 30.0
    shutdown_timeout_s: int = 300


def parse_nnodes(nnodes: str) -> tuple[int, int]:
    """`--nnodes` N or MIN:MAX -> (min, max)."""
    parts = str(nnodes).split(":")
    try:
        lo, hi = int(parts[0]), int(parts[-1])
    except ValueError:
        lo = hi = 0
    if len(parts) > 2 or not 0 < lo <= hi:
        raise UsageError(f"--nnodes={nnodes}: expected N or MIN:MAX with 0 < MIN <= MAX")
    return lo, hi


def one_line(text: str, limit: int = 400) -> str:
    line = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 3] + "..."
