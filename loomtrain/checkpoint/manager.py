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

Resume loads whatever layout wrote the checkpoint into whatever layout the config asks for now:
parameters and optimizer state by name through DCP (which reshards), the data position as a
global sample count, the LR schedule, RNG (per rank when the layout is unchanged) and the step.
"""
from __future__ import annotations

import datetime
import os
import signal
import sys
import time
import uuid

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

from loomtrain.checkpoint import commit as commit_lib
from loomtrain.checkpoint import format as fmt
from loomtrain.checkpoint import resume as resume_lib
from loomtrain.checkpoint import safeload
from loomtrain.checkpoint import state as st
from loomtrain.checkpoint.engine import CheckpointEngine
from loomtrain.checkpoint.format import CheckpointError, CorruptCheckpointError
from loomtrain.checkpoint.signals import NonFiniteError, StopOnSignal
from loomtrain.config import Config
from loomtrain.hooks import Hook, LoopState
from loomtrain.mesh import DistEnv, ParallelDims

# How long a rank that raised waits for the others to agree on a final checkpoint; if they do not
# all arrive (they are stuck in a collective, or dead) it gives up and exits without saving.
EXIT_AGREEMENT_TIMEOUT_S = 30.0
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
        return st.model_entries(self.model_parts) + st.optim_entries(self.model_parts, self.optimizer)

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
        self.run_id = self._bcast(uuid.uuid4().hex[:12] if self.is_main else None)
        if self.saving:
            self._on_main_then_everywhere(self._take_directory)
        self._resume()
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

    def _on_main_then_everywhere(self, fn) -> None:
        """Run `fn` on rank 0; if it raises, raise the same error on every rank."""
        err = None
        if self.is_main:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 -- re-raised on every rank below
                err = exc
        err = self._bcast(err)
        if err is not None:
            raise err

    def _release_lock(self) -> None:
        if self._lock_fh is not None:
            self._lock_fh.close()  # releases the directory lock
            self._lock_fh = None

    # ----------------------------------------------------------------------------- resume
    def _resume(self) -> None:
        err, plan = None, None
        if self.is_main:
            try:
                plan = resume_lib.resume_candidates(self.cfg)
            except Exception as exc:  # noqa: BLE001
                err = exc
        err, plan = self._bcast((err, plan))
        if err is not None:
            raise err
        candidates, explicit = plan
        if not candidates:
            if self.cfg.checkpoint.resume == "auto":
                self._say(f"checkpoint: nothing to resume in {self.root}; starting at step 0")
            return
        problems = []
        for _, path in candidates:
            problem = self._verify(path)
            if problem is None:
                problem = self._try_load(path)
                if problem is None:
                    return
            if explicit:
                raise CorruptCheckpointError(f"corrupt checkpoint {path}: {problem}")
            problems.append(f"{os.path.basename(path)}: {problem}")
            if self.is_main:
                print(f"loomtrain: warning: checkpoint {path} is damaged ({problem}); falling back to the previous "
                      "one", file=sys.stderr, flush=True)
        raise CorruptCheckpointError(f"no usable checkpoint in {os.path.dirname(candidates[0][1])}: "
                                     + "; ".join(problems))

    def _agree(self, problem: str | None) -> str | None:
        """The first rank's problem, the same on every rank (None: every rank is fine)."""
        if self.group is None:
            return problem
        found: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(found, problem, group=self.group)
        return next((p for p in found if p is not None), None)

    def _verify(self, path: str) -> str | None:
        """Distributed check of a checkpoint's files against its manifest (each rank checks a share);
        returns the first problem found, the same on every rank."""
        problem = None
        try:
            manifest = fmt.read_manifest(path)
            fmt.read_meta(path)
            names = sorted(manifest["files"])
            rank, world = (dist.get_rank(self.group), dist.get_world_size(self.group)) if self.group else (0, 1)
            problem = fmt.verify_files(path, manifest, names[rank::world], check=self.cfg.checkpoint.verify)
        except CheckpointError as exc:
            problem = fmt.problem(exc)
        return self._agree(problem)

    def _try_load(self, path: str) -> str | None:
        """Load a verified checkpoint; what verification cannot see (an index that does not parse,
        data DCP cannot read, bad meta.json fields) is returned as the problem, agreed by every
        rank, so the caller falls back (the next candidate overwrites every key a failed load wrote)."""
        problem = None
        try:
            note = self._load(path)
        except CorruptCheckpointError as exc:
            problem = fmt.problem(exc)
        except CheckpointException as exc:  # a BaseException: DCP's failure on some rank
            problem = f"reading its tensors failed ({fmt.describe(exc)})"
        problem = self._agree(problem)
        if problem is None:
            self._say(note)
        return problem

    def _load(self, path: str) -> str:
        """Load `path` into this rank's parts; returns the line that says so."""
        start = time.perf_counter()
        meta = fmt.read_meta(path)
        md = safeload.tensor_entries(safeload.load_dcp_metadata(path))
        st.init_optimizer_state(self.optimizer)
        targets = self._entries()
        self._check_match(path, md, targets)
        try:
            safeload.load(dict(targets), path, process_group=self.group)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 -- one line naming the checkpoint
            raise CorruptCheckpointError(f"corrupt checkpoint {path}: reading its tensors failed "
                                         f"({fmt.describe(exc)})") from exc
        try:
            self.data.load_state_dict(meta["data"])
            st.restore_scheduler(self.lr_scheduler, self.optimizer, meta.get("scheduler") or {})
            st.restore_or_derive_rng(meta, self.env, st.layout_degrees(self.dims), seed=self.cfg.train.seed,
                                     dp_rank=self.dp_rank)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError, RuntimeError) as exc:
            raise CorruptCheckpointError(f"corrupt checkpoint {path}: {fmt.META_FILE} cannot be restored "
                                         f"({type(exc).__name__}: {fmt.first_line(exc, 200)})") from None
        self.loop.load_state_dict({"step": int(meta["step"])})
        self.last_saved_step = self.loop.step
        self.resumed_from = path
        layout = meta.get("layout") or {}
        return (f"checkpoint: resumed from {path} (step {self.loop.step}, {layout.get('world_size', '?')} ranks, "
                f"zero {layout.get('zero', '?')}) in {time.perf_counter() - start:.1f} s")

    def _check_match(self, path: str, md: dict, targets: list) -> None:
        """Every tensor the job needs must be in the checkpoint with the same global shape, and the
        checkpoint must not hold model parameters the model does not have."""
        mine = {k: list(v.shape) for k, v in targets}
        if self.group is not None:
            every: list = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(every, mine, group=self.group)
            for other in every:
                mine.update(other)
        have = {k: list(v.size) for k, v in md.items()}
        problem = st.mismatch(have, mine)
        if problem:
            raise CheckpointError(f"checkpoint {path} does not match the model: {problem}")

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
        if not self._agree_on_exit(consistent, step):
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

    def _agree_on_exit(self, consistent: bool, step: int) -> bool:
        """Every rank reports (consistent, step) through the job's store; True only if all of them
        arrive within the timeout, consistent and at the same step (no collective that could hang).
        Without a store (a process group the caller created) no agreement is possible: False."""
        if self.group is None:
            return consistent
        store = self.env.store
        if store is None:
            return False
        world, rank = dist.get_world_size(), dist.get_rank()
        prefix = f"loomtrain/checkpoint/{self.run_id}/exit"
        store.set(f"{prefix}/{rank}", f"{int(consistent)}:{step}")
        store.add(f"{prefix}/count", 1)
        deadline = time.monotonic() + EXIT_AGREEMENT_TIMEOUT_S
        while store.add(f"{prefix}/count", 0) < world:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        values = [store.get(f"{prefix}/{r}").decode() for r in range(world)]
        return all(v == f"1:{step}" for v in values)

    # ------------------------------------------------------------------------------ utils
    def _bcast(self, obj):
        if self.group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        return box[0]

