"""Runs a heterogeneous sequence-parallel plan: every micro-step, each rank joins the group the
plan gave it and processes that group's sequences with Ulysses attention over the group.

- The pool is every data x context rank (the "dp_cp" mesh); one process group per aligned
  power-of-two block is created once, at start-up, by its members only
  (`new_group(use_local_synchronization=True)`, cheap on gloo and NCCL).
- A group packs its sequences into one row (per-document position ids, labels masked across
  documents), pads it to a multiple of its degree, and each member takes its contiguous slice.
  Degree-1 groups attend locally with the same document mask.
- Every rank runs the same number of micro-steps, each one forward and one backward (FSDP's
  collectives must line up); a slot with no sequence runs a one-token micro-step whose loss is
  multiplied by zero.
- Before running, ranks all-gather the plan's fingerprint: a rank that planned differently is an
  error naming the ranks, never a hang in mismatched collectives.
- The loss is the global token mean: every rank knows every sequence, so the global count of
  valid labels needs no communication; gradients are scaled by pool size / that count because
  FSDP/DDP average over the pool.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from loomtrain.parallel.context.common import set_group
from loomtrain.parallel.hetero.costmodel import calibrate
from loomtrain.parallel.hetero.plan_types import Plan, aligned_blocks, verify_same_plan


def pack_sequences(docs: list[np.ndarray], multiple: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[1, T] input ids, labels and position ids of `docs` (each n+1 tokens: n inputs with their
    next-token labels) laid end to end; padded with a label-free filler document to a multiple."""
    inputs, labels, positions = [], [], []
    for doc in docs:
        doc = np.asarray(doc, dtype=np.int64)
        inputs.append(doc[:-1])
        labels.append(doc[1:])
        positions.append(np.arange(doc.size - 1))
    total = sum(x.size for x in inputs)
    pad = (-total) % multiple
    if pad:
        inputs.append(np.zeros(pad, dtype=np.int64))
        labels.append(np.full(pad, -100, dtype=np.int64))
        positions.append(np.arange(pad))
    cat = lambda parts: torch.from_numpy(np.concatenate(parts))[None]  # noqa: E731
    return cat(inputs), cat(labels), cat(positions)


@dataclass
class MicroStepTiming:
    """Seconds each micro-step took on this rank (forward + backward, including waits)."""

    seconds: list[float] = field(default_factory=list)
    degrees: list[int] = field(default_factory=list)


class HeteroExecutor:
    def __init__(self, model: torch.nn.Module, mesh, device: torch.device):
        self.model = model
        self.device = device
        self.groups = {}
        if mesh is None:  # one process: every group has degree 1
            self.n, self.index, self.pool_group = 1, 0, None
            return
        pool = mesh["dp_cp"]
        self.n = pool.size()
        self.index = pool.get_local_rank()
        self.pool_group = pool.get_group()
        ranks = pool.mesh.flatten().tolist()
        for start, degree in aligned_blocks(self.n):
            if start <= self.index < start + degree:
                self.groups[(start, degree)] = dist.new_group(ranks[start:start + degree],
                                                              use_local_synchronization=True)

    def calibrate(self, call, loss_fn, max_len: int, base, vocab: int = 2, reps: int = 2):
        """Fit the cost model to this hardware: time forward+backward of single sequences at a
        few lengths on one rank and on a group of all ranks, keep the slowest rank's median, and
        fit the planner's coefficients to those (length, degree, seconds) samples. Gradients are
        discarded; a few seconds at start-up."""
        samples = []
        lengths = sorted({max(self.n, max_len // k) for k in (8, 4, 2, 1)})
        for degree in sorted({1, self.n}):
            group = self.groups.get((0, degree))
            set_group(self.model, group)
            for length in lengths:
                doc = np.arange(length + 1) % max(2, vocab)
                input_ids, labels, positions = pack_sequences([doc], degree)
                chunk = input_ids.shape[1] // degree
                part = slice(self.index * chunk, (self.index + 1) * chunk) if degree > 1 else slice(None)
                tensors = [t[:, part].to(self.device) for t in (input_ids, labels, positions)]
                times = []
                for _ in range(reps + 1):
                    start = time.perf_counter()
                    (loss_fn(call(tensors[0], tensors[2]), tensors[1]) * 0.0).backward()
                    times.append(time.perf_counter() - start)
                mine = torch.tensor([sorted(times[1:])[len(times[1:]) // 2]], dtype=torch.float64)
                if self.pool_group is not None:
                    dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=self.pool_group)
                samples.append((length, degree, float(mine)))
        set_group(self.model, None)
        for p in self.model.parameters():
            p.grad = None
        return calibrate(samples, base), samples

    def check(self, plan: Plan) -> None:
        """All ranks must hold the same plan (one all-gather of a 64-bit fingerprint)."""
        if self.pool_group is None:
            return
        mine = torch.tensor([plan.fingerprint64], dtype=torch.int64)
        everyone = [torch.zeros_like(mine) for _ in range(self.n)]
        dist.all_gather(everyone, mine, group=self.pool_group)
        verify_same_plan(plan, [int(t) for t in everyone])

    def run(self, plan: Plan, docs: list[np.ndarray], call, loss_fn, *, sync=None,
            timing: MicroStepTiming | None = None) -> tuple[torch.Tensor, int]:
        """Forward and backward of every micro-step of this rank; returns (local loss sum, global
        valid tokens). `call(input_ids, position_ids)` runs the model, `loss_fn(logits, labels)`
        sums token losses; `sync(last)` gives the context a micro-step runs in (data parallel
        reduces gradients on the last one only; `Parallelized.micro_batch`)."""
        self.check(plan)
        global_tokens = sum(int(doc.size) - 1 for doc in docs)
        scale = self.n / global_tokens
        slots = plan.for_rank(self.index)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, slot in enumerate(slots):
            start = time.perf_counter()
            last = i == len(slots) - 1
            context = sync(last) if sync is not None else contextlib.nullcontext()
            if slot.seqs:
                input_ids, labels, positions = pack_sequences([docs[s] for s in slot.seqs], slot.degree)
                chunk = input_ids.shape[1] // slot.degree
                part = slice(slot.local_rank * chunk, (slot.local_rank + 1) * chunk)
                input_ids, labels, positions = (t[:, part].to(self.device) for t in (input_ids, labels, positions))
                weight = scale
            else:  # a zero-weight micro-step keeps this rank's collectives in step with the others
                input_ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
                positions = torch.zeros_like(input_ids)
                labels = torch.zeros_like(input_ids)
                weight = 0.0
            set_group(self.model, self.groups[(slot.start, slot.degree)] if slot.degree > 1 else None)
            with context:
                loss = loss_fn(call(input_ids, positions), labels)
                (loss * weight).backward()
            if slot.seqs:
                loss_sum += loss.detach().double()
            if timing is not None:
                timing.seconds.append(time.perf_counter() - start)
                timing.degrees.append(slot.degree)
        set_group(self.model, None)
        return loss_sum, global_tokens
