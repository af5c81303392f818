"""`Checkpointer`: a training-loop component (`loomtrain.hooks.Hook`) over the parts it saves.

It is given what it saves, as `Stateful` parts (the model's modules, the optimizer, the LR
schedule, the data position, the loop's step counter), and where this rank sits in the layout;
it never sees the trainer. Its points:

    after_setup             own gloo group, clean-up of interrupted saves, resume (verify ->
                            load into the current layout; either failing -> the previous one)
    begin_fit               take over SIGTERM / Ctrl-C
    before_optimizer_step   wait for the in-flight host copy (the parameters change next)
    after_step              request a save every `checkpoint.every` steps; agree on a stop
                            request (returns True)
    end_fit(exc)            commit the last state before the process exits: at the end, after
                            SIGTERM/Ctrl-C, and after an exception when every rank agrees that
                            the state is consistent (never half-way through an optimizer step)

Resume loads whatever layout wrote the checkpoint into whatever layout the config asks for now
(`restore.Restorer`); the ranks agree on every decision through `ranks`.
"""
from __future__ import annotations

import datetime
import os
import signal
import time
import uuid

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.stateful import Stateful

from loomtrain.checkpoint import commit as commit_lib
from loomtrain.checkpoint import format as fmt
from loomtrain.checkpoint import resume as resume_lib
from loomtrain.checkpoint import state as st
from loomtrain.checkpoint.engine import CheckpointEngine
from loomtrain.checkpoint.format import CheckpointError
from loomtrain.checkpoint.ranks import agree_on_exit, bcast, on_main_then_everywhere
from loomtrain.checkpoint.restore import Restorer, entries
from loomtrain.checkpoint.signals import NonFiniteError, StopOnSignal
from loomtrain.config import Config
from loomtrain.hooks import Hook, LoopState
from loomtrain.mesh import DistEnv, ParallelDims

_GROUP_TIMEOUT_S = 1800.0


