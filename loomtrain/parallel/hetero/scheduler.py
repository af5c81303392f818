"""`HeteroScheduler`: the heterogeneous sequence scheduler of a training run, in one object.

It owns the run's cost model (built once, from the model's geometry and the run config:
recomputation, the configured peak, the user's coefficients; optionally fitted to the hardware
at start-up), plans every step's documents onto sequence-parallel groups of mixed degrees, and
runs the plan through the executor. The training loop hands it a step's documents and gets back
the loss sum and token count, exactly as it does for packed rows.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

from loomtrain.models.loss import token_loss_sum
from loomtrain.parallel.hetero.costmodel import CostModel
from loomtrain.parallel.hetero.executor import HeteroExecutor
from loomtrain.parallel.hetero.memory import MemoryModel, resolve_capacity
from loomtrain.parallel.hetero.plan_types import Plan
from loomtrain.parallel.hetero.planner import plan_batch
from loomtrain.parallel.hetero.speeds import apply_speeds, check_speeds

# share of a GPU's memory kept back from the memory model: CUDA context, NCCL buffers, the caching
# allocator's fragmentation
CUDA_RESERVE = 0.10

Call = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (input_ids, position_ids) -> logits


class HeteroScheduler:
    """Plans and runs heterogeneous sequence parallelism over the data x context ranks of `mesh`.

    `model` is the module whose attention layers switch groups each micro-step (attention must
    already go through Ulysses, `apply_cp(model, None, "ulysses")`); `call` runs the possibly
    wrapped (DDP/FSDP) model on one packed row."""

    def __init__(self, cfg: Any, hf_config: Any, model: torch.nn.Module, mesh, device: torch.device):
        self.executor = HeteroExecutor(model, mesh, device)
        self.cost = CostModel.for_run(cfg, hf_config)
        self.seq_len = cfg.data.seq_len
        shards = 1 if mesh is None else mesh["dp_shard_cp"].size()
        total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
        self.memory = MemoryModel.for_run(cfg, self.cost, sum(p.numel() for p in model.parameters()), shards,
                                          reserve_bytes=CUDA_RESERVE * total if total else 0.0)
        # tokens one rank holds in a micro-step: configured, else from the device's memory (CUDA),
        # else the run's sequence length
        self.capacity = resolve_capacity(cfg.parallel.hetero_tokens_per_rank, cfg.data.seq_len, device.type,
                                         self.memory, total)
        self.calibrated = False
        self.last_plan: Plan | None = None
        self.plan_s = 0.0  # the planner's wall time for the last step
        # per pool rank, 1.0 typical, 1.5 = computes 1.5x as long (`set_speeds`; the straggler
        # monitor's rebalance policy): None while every rank is alike
        self.speeds: tuple[float, ...] | None = None

    @property
    def ranks(self) -> int:
        return self.executor.n

    def calibrate(self, call: Call, vocab: int) -> list[tuple[int, int, float]]:
        """Fit the cost model to this hardware (a few timed passes); returns the samples."""
        self.cost, samples = self.executor.calibrate(call, token_loss_sum, self.seq_len, self.cost, vocab=vocab)
        self.calibrated = True
        return samples

    def set_speeds(self, speeds) -> None:
        """Speed factors for the plans from the next step on (`speeds.apply_speeds`); every rank
        must set the same ones, which the plan's fingerprint check enforces."""
        speeds = check_speeds(speeds, self.ranks)
        self.speeds = None if len(set(speeds)) <= 1 else speeds

    def describe(self) -> str:
        lengths = sorted({max(1, self.seq_len // k) for k in (16, 4, 1)})
        head = "loomtrain: heterogeneous scheduler cost model" + (" (calibrated on this hardware)"
                                                               if self.calibrated else "")
        return head + ":\n" + self.cost.describe(lengths=lengths, degrees=sorted({1, 2, self.ranks}))

    def forward_backward(self, docs: list[np.ndarray], call: Call, sync=None) -> tuple[torch.Tensor, int]:
        """Plan `docs` (each n+1 tokens) and run forward and backward of this rank's share;
        returns (this rank's loss sum, the global count of valid tokens). `sync(last)` is the
        context each micro-step runs in (gradients reduced on the last only)."""
        lengths = [int(doc.size) - 1 for doc in docs]
        start = time.perf_counter()
        plan = plan_batch(lengths, self.ranks, self.capacity, self.cost)
        self.plan_s = time.perf_counter() - start  # on the step's critical path: reported per step
        self.last_plan = plan if self.speeds is None else apply_speeds(plan, self.speeds, self.cost)
        return self.executor.run(self.last_plan, docs, call, token_loss_sum, sync=sync)

    def plan_metrics(self) -> dict:
        """The last plan, for the step's metrics record."""
        plan = self.last_plan
        if plan is None:
            return {}
        degrees = sorted({g.degree for step in plan.steps for g in step.groups if g.seqs})
        return {"plan": plan.strategy, "plan_degrees": degrees, "plan_microsteps": len(plan.steps),
                "plan_predicted_s": plan.time, "plan_ms": round(1e3 * self.plan_s, 2)}
