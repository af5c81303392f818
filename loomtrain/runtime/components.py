"""The runtime's own loop components (`loomtrain.hooks.Hook`): metrics, the sample log and the
pipeline timeline. The checkpointer is one too, in `loomtrain.checkpoint.manager`.

Each is built by the trainer with what it needs (no trainer reference) and registered on the
loop's hook points; the loop itself only calls the points.
"""
from __future__ import annotations

import json
import os

import torch.distributed as dist

from loomtrain.errors import LoomError
from loomtrain.hooks import Hook, LoopState
from loomtrain.parallel.pipeline import Pipeline
from loomtrain.runtime import timeline
from loomtrain.runtime.metrics import MetricsWriter


class MetricsLogger(Hook):
    """Rank 0 writes every `log_every`-th record (and the last) to metrics.jsonl, TensorBoard and
    the progress bar, and prints the run summary at the end; other ranks keep only the curve."""

    def __init__(self, output_dir: str, *, is_main: bool, log_every: int, tensorboard: bool, progress: bool):
        self.output_dir, self.is_main, self.log_every = output_dir, is_main, log_every
        self.tensorboard, self.progress = tensorboard, progress
        self.writer: MetricsWriter | None = None
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.summary = ""

    def begin_fit(self, loop: LoopState) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        if self.is_main:
            self.writer = MetricsWriter(self.output_dir, tensorboard=self.tensorboard,
                                        progress=self.progress and loop.step < loop.max_steps,
                                        total_steps=loop.max_steps, start_step=loop.step)

    def after_step(self, loop: LoopState, record: dict) -> None:
        self.losses.append(record["loss"])
        self.grad_norms.append(record["grad_norm"])
        if self.writer is not None and (loop.step % self.log_every == 0 or loop.step == loop.max_steps):
            self.writer.log(record)

    def end_fit(self, loop: LoopState, exc: BaseException | None) -> None:
        if self.writer is None:
            return
        self.writer.close()
        if exc is None:
            self.summary = self.writer.summary(checkpoint=loop.last_checkpoint)
            print(self.summary, flush=True)


class SampleLog(Hook):
    """`train.log_samples`: the global sample ids of every step, gathered over data parallel, to
    samples.jsonl (tests use it to prove that every layout reads the same data)."""

    def __init__(self, output_dir: str, *, is_main: bool, dp_group, dp_size: int):
        self.path = os.path.join(output_dir, "samples.jsonl")
        self.is_main, self.dp_group, self.dp_size = is_main, dp_group, dp_size

    def after_step(self, loop: LoopState, record: dict) -> None:
        sample_ids = loop.last_result.sample_ids
        gathered = [sample_ids]
        if self.dp_group is not None:
            gathered = [None] * self.dp_size
            dist.all_gather_object(gathered, sample_ids, group=self.dp_group)
        if self.is_main:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": loop.step, "samples": sorted(i for ids in gathered for i in ids)}) + "\n")


class PipelineTimeline(Hook):
    """`train.trace_pipeline`: record the last step's per-stage forward/backward events; at the
    end gather them from every stage, and rank 0 writes, draws and summarises the bubble."""

    def __init__(self, pipeline: Pipeline, *, pp_group, pp: int, output_dir: str, n_micro: int, schedule: str,
                 is_main: bool):
        self.pipeline, self.pp_group, self.pp = pipeline, pp_group, pp
        self.path = os.path.join(output_dir, "pipeline_timeline.json")
        self.n_micro, self.schedule, self.is_main = n_micro, schedule, is_main

    def before_step(self, loop: LoopState) -> None:
        self.pipeline.timeline.enabled = True
        self.pipeline.timeline.events.clear()  # keep only the latest step

    def end_fit(self, loop: LoopState, exc: BaseException | None) -> None:
        if exc is not None:
            return
        rows = [None] * self.pp
        dist.all_gather_object(rows, self.pipeline.timeline.events, group=self.pp_group)
        if not self.is_main:
            return
        record = timeline.write_timeline(self.path, rows, self.n_micro, self.schedule)
        try:
            timeline.draw_timeline(self.path, self.path.replace(".json", ".png"))
        except LoomError as err:
            print(f"loomtrain: {err}", flush=True)
        print(f"loomtrain: pipeline bubble {100 * record['bubble_measured']:.1f}% measured, "
              f"{100 * record['bubble_theory']:.1f}% theory; timeline in {self.path}", flush=True)