class Checkpointer(Hook):
    """Saves and restores `model_parts` (this rank's modules: the model, or its pipeline stages),
    `optimizer`, `lr_scheduler` and `data` (any `Stateful`; its state is a small JSON-able dict),
    and the loop's step, for a rank at `dp_rank` of `dp_size` in the layout `dims`."""

    def __init__(self, cfg: Config, env: DistEnv, dims: ParallelDims, *, model_parts: list[nn.Module],
                 optimizer: torch.optim.Optimizer, lr_scheduler, data: Stateful, dp_rank: int, dp_size: int):
        self.cfg = cfg
        self.env = env
        self.dims = dims
        self.model_parts = list(model_parts)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.data = data
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.loop = LoopState()  # replaced by the loop's own state at after_setup
        self.root = os.path.abspath(resume_lib.checkpoint_root(cfg))
        self.saving = resume_lib.saving_enabled(cfg)
        self.enabled = self.saving or cfg.checkpoint.resume != "none"
        self.every = cfg.checkpoint.every
        self.group = None
        self.engine: CheckpointEngine | None = None
        self.resumed_from: str | None = None
        self.last_saved_step = -1  # step of the last checkpoint requested (or loaded)
        self._consistent_step = 0  # the last step whose optimizer update completed
        self._updating = False
        self._data_state = None
        self.stop = StopOnSignal(env.is_main, cfg.checkpoint.signal_grace_s)
        self._engine_failed = False
        self._lock_fh = None

    @property
    def last_checkpoint(self) -> str | None:
        """The newest committed checkpoint of this run, or the one it resumed from."""
        path = (self.engine.last_committed if self.engine is not None else None) or self.resumed_from
        return os.path.abspath(path) if path else None

    def _entries(self) -> list:
        return entries(self.model_parts, self.optimizer)

    # ------------------------------------------------------------------------------ setup
    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def _say(self, msg: str) -> None:
        if self.is_main:
            print(f"loomtrain: {msg}", flush=True)

    def after_setup(self, loop: LoopState) -> None:
        self.loop = loop
        if not self.enabled:
            return
        try:
            self._setup()
        except BaseException:
            self._release_lock()
            raise

    def _setup(self) -> None:
        if dist.is_initialized():
            self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=_GROUP_TIMEOUT_S))
        self.run_id = bcast(uuid.uuid4().hex[:12] if self.is_main else None, self.group)
        if self.saving:
            on_main_then_everywhere(self._take_directory, self.is_main, self.group)
        restorer = Restorer(self.cfg, self.env, self.dims, model_parts=self.model_parts, optimizer=self.optimizer,
                            lr_scheduler=self.lr_scheduler, data=self.data, dp_rank=self.dp_rank, group=self.group)
        resumed = restorer.resume(self.loop)
        if resumed is not None:
            self.last_saved_step = self.loop.step
            self.resumed_from = resumed
        self._consistent_step = self.loop.step
        self._data_state = self.data.state_dict()
        if self.saving:
            self.engine = CheckpointEngine(self.root, group=self.group, run_id=self.run_id,
                                           keep=self.cfg.checkpoint.keep, device=self.env.device)

    def _take_directory(self) -> None:
        """Rank 0: lock the checkpoint directory, remove what interrupted saves left, and refuse
        to start from scratch over another run's checkpoints."""
        os.makedirs(self.root, exist_ok=True)
        self._lock_fh = commit_lib.lock_root(self.root)
        removed = commit_lib.cleanup_leftovers(self.root)
        if removed:
            print(f"loomtrain: checkpoint: removed leftovers of interrupted saves: {', '.join(sorted(removed))}",
                  flush=True)
        resume_lib.check_config(self.cfg)

    def _release_lock(self) -> None:
        if self._lock_fh is not None:
            self._lock_fh.close()  # releases the directory lock
            self._lock_fh = None

    # ----------------------------------------------------------------------------- saving
    def _meta(self, step: int) -> dict:
        env = self.env
        return {
            "format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "step": int(step),
            "created_unix": time.time(),
            "data": dict(self._data_state),
            "scheduler": st.scheduler_state(self.lr_scheduler),
            "optim": {"class": type(st.local_optimizer(self.optimizer)).__name__, "zero": self.cfg.parallel.zero,
                      "param_groups": st.optimizer_groups(self.model_parts, self.optimizer)},
            "rng": {"rank": env.rank, "dp_rank": self.dp_rank, **st.capture_rng(env.device)},
            "config": self.cfg.to_dict(),
            "layout": {"world_size": env.world_size, "degrees": st.layout_degrees(self.dims),
                       "dp_size": self.dp_size,
                       "zero": self.cfg.parallel.zero, "device": env.device.type},
            "versions": st.versions(),
        }

    def save(self) -> float:
        """Request a checkpoint of the current (consistent) state; returns seconds blocked."""
        step = self.loop.step
        try:
            blocked = self.engine.request(step, self._entries(), self._meta(step))
        except BaseException:
            self._engine_failed = True
            raise
        self.last_saved_step = step
        return blocked

    def before_optimizer_step(self, loop: LoopState) -> None:
        if self.engine is not None:
            self.engine.wait_snapshot()
        self._updating = True

    def after_step(self, loop: LoopState, record: dict | None = None) -> bool:
        """After a completed optimizer step; returns True when the run must stop (a signal)."""
        if not self.enabled:
            return False
        self._updating = False
        self._consistent_step = loop.step
        self._data_state = self.data.state_dict()
        stop = self.stop.agreed(self.env.world_size, self.env.device)
        if stop:
            loop.stop_reason = signal.Signals(self.stop.signum).name
        if self.engine is not None and not self.engine.prepared:  # the optimizer state exists from now on
            self.engine.prepare(self._entries())
        if self.engine is not None and self.every > 0 and loop.step % self.every == 0 and loop.step != self.last_saved_step:
            self.save()
        return stop

    def begin_fit(self, loop: LoopState) -> None:
        if self.saving:
            self.stop.install()

    # ------------------------------------------------------------------------------- exit
    def end_fit(self, loop: LoopState, exc: BaseException | None = None) -> None:
        """Commit the last consistent state and stop the engine. Raises the checkpoint's error
        (normal end), or lets `exc` be re-raised by the caller."""
        try:
            if exc is None:
                self._final_commit()
            elif self.engine is not None:
                self._commit_after_error(exc)
        finally:
            if exc is not None or self.stop.signum is None:
                self.stop.restore()
            if self.engine is not None:
                self.engine.close()
            self._release_lock()
            loop.last_checkpoint = self.last_checkpoint
        if exc is None and self.stop.signum is not None:
            # The handlers stay until this line is out: a late copy of the stop request must not
            # kill the process between the commit and the message that reports it.
            name = signal.Signals(self.stop.signum).name
            self._say(f"stopped by {name} after step {loop.step}"
                      + (f"; checkpoint {self.engine.last_committed} committed" if self.engine and
                         self.engine.last_committed else ""))
            self.stop.restore()
            self.stop.reraise()

    def _final_commit(self) -> None:
        if self.engine is None:
            return
        if self.loop.step > max(self.last_saved_step, 0):
            self.save()
        self.engine.wait()

    def _commit_after_error(self, exc: BaseException) -> None:
        if self.stop.abort:
            return
        try:
            self.engine.wait(timeout=600)
        except CheckpointError:
            self._engine_failed = True
        if self._engine_failed or isinstance(exc, (CheckpointError, NonFiniteError)):
            return  # a failed save or a diverged run: the newest committed checkpoint stays the newest
        consistent = not self._updating and self.loop.step == self._consistent_step
        step = self._consistent_step
        if not agree_on_exit(consistent, step, group=self.group, store=self.env.store, run_id=self.run_id):
            why = ("not every rank is at a consistent step" if self.env.store is not None or self.group is None
                   else "the ranks have no job store to agree through (the process group was created outside loomtrain)")
            self._say(f"checkpoint: not saving after {type(exc).__name__}: {why}; "
                      "the last committed checkpoint stays the newest")
            return
        if step <= max(self.last_saved_step, 0):
            return
        try:
            self.save()
            record = self.engine.wait(timeout=600)
            self._say(f"checkpoint: committed {record.path} after {type(exc).__name__}")
        except Exception as err:  # noqa: BLE001 -- the original exception is what the user must see
            self._say(f"checkpoint: could not commit after {type(exc).__name__}: {err}")
