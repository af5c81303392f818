"""Resume at `after_setup`: verify a checkpoint, load it into the current layout, and fall back
to the previous one when either fails.

`resume.resume_candidates` (rank 0) lists what to try, newest first; each rank checks a share of
the files against the manifest, then every rank loads. Parameters and optimizer state go by name
through DCP (which reshards), the data position as a global sample count, the LR schedule, RNG
(per rank when the layout is unchanged) and the step. Every outcome is agreed by all ranks
(`ranks.agree`), so they all load the same checkpoint or all fall back together.
"""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

from loomtrain.checkpoint import format as fmt
from loomtrain.checkpoint import resume as resume_lib
from loomtrain.checkpoint import safeload
from loomtrain.checkpoint import state as st
from loomtrain.checkpoint.format import CheckpointError, CorruptCheckpointError
from loomtrain.checkpoint.ranks import agree, bcast
from loomtrain.config import Config
from loomtrain.hooks import LoopState
from loomtrain.mesh import DistEnv, ParallelDims


def entries(model_parts: list[nn.Module], optimizer: torch.optim.Optimizer) -> list:
    """What DCP saves and loads: model then optimizer tensors, by HF name."""
    return st.model_entries(model_parts) + st.optim_entries(model_parts, optimizer)


class Restorer:
    """Loads the newest usable checkpoint into this rank's parts (see `Checkpointer`) and the loop."""

    def __init__(self, cfg: Config, env: DistEnv, dims: ParallelDims, *, model_parts: list[nn.Module],
                 optimizer: torch.optim.Optimizer, lr_scheduler, data: Stateful, dp_rank: int, group):
        self.cfg, self.env, self.dims, self.group = cfg, env, dims, group
        self.model_parts, self.optimizer, self.lr_scheduler, self.data = model_parts, optimizer, lr_scheduler, data
        self.dp_rank = dp_rank
        self.root = os.path.abspath(resume_lib.checkpoint_root(cfg))

    def _say(self, msg: str) -> None:
        if self.env.is_main:
            print(f"loomtrain: {msg}", flush=True)

    def resume(self, loop: LoopState) -> str | None:
        """Load into the parts and set `loop.step`; returns the checkpoint loaded (None: nothing to
        resume). Raises `CorruptCheckpointError` when none is usable, or the one named is not."""
        err, plan = None, None
        if self.env.is_main:
            try:
                plan = resume_lib.resume_candidates(self.cfg)
            except Exception as exc:  # noqa: BLE001
                err = exc
        err, plan = bcast((err, plan), self.group)
        if err is not None:
            raise err
        candidates, explicit = plan
        if not candidates:
            if self.cfg.checkpoint.resume == "auto":
                self._say(f"checkpoint: nothing to resume in {self.root}; starting at step 0")
            return None
        problems = []
        for _, path in candidates:
            problem = self._verify(path)
            if problem is None:
                problem = self._try_load(path, loop)
                if problem is None:
                    return path
            if explicit:
                raise CorruptCheckpointError(f"corrupt checkpoint {path}: {problem}")
            problems.append(f"{os.path.basename(path)}: {problem}")
            if self.env.is_main:
                print(f"loomtrain: warning: checkpoint {path} is damaged ({problem}); falling back to the previous "
                      "one", file=sys.stderr, flush=True)
        raise CorruptCheckpointError(f"no usable checkpoint in {os.path.dirname(candidates[0][1])}: "
                                     + "; ".join(problems))

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
        return agree(problem, self.group)

    def _try_load(self, path: str, loop: LoopState) -> str | None:
        """Load a verified checkpoint; what verification cannot see (an index that does not parse,
        data DCP cannot read, bad meta.json fields) is returned as the problem, agreed by every
        rank, so the caller falls back (the next candidate overwrites every key a failed load wrote)."""
        problem = None
        try:
            note = self._load(path, loop)
        except CorruptCheckpointError as exc:
            problem = fmt.problem(exc)
        except CheckpointException as exc:  # a BaseException: DCP's failure on some rank
            problem = f"reading its tensors failed ({fmt.describe(exc)})"
        problem = agree(problem, self.group)
        if problem is None:
            self._say(note)
        return problem

    def _load(self, path: str, loop: LoopState) -> str:
        """Load `path` into this rank's parts; returns the line that says so."""
        start = time.perf_counter()
        meta = fmt.read_meta(path)
        md = safeload.tensor_entries(safeload.load_dcp_metadata(path))
        st.init_optimizer_state(self.optimizer)
        targets = entries(self.model_parts, self.optimizer)
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
        loop.load_state_dict({"step": int(meta["step"])})
        layout = meta.get("layout") or {}
        return (f"checkpoint: resumed from {path} (step {loop.step}, {layout.get('world_size', '?')} ranks, "
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
