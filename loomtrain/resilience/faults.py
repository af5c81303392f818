"""Injected faults (`fault.*` keys) for tests and demos: a slow rank, a slow link, a hang.

Slowness is injected as *real extra CPU work* proportional to the work the rank did in the step
(`slow_factor` 1.3 burns 30% more CPU time on top of what the step used up to its optimizer step), so
it is unambiguous against scheduling noise (`slow_until_step`: the rank recovers after that step) on a loaded machine: the straggler monitor measures
the training thread's CPU time, which a busy neighbour does not inflate, and a slower chip would show exactly
this. A slow link delays each collective of the named group's probes by `slow_link_s` (the
training collectives themselves are not slowed). A hang stops `hang_rank` at the start of
`hang_step`, before that step's first collective, so the other ranks wait inside it. A kill
SIGKILLs `kill_rank` at the start of `kill_step`, in the first attempt only (torchelastic's
`TORCHELASTIC_RESTART_COUNT` is 0), so that under `--max-restarts` the restarted group runs through.
With `kill_node` it SIGKILLs its launcher (the elastic agent, its parent) first: the whole node is
gone, its other workers exit through their `OrphanGuard`, and an elastic rendezvous
(`--nnodes MIN:MAX`) goes on without that node.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from loomtrain.config import FaultConfig
from loomtrain.hooks import Hook, LoopState
from loomtrain.resilience.clock import compute_cpu_s


def parse_ranks(text: str) -> tuple[int, ...]:
    """"2,3" -> (2, 3); "" -> ()."""
    return tuple(sorted(int(part) for part in text.replace(" ", "").split(",") if part))


def restart_count(env: dict | None = None) -> int:
    """How many times torchelastic restarted this worker group (0 in the first attempt, or outside it)."""
    try:
        return int((os.environ if env is None else env).get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def burn_cpu(seconds: float) -> None:
    """Spin until this thread has used `seconds` more CPU time."""
    end = compute_cpu_s() + seconds
    x = 0
    while compute_cpu_s() < end:
        for _ in range(2000):
            x += 1


@dataclass(frozen=True)
class Faults:
    """The faults that apply to one rank."""

    rank: int
    slow_factor: float = 1.0
    slow_until_step: int = 0  # the slowness ends after this step (0: never)
    slow_group: tuple[int, ...] = ()
    slow_link_s: float = 0.0
    hang_step: int = 0  # 0: no hang on this rank
    kill_step: int = 0  # 0: no kill on this rank (or not in this attempt)
    kill_node: bool = False  # the kill takes the launcher (the node's agent) with it

    @classmethod
    def from_config(cls, cfg: FaultConfig, rank: int, attempt: int | None = None) -> "Faults":
        attempt = restart_count() if attempt is None else attempt
        return cls(rank=rank, slow_factor=cfg.slow_factor if cfg.slow_rank == rank else 1.0,
                   slow_until_step=cfg.slow_until_step,
                   slow_group=parse_ranks(cfg.slow_group), slow_link_s=cfg.slow_link_s,
                   hang_step=cfg.hang_step if cfg.hang_rank == rank else 0,
                   kill_step=cfg.kill_step if cfg.kill_rank == rank and attempt == 0 else 0,
                   kill_node=cfg.kill_node)

    @property
    def active(self) -> bool:
        return self.slow_factor > 1.0 or self.hang_step > 0 or self.kill_step > 0

    def link_delay(self, group_ranks) -> float:
        """Seconds to add to each probe collective on the group of `group_ranks`."""
        slow = self.slow_group and tuple(sorted(group_ranks)) == self.slow_group
        return self.slow_link_s if slow else 0.0


class FaultInjector(Hook):
    """Applies this rank's compute faults on the loop's hook points."""

    def __init__(self, faults: Faults):
        self.faults = faults
        self._cpu0 = 0.0

    def before_step(self, loop: LoopState) -> None:
        if self.faults.kill_step and loop.step + 1 == self.faults.kill_step:
            what = "its node's launcher and itself" if self.faults.kill_node else "itself"
            print(f"loomtrain: fault: rank {self.faults.rank} kills {what} (SIGKILL) at step {loop.step + 1}",
                  flush=True)
            if self.faults.kill_node:
                os.kill(os.getppid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        if self.faults.hang_step and loop.step + 1 == self.faults.hang_step:
            print(f"loomtrain: fault: rank {self.faults.rank} hangs at step {loop.step + 1}", flush=True)
            while True:  # injected hang: never returns; the watchdog ends the job
                time.sleep(1.0)
        self._cpu0 = compute_cpu_s()

    def after_optimizer_step(self, loop: LoopState) -> None:
        # the whole step's work so far (forward, backward, clipping, optimizer), before the
        # straggler monitor, registered later, closes the step's measurement
        if self.faults.slow_factor > 1.0 and not 0 < self.faults.slow_until_step < loop.step + 1:
            burn_cpu((self.faults.slow_factor - 1.0) * (compute_cpu_s() - self._cpu0))
