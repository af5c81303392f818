"""Elastic restarts seen from the workers: the `restart` event, and when a straggler is worth one.

`RestartRecorder`: in a worker group that torchelastic restarted (`--max-restarts`), rank 0 writes
one `restart` event to `{train.output_dir}/events.jsonl` and prints one line saying which attempt
this is, the step it resumed from and the world size before and after: with `--nnodes MIN:MAX`
the rendezvous may have formed without a node that died, and the same global batch is then split
over fewer ranks (more gradient-accumulation micro-steps each). The world size before is read from
the resumed checkpoint's layout, the only record the new group has of the old one.

`restart_worth_it` (`resilience.straggler=restart`): a confirmed straggler slows every remaining
step to its pace; restarting without its node costs `restart_cost_s` once, and the job then runs
at the others' pace on fewer ranks. The decision is plain arithmetic over figures the monitor
already has, kept here as a pure function so that it can be tested on its own.
"""
from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from typing import Callable

import torch.distributed as dist

from loomtrain.checkpoint import format as fmt
from loomtrain.hooks import Hook, LoopState
from loomtrain.resilience.faults import restart_count


def _checkpoint_world_size(path: str | None) -> int | None:
    if not path:
        return None
    try:
        return int((fmt.read_meta(path).get("layout") or {}).get("world_size"))
    except Exception:  # noqa: BLE001 -- an unreadable figure only leaves it out of the event
        return None


class RestartRecorder(Hook):
    """Rank 0 of a restarted group: one `restart` event and one console line at the start of fit."""

    def __init__(self, output_dir: str, world_size: int, is_main: bool, resumed_from: Callable[[], str | None]):
        self.output_dir = output_dir
        self.world_size = world_size
        self.is_main = is_main
        self.resumed_from = resumed_from
        self.record: dict | None = None

    def begin_fit(self, loop: LoopState) -> None:
        attempt = restart_count()
        if attempt == 0 or not self.is_main:
            return
        path = self.resumed_from()
        before = _checkpoint_world_size(path)
        resized = f"{before} -> {self.world_size} ranks" if before and before != self.world_size \
            else f"{self.world_size} ranks"
        where = f"resumed from step {loop.step}" if path else "no committed checkpoint, started over"
        evidence = f"attempt {attempt + 1}, {where}, {resized}"
        self.record = {"event": "restart", "step": loop.step, "attempt": attempt + 1,
                       "world_size": self.world_size, "from_world_size": before, "checkpoint": path,
                       "evidence": evidence}
        print(f"loomtrain: restart: {evidence}", flush=True)
        os.makedirs(self.output_dir, exist_ok=True)
        with open(os.path.join(self.output_dir, "events.jsonl"), "a", encoding="utf-8") as fh:
            fh.write(json.dumps(self.record) + "\n")


# torch's dynamic rendezvous defaults: a dead node is dropped after 3 missed 5 s heartbeats, and a
# round below the maximum node count completes 30 s after reaching the minimum (its "last call").
RENDEZVOUS_S = 3 * 5.0 + 30.0
# A worker that stops for an elastic restart exits with this code (EX_TEMPFAIL: try again).
RESTART_EXIT_CODE = 75
# a file the launcher names for its workers: the attempts that ended in a straggler restart, one
# number per line, so the launcher's restart line names that cause even when its agent first saw
# a rank it stopped itself (SIGTERM) rather than one that exited with RESTART_EXIT_CODE
RESTART_NOTES_ENV = "LOOMTRAIN_RESTART_NOTES"


def note_straggler_restart(env: dict | None = None) -> None:
    """Records this attempt as a straggler restart in the launcher's file (`RESTART_NOTES_ENV`)."""
    env = os.environ if env is None else env
    path = env.get(RESTART_NOTES_ENV)
    if path:
        try:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(f"{restart_count(env)}\n")
        except OSError:
            pass  # only the launcher's wording depends on it


def straggler_attempts(path: str | None) -> set[int]:
    """The attempts (0 = the first) that `note_straggler_restart` recorded in `path`."""
    try:
        with open(path or "", encoding="utf-8") as fh:
            return {int(line) for line in fh if line.strip().isdigit()}
    except OSError:
        return set()


