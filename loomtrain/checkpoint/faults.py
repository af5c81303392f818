"""Fault injection at named points of a checkpoint save, for the crash and failure tests.

LOOMTRAIN_CKPT_FAULT="PHASE@STEP[@RANK][=ACTION],..." acts when the save of STEP reaches PHASE
(copy, staged, written, manifest, renamed, pointer, pruning). ACTION is `kill` (the default:
SIGKILL this process; with LOOMTRAIN_CKPT_FAULT_SCOPE=job the launcher and all workers, as a lost
node would), `sleep:SECONDS` (a slow disk or copy), or `raise` (an OSError, as a full disk gives).
Unset, the hook is None and costs nothing.
"""
from __future__ import annotations

import os
import signal
import time

import psutil

FAULT_ENV = "LOOMTRAIN_CKPT_FAULT"
FAULT_SCOPE_ENV = "LOOMTRAIN_CKPT_FAULT_SCOPE"


def fault_hook(rank: int):
    """A `fault(phase, step)` callable from LOOMTRAIN_CKPT_FAULT, or None when it is unset."""
    spec = os.environ.get(FAULT_ENV, "").strip()
    if not spec:
        return None
    points: dict[tuple[str, int], str] = {}
    for item in spec.split(","):
        where, _, action = item.strip().partition("=")
        parts = where.split("@")
        if len(parts) >= 2 and (len(parts) < 3 or int(parts[2]) == rank):
            points[(parts[0], int(parts[1]))] = action or "kill"

    whole_job = os.environ.get(FAULT_SCOPE_ENV) == "job"

    def fault(phase: str, step: int) -> None:
        action = points.get((phase, step))
        if action is None:
            return
        if action.startswith("sleep:"):
            time.sleep(float(action[len("sleep:"):]))
        elif action == "raise":
            raise OSError(f"injected fault at {phase} of step {step}")
        else:
            if whole_job:  # the launcher (our parent) and every worker at once, as a lost node would
                _kill_launcher_and_workers()
            os.kill(os.getpid(), signal.SIGKILL)

    return fault


def _kill_launcher_and_workers() -> None:
    """SIGKILL the parent (torchrun's agent) and all its other children (each worker runs in a
    session of its own, so a process-group kill would miss them)."""
    try:
        agent = psutil.Process(os.getppid())
        for proc in agent.children(recursive=True) + [agent]:
            if proc.pid != os.getpid():
                proc.kill()
    except Exception:  # noqa: BLE001 -- a test hook: at least this process dies below
        pass
