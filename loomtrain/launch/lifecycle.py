"""The launcher's side of a job's life: stop signals, and a rendezvous no other job can join.

Stop signals: torch's agent raises on every SIGTERM/SIGINT it gets, forwards it to the workers and
SIGKILLs them 30 s later; a second copy of the same request (schedulers signal every process, and
people press Ctrl-C twice) interrupts that shutdown, sends yet another signal and leaves the
workers behind. So the launcher handles those two signals itself (`AgentSignals`): the first is
passed to the agent, which forwards it; repeats within the grace period are absorbed; the
workers get `shutdown_timeout_s` to commit their checkpoint (see `loomtrain.checkpoint.signals`
for the workers' side of the same rule).

Rendezvous: every launch gets its own rendezvous id (a uuid on one node; on several nodes the id
all of them share: `--rdzv-id`, or the scheduler's job id), so a second job can never join the
first one's rendezvous; a node that must host the rendezvous store binds its endpoint before the
agent starts, so an endpoint in use is one line instead of a hang.
"""
from __future__ import annotations

import datetime
import os
import signal
import threading
import time
import uuid

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

from loomtrain.errors import LoomError
from loomtrain.launch.spec import LaunchSpec, UsageError, one_line, parse_nnodes

# Job ids that every node of one job shares, set by schedulers.
_SCHEDULER_JOB_IDS = ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID")


def default_rdzv_id(rdzv_id: str | None, max_nodes: int, env=None) -> str:
    """The rendezvous id: the user's; on one node a fresh uuid (nobody else needs to know it);
    on several nodes the scheduler's job id, which every node of the job sees. A constant would
    let a second job on the same endpoint join the first one's rendezvous and hang there."""
    if rdzv_id:
        return rdzv_id
    if max_nodes == 1:
        return uuid.uuid4().hex
    env = os.environ if env is None else env
    for name in _SCHEDULER_JOB_IDS:
        if env.get(name):
            return f"loomtrain-{env[name]}"
    raise UsageError("more than one node needs --rdzv-id ID, the same on every node of the job and "
                     "different from any other job on that --rdzv-endpoint (e.g. the scheduler's job id)")


class AgentSignals:
    """The launcher's SIGTERM/SIGINT handler in place of torch's (which raises on every copy):
    the first raises torch's `SignalException`, so the agent forwards the signal to the workers
    and waits for them; copies within `grace_s` are absorbed; one after that raises again (the
    agent then signals the workers once more, and they stop without committing)."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.first_at: float | None = None
        self._old: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._on_signal)

    def restore(self) -> None:
        """Put the previous handlers back, unless a stop request came: its late copies must not
        kill the launcher on its way out (it exits right after)."""
        if self.first_at is not None:
            return
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}

    def _on_signal(self, signum, frame) -> None:
        now = time.monotonic()
        if self.first_at is not None and now - self.first_at <= self.grace_s:
            return
        self.first_at = self.first_at or now
        raise SignalException(f"Process {os.getpid()} got signal: {signum}", sigval=signal.Signals(signum))


def without_stop_signals(signals: str) -> str:
    """torchrun's signals_to_handle minus SIGTERM/SIGINT, which `AgentSignals` handles."""
    rest = [name.strip() for name in signals.split(",") if name.strip() not in ("SIGTERM", "SIGINT", "")]
    return ",".join(rest) or "SIGHUP"


def hold_endpoint(spec: LaunchSpec):
    """On the node that hosts the rendezvous store (one node, or node rank 0 of a static
    rendezvous), bind `--rdzv-endpoint` now: the agent then shares this store (multi-tenant,
    same process) instead of quietly becoming a client of another job's. Returns the store to
    keep alive during the launch, or None when another node hosts it."""
    min_nodes, max_nodes = parse_nnodes(spec.nnodes)
    if not spec.rdzv_endpoint or not (max_nodes == 1 or spec.node_rank == 0):
        return None
    host, port = parse_rendezvous_endpoint(spec.rdzv_endpoint, default_port=29400)
    try:
        return dist.TCPStore(host, port, is_master=True, multi_tenant=True, wait_for_workers=False,
                             timeout=datetime.timedelta(seconds=60))
    except (RuntimeError, ValueError, OSError) as exc:
        raise LoomError(f"--rdzv-endpoint {spec.rdzv_endpoint} is in use or not an address of this machine "
                        f"(another job's rendezvous? pick a free port): {one_line(str(exc), 160)}") from None