def process_age_s() -> float | None:
    """Seconds since this process started (Linux `/proc/self/stat`), None elsewhere."""
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime", encoding="ascii") as fh:
            uptime = float(fh.read().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class RestartPlan:
    """The arithmetic behind `resilience.straggler=restart` for one confirmed straggler."""

    restart: bool
    why: str  # the arithmetic, or what rules a restart out
    step_s: float = 0.0  # now, at the straggler's pace
    step_s_after: float = 0.0  # the others' pace, the global batch spread over fewer ranks
    saved_s: float = 0.0  # over the remaining steps
    cost_s: float = 0.0


def restart_worth_it(*, slowdown: float, step_s: float, world: int, excluded: int, remaining_steps: int,
                     cost_s: float, nodes: int, min_nodes: int, restarts_left: int) -> RestartPlan:
    """Whether stopping now and restarting without the straggler's node (`excluded` of `world`
    ranks) saves more time over the remaining steps than the restart costs.

    Synchronous training runs at the slowest rank's pace, `step_s`. Without it, the rest run at
    their own pace, `step_s / (1 + slowdown)`, but carry the whole global batch on
    `world - excluded` ranks: `step_s_after = step_s / (1 + slowdown) * world / (world - excluded)`.
    So a node of 2 among 4 ranks is worth excluding only when its rank is more than 2x slow, and
    then only if `remaining_steps * (step_s - step_s_after) > cost_s`."""
    if restarts_left < 1:
        return RestartPlan(False, "no restart left (--max-restarts)")
    if excluded >= world or nodes - 1 < max(1, min_nodes):
        return RestartPlan(False, f"the rendezvous needs {max(1, min_nodes)} node(s) and only {nodes - 1} "
                                  "would be left (--nnodes MIN:MAX)")
    after = step_s / (1.0 + slowdown) * world / (world - excluded)
    saved = remaining_steps * (step_s - after)
    why = (f"{remaining_steps} steps left x ({step_s:.3f} s/step now - {after:.3f} s/step on "
           f"{world - excluded} ranks at the others' pace) = {saved:.1f} s saved "
           f"{'>' if saved > cost_s else '<='} {cost_s:.1f} s restart cost")
    return RestartPlan(saved > cost_s, why, step_s, after, saved, cost_s)



def straggler_restart(*, step: int, max_steps: int, rank: int, slowdown: float, step_s: float, nodes: list[str],
                      hosts: list[str], cost_s: float, env=None) -> tuple[RestartPlan, list[int], str, dict]:
    """A confirmed straggler under `resilience.straggler=restart` -> (the plan, the ranks of its node,
    the console line, the `restart` event record). The rendezvous minimum and the restarts left
    come from the environment: `LOOMTRAIN_MIN_NODES` (set by `loomtrain run`) and torchelastic's
    `TORCHELASTIC_MAX_RESTARTS` / `TORCHELASTIC_RESTART_COUNT`."""
    env = os.environ if env is None else env
    world = len(nodes)
    excluded = [r for r in range(world) if nodes[r] == nodes[rank]]
    plan = restart_worth_it(slowdown=slowdown, step_s=step_s, world=world, excluded=len(excluded),
                            remaining_steps=max_steps - step, cost_s=cost_s, nodes=len(set(nodes)),
                            min_nodes=int(env.get("LOOMTRAIN_MIN_NODES", "1")),
                            restarts_left=int(env.get("TORCHELASTIC_MAX_RESTARTS", "0"))
                            - int(env.get("TORCHELASTIC_RESTART_COUNT", "0")))
    node = f"node {nodes[rank]} ({hosts[rank]}, ranks {','.join(map(str, excluded))})"
    if not plan.restart:
        return plan, excluded, f"loomtrain: straggler restart: not now, {node} stays: {plan.why}", {}
    line = (f"loomtrain: straggler restart: rank {rank} is {slowdown:.0%} slow; committing step {step} "
            f"and restarting without {node}: {plan.why}")
    rec = {"event": "restart", "reason": "straggler", "step": step, "rank": rank, "host": hosts[rank],
           "node": nodes[rank], "exclude": excluded, "slowdown": round(slowdown, 4), "step_s": round(plan.step_s, 6),
           "step_s_after": round(plan.step_s_after, 6), "saved_s": round(plan.saved_s, 3),
           "cost_s": round(plan.cost_s, 3), "evidence": plan.why}
    return plan, excluded, line, rec

def leave_for_restart(exclude: list[int], rank: int) -> None:
    """After the loop stopped for `resilience.straggler=restart` and the final checkpoint is
    committed: hand the job back to torch's elastic agent without the straggler's node.

    A rank on that node sends SIGTERM to its own launcher (the agent, its parent). An agent stopped
    by a signal leaves the rendezvous open (closing it would end the whole job), and its heartbeats
    stop, so the rendezvous drops the node. Every rank then exits with `RESTART_EXIT_CODE`: the
    other nodes' agents see failed workers and restart them, and their next rendezvous forms
    without the excluded node (`--nnodes MIN:MAX`); the new group resumes from the checkpoint."""
    note_straggler_restart()  # before the barrier: the launcher must know why before it sees an exit
    if rank in exclude:  # before the barrier: once past it, the agent may stop this rank any moment
        print(f"loomtrain: straggler restart: this node (ranks {','.join(map(str, exclude))}) leaves the job; "
              f"its launcher (pid {os.getppid()}) is stopped with SIGTERM", flush=True)
    if dist.is_initialized():
        dist.barrier()  # every rank is past the final commit before any launcher hears of it
    if rank in exclude:
        os.kill(os.getppid(), signal.SIGTERM)
    raise SystemExit(RESTART_EXIT_CODE)
