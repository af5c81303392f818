"""The resilience components a training run registers, built from its config in one place, so the
trainer only says when: `start_guards` before the process group exists (a hang can start there),
`components` once the loop's parts exist (they time, check and stop the loop)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from loomtrain.config import Config
from loomtrain.hooks import Hook
from loomtrain.resilience.faults import FaultInjector, Faults
from loomtrain.resilience.orphan import OrphanGuard
from loomtrain.resilience.rebalance import Rebalancer
from loomtrain.resilience.restart import RestartRecorder
from loomtrain.resilience.straggler import StragglerMonitor, hetero_work
from loomtrain.resilience.watchdog import Watchdog


@dataclass
class Guards:
    watchdog: Watchdog | None  # multi-process runs: start-up, step and checkpoint deadlines
    orphan: OrphanGuard | None  # under torchelastic: this worker ends if its launcher dies


def start_guards(cfg: Config, environ: dict | None = None) -> Guards:
    """Under a multi-process launch, before anything can hang: the hang watchdog (its start-up
    deadline first) and, under torchelastic, the orphan guard. Read from the launcher's variables,
    since the process group does not exist yet."""
    environ = os.environ if environ is None else environ
    world = int(environ.get("WORLD_SIZE", "1"))
    watchdog = None
    if world > 1:
        watchdog = Watchdog(
            cfg.resilience, rank=int(environ.get("RANK", "0")), world_size=world,
            output_dir=cfg.train.output_dir, checkpoint_every=cfg.checkpoint.every,
            max_steps=cfg.train.max_steps, quiet=bool(environ.get("LOOMTRAIN_LAUNCHER"))).start()
    orphan = OrphanGuard(cfg.resilience.orphan_check_s).start() if "TORCHELASTIC_RUN_ID" in environ else None
    return Guards(watchdog, orphan)


def components(cfg: Config, *, rank: int, world_size: int, is_main: bool, device_type: str, mesh_root: Any,
               resumed_from: Callable[[], str | None], hetero: Any, loader: Any) -> list[Hook]:
    """Injected faults (`fault.*`), the restart record, and the straggler monitor with its
    response (`resilience.*`), in the order they join the loop. `hetero`: the heterogeneous
    scheduler, or None; `loader`: the timed data loader the monitor reads data waits from."""
    hooks: list[Hook] = []
    faults = Faults.from_config(cfg.fault, rank)
    if faults.active:
        hooks.append(FaultInjector(faults))
    hooks.append(RestartRecorder(cfg.train.output_dir, world_size, is_main, resumed_from))
    work = (lambda: hetero_work(hetero.last_plan, hetero.executor.index)) if hetero is not None else (lambda: 1.0)
    rebalancer = Rebalancer(hetero) if hetero is not None and cfg.resilience.straggler == "rebalance" else None
    hooks.append(StragglerMonitor(
        cfg.resilience, rank=rank, world_size=world_size, device_type=device_type, mesh_root=mesh_root,
        output_dir=cfg.train.output_dir, is_main=is_main, work=work, loader=loader, faults=faults,
        checkpoint_every=cfg.checkpoint.every, rebalancer=rebalancer))
    return hooks
