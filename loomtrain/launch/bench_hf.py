"""The HF Trainer peer of `loomtrain bench --vs`: `transformers.Trainer` on accelerate, as a user
drives it, on loomtrain's model, batches and optimizer settings.

What a user would write, and what this peer runs: `TrainingArguments` + `Trainer(model=...)`,
`trainer.train()`. Data parallelism is the Trainer's own: DDP (ZeRO-0, with accelerate's `no_sync`
on all but the last micro-batch) or FSDP2 through accelerate's plugin (`fsdp=True`,
`fsdp_version=2`, one unit per decoder block, `reshard_after_forward` off for ZeRO-2 and on for
ZeRO-3). ZeRO-1 has no Trainer form without DeepSpeed and is reported as skipped. accelerate 1.16
enables FSDP on accelerators only: on CPU it drops the plugin and trains with DDP without a word,
so ZeRO-2/3 is reported as skipped there (checked again on the built Trainer), never as DDP's
figures under a ZeRO label. The FSDP path is therefore untested here (no GPU in the session that
wrote it).

What is pinned to loomtrain's, through the Trainer's documented extension points (subclass and
override), so that the losses must agree:

* the batches: `get_train_dataloader` returns this rank's micro-batches in loomtrain's global order
  (a padding-free collator's dicts: `labels` plus `shift_labels`, already shifted, as HF's
  packed-sequence collators give them);
* the loss: the Trainer's own token-count normalisation (`num_items_in_batch` counted over every
  micro-batch of the step and summed across ranks, `average_tokens_across_devices`), which is
  loomtrain's sum of token losses over the global count of valid tokens;
* the optimizer and schedule: `create_optimizer` / `create_scheduler` build loomtrain's AdamW
  groups and lr schedule (the Trainer's own decay rule and schedules differ in detail);
* `ddp_find_unused_parameters=False`, as HF's documentation advises for a model that uses every
  parameter (the default would traverse the graph after every backward).

A step's time runs from fetching its batches (`get_batch_samples`) to the end of the optimizer
step (a callback's `on_step_end`), and its record is built by `PeerRun.record`, as for every peer.
This module imports the Trainer at the top, so it is imported only when the peer runs (accelerate
is optional).
"""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from loomtrain.launch.bench_peers import HF_NO_CPU_FSDP, PeerSkipped

if TYPE_CHECKING:
    from loomtrain.launch.bench_peers import PeerRun


class StepBatches:
    """This rank's micro-batches in loomtrain's order, as the dicts the Trainer feeds its model.

    A step's batches (and its global valid tokens and exact FLOPs, one all-reduce as in every peer)
    are fetched when the step's first micro-batch is asked for."""

    def __init__(self, run: PeerRun):
        self.run = run
        self.tokens = 0.0
        self.exact = 0.0

    def __len__(self) -> int:
        return self.run.steps * self.run.micro_batches

    def __iter__(self):
        for _ in range(self.run.steps):
            mbs, self.tokens, self.exact = self.run.batch()
            for mb in mbs:
                yield {"input_ids": mb.input_ids, "position_ids": mb.position_ids, "labels": mb.labels,
                       "shift_labels": mb.labels, "use_cache": False}


class BenchTrainer(Trainer):
    """`Trainer` with loomtrain's batches, optimizer and schedule, and a per-step record."""

    def __init__(self, run: PeerRun, batches: StepBatches, **kwargs):
        super().__init__(**kwargs)
        self.run = run
        self.batches = batches
        self.records: list[dict] = []
        self.step_start = 0.0
        self.step_lr = 0.0
        self.step_loss = torch.zeros((), dtype=torch.float64, device=run.env.device)
        self.step_norm = float("nan")

    def get_train_dataloader(self):
        return self.batches

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            self.optimizer = self.run.adamw([(n, p) for n, p in model.named_parameters() if p.requires_grad])
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            self.lr_scheduler = self.run.schedule(optimizer if optimizer is not None else self.optimizer)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        self.step_start = time.perf_counter()
        self.step_lr = self.lr_scheduler.get_last_lr()[0]
        self.step_loss.zero_()
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # The Trainer returns sum / global tokens x world (it undoes DDP's average): back to this
        # rank's sum of token losses, which `PeerRun.record` all-reduces and divides again.
        self.step_loss += loss.double() * (self.batches.tokens / self.run.world)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):  # the Trainer's own norm, kept for the record
        norm = super()._get_grad_norm(model, grad_norm)
        self.step_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        return norm


class _StepEnd(TrainerCallback):
    """Closes a step's record once the optimizer has stepped."""

    def __init__(self, trainer: BenchTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.run.counter.read()  # the wrapping's collectives (DDP's broadcast) are set-up, not a step
        return control

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        t.records.append(t.run.record(state.global_step, t.step_start, t.step_loss.clone(), t.batches.tokens,
                                      t.batches.exact, t.step_norm, t.step_lr))
        return control


def _arguments(run: PeerRun, block_class: str) -> TrainingArguments:
    cfg = run.cfg
    clip = cfg.optim.grad_clip
    kwargs = {}
    if run.zero in (2, 3):
        kwargs = {"fsdp": True,
                  "fsdp_config": {"fsdp_version": 2, "reshard_after_forward": run.zero == 3,
                                  "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                  "transformer_layer_cls_to_wrap": [block_class]}}
    return TrainingArguments(
        output_dir=os.path.join(cfg.train.output_dir, "hf_trainer"), max_steps=run.steps,
        per_device_train_batch_size=cfg.data.micro_batch_size, gradient_accumulation_steps=run.micro_batches,
        learning_rate=cfg.optim.lr, max_grad_norm=clip if clip > 0 else 0.0, seed=cfg.train.seed,
        bf16=cfg.model.dtype == "bfloat16", use_cpu=run.env.device.type == "cpu",
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        ddp_find_unused_parameters=False, average_tokens_across_devices=True, **kwargs)


def run_hf(run: PeerRun) -> list[dict]:
    """`trainer.train()` over the run's steps; the per-step records."""
    model = run.build_model()
    blocks = run.compiled_blocks(model)
    batches = StepBatches(run)
    trainer = BenchTrainer(run, batches, model=model, args=_arguments(run, type(blocks[0]).__name__))
    if run.zero in (2, 3) and not trainer.is_fsdp_enabled:
        raise PeerSkipped(HF_NO_CPU_FSDP)  # accelerate dropped the FSDP plugin: never report DDP as ZeRO-2/3
    trainer.add_callback(_StepEnd(trainer))
    trainer.train()
    return trainer.records
