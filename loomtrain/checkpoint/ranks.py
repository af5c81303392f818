"""How the checkpointer's ranks agree, on its own gloo group (or alone, `group=None`).

Every decision that changes what a rank does next (which checkpoint to load, whether a directory
could be taken, whether to commit after an error) is made the same on every rank, so no rank
waits in a collective the others skipped. The agreement at exit goes through the job's store,
not a collective: after an exception a rank may be stuck in one, and the others must not hang.
"""
from __future__ import annotations

import time

import torch.distributed as dist

# How long a rank that raised waits for the others to agree on a final checkpoint; if they do not
# all arrive (they are stuck in a collective, or dead) it gives up and exits without saving.
EXIT_AGREEMENT_TIMEOUT_S = 30.0


def bcast(obj, group):
    """Rank 0's `obj` on every rank of `group`."""
    if group is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def agree(problem: str | None, group) -> str | None:
    """The first rank's problem, the same on every rank (None: every rank is fine)."""
    if group is None:
        return problem
    found: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(found, problem, group=group)
    return next((p for p in found if p is not None), None)


def on_main_then_everywhere(fn, is_main: bool, group) -> None:
    """Run `fn` on rank 0; if it raises, raise the same error on every rank."""
    err = None
    if is_main:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 -- re-raised on every rank below
            err = exc
    err = bcast(err, group)
    if err is not None:
        raise err


def agree_on_exit(consistent: bool, step: int, *, group, store, run_id: str) -> bool:
    """Every rank reports (consistent, step) through the job's store; True only if all of them
    arrive within the timeout, consistent and at the same step (no collective that could hang).
    Without a store (a process group the caller created) no agreement is possible: False."""
    if group is None:
        return consistent
    if store is None:
        return False
    world, rank = dist.get_world_size(), dist.get_rank()
    prefix = f"loomtrain/checkpoint/{run_id}/exit"
    store.set(f"{prefix}/{rank}", f"{int(consistent)}:{step}")
    store.add(f"{prefix}/count", 1)
    deadline = time.monotonic() + EXIT_AGREEMENT_TIMEOUT_S
    while store.add(f"{prefix}/count", 0) < world:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    values = [store.get(f"{prefix}/{r}").decode() for r in range(world)]
    return all(v == f"1:{step}" for v in values)
