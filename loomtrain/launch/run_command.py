"""`loomtrain run`: check the launch flags and the config, then start
the workers through torch's elastic agent; inside a worker, train.

Each worker runs `python -m loomtrain.launch run CONFIG [overrides]`, sees the env torchrun sets
and trains (`Trainer(cfg).fit()`) instead of launching again. The same happens under a user's own
`torchrun -m loomtrain.launch run ...`.
"""
from __future__ import annotations

import argparse
import os

from loomtrain.config import load_config, replace as replace_config
from loomtrain.launch.agent import launch, launch_spec, set_omp_threads, worker_main
from loomtrain.launch.spec import in_worker
from loomtrain.resilience.faults import restart_count
from loomtrain.resilience.restart import leave_for_restart
from loomtrain.runtime.preflight import preflight
from loomtrain.runtime.trainer import Trainer


def _train(config: str | None, overrides: list[str]) -> None:
    """Worker body of `run`: load the config and train (the Trainer runs `preflight` itself).

    In a group that torchelastic restarted (`--max-restarts`) a run that saves checkpoints
    resumes from its last committed one (`checkpoint.resume=auto`) instead of starting over. A loop
    stopped by `resilience.straggler=restart` ends here in an exit for the elastic agent."""
    cfg = load_config(config, overrides)
    if restart_count() > 0 and cfg.checkpoint.resume == "none":
        cfg = replace_config(cfg, checkpoint={"resume": "auto"})
    trainer = Trainer(cfg)
    trainer.fit()
    exclude = trainer.loop.extra.get("straggler_restart_exclude")
    if exclude is not None:  # resilience.straggler=restart stopped the loop; the checkpoint is committed
        leave_for_restart(exclude, trainer.env.rank)


def cmd_run(ns: argparse.Namespace) -> int:
    if in_worker():
        return worker_main(_train, ns.config, ns.overrides)
    cfg = load_config(ns.config, ns.overrides)
    spec, world_size = launch_spec(ns, os.path.join(cfg.train.output_dir, "logs"))
    spec.stop_grace_s = cfg.checkpoint.signal_grace_s  # the workers absorb repeats for as long
    preflight(cfg, world_size=world_size, log_dir=spec.log_dir)
    set_omp_threads(spec.nproc_per_node)
    return launch(spec, ["run", ns.config or "-", *ns.overrides])
