"""One optimizer step's forward/backward over this rank's micro-batches.

The loss is the sum of token losses divided by the *global* count of valid tokens in the step
(over all data-parallel ranks and micro-batches), never a mean of per-rank or per-micro-batch
means. That is what makes every layout compute the same number: a mean of means would weight a
short micro-batch like a long one, and would change with the data-parallel size.

DDP and FSDP average gradients over the data-parallel ranks, so each rank back-propagates
`loss_sum * dp / global_tokens`; the average of those is exactly `sum / global_tokens`.

`PackedStep` (fixed-length packed rows, with or without a pipeline) and `HeteroStep` (whole
documents planned onto sequence-parallel groups) have the same face: `run()` takes the next
global batch from the loader and returns a `StepResult`; `metrics()` adds to the step's record.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from loomtrain.data.loader import DataLoader
from loomtrain.errors import DataError
from loomtrain.kernels.head_loss import fused_model_loss
from loomtrain.kernels.loss_select import LossChoice
from loomtrain.models.flops import FlopModel
from loomtrain.models.loss import StepResult, token_loss_sum
from loomtrain.models.moe import MoeAux
from loomtrain.parallel.compose import Parallelized
from loomtrain.parallel.context.common import sequence_indices
from loomtrain.parallel.hetero.scheduler import HeteroScheduler
from loomtrain.parallel.pipeline import Pipeline


def _slices(mb, par: Parallelized, device: torch.device):
    """(input_ids, labels, position_ids) of this rank's part of a micro-batch: the whole rows, or
    under context parallelism its slice of every row (global position ids kept)."""
    tensors = (mb.input_ids, mb.labels, mb.position_ids)
    if par.cp > 1:
        idx = sequence_indices(mb.input_ids.shape[1], par.cp, par.cp_rank, par.cp_impl)
        tensors = tuple(t[:, idx] for t in tensors)
    return tuple(t.to(device) for t in tensors)


def _reduce(values: list[float], group, device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if group is not None:
        dist.all_reduce(t, group=group)
    return t.tolist()


def _loss_and_backward(par: Parallelized, call, autocast, loss_choice: LossChoice | None, scale: float,
                       input_ids, position_ids, labels, moe: MoeAux | None, token_ranks: int) -> torch.Tensor:
    """One micro-batch's loss sum, back-propagated with weight `scale`: the fused linear +
    cross-entropy (`kernels.head_loss`) when chosen, else the model's logits and `token_loss_sum`,
    plus a mixture-of-experts model's auxiliary term (`moe`; the fused loss never serves those
    families, `kernels.loss_select`)."""
    if loss_choice is not None and loss_choice.fused and moe is None:
        loss = fused_model_loss(call, par.module, loss_choice, input_ids=input_ids, position_ids=position_ids,
                                labels=labels, autocast_dtype=par.autocast_dtype)
        (loss * scale).backward()
        return loss
    with autocast:
        out = call(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                   **(moe.forward_kwargs if moe is not None else {}))
    vocab_parallel = isinstance(out.logits, DTensor)
    with loss_parallel() if vocab_parallel else contextlib.nullcontext():
        loss = token_loss_sum(out.logits, labels)
        aux = moe.term(out.router_logits, token_ranks) if moe is not None else None
        if aux is not None and isinstance(loss, DTensor):  # tp: the same term on every tp rank
            aux = DTensor.from_local(aux, loss.device_mesh, loss.placements, run_check=False)
        (loss * scale if aux is None else loss * scale + aux).backward()
    return loss


def forward_backward(par: Parallelized, micro_batches: list, *, token_group, token_ranks: int,
                     device: torch.device, local_flops: float, moe: MoeAux | None = None,
                     loss_choice: LossChoice | None = None) -> StepResult:
    """Run every micro-batch forward and backward; gradients end up reduced over data parallel.

    `local_flops` (this rank's exact FLOPs) rides along with the token count in the one small
    all-reduce the step needs anyway. `token_group`/`token_ranks` span every rank that sees
    different tokens: data- and context-parallel ranks. `moe` (mixture-of-experts models) adds
    the router's load-balancing loss per micro-batch (`models.moe` says why that unit)."""
    batches = [_slices(mb, par, device) for mb in micro_batches]
    local_tokens = sum(int((labels != -100).sum()) for _, labels, _ in batches)
    global_tokens, global_flops = _reduce([float(local_tokens), float(local_flops)], token_group, device)
    if global_tokens == 0:
        raise DataError("a training step has no token with a label (every label is -100); "
                        "check data.seq_len and the documents")
    scale = token_ranks / global_tokens
    call = par.wrapper if par.wrapper is not None else par.module
    autocast = (torch.autocast(device.type, dtype=par.autocast_dtype) if par.autocast_dtype is not None
                else contextlib.nullcontext())
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    sample_ids: list[int] = []
    for i, (mb, (input_ids, labels, position_ids)) in enumerate(zip(micro_batches, batches)):
        last = i == len(micro_batches) - 1
        # Gradients are reduced once per step, on the last micro-batch (DDP no_sync, FSDP2 without
        # gradient sync; ZeRO-2 also keeps its gathered parameters until then).
        with par.micro_batch(last):
            loss = _loss_and_backward(par, call, autocast, loss_choice, scale, input_ids, position_ids, labels,
                                      moe, token_ranks)
        value = loss.detach()
        loss_sum += (value.full_tensor() if isinstance(value, DTensor) else value).double()
        sample_ids.extend(mb.sample_ids)
        del loss
    total = loss_sum.clone()
    if token_group is not None:
        dist.all_reduce(total, group=token_group)
    aux_loss = moe.finish(token_group, device) if moe is not None else 0.0
    return StepResult(total.item() / global_tokens + aux_loss, int(global_tokens), global_flops, sample_ids)


def pipeline_forward_backward(pipe, par: Parallelized, micro_batches: list, *, token_group, token_ranks: int,
                              pp_group, device: torch.device, local_flops: float) -> StepResult:
    """The same step through a pipeline schedule: the first stage gets token ids, the last the
    labels, every stage the position ids; the last stage's losses are shared with all stages
    (a MoE model's auxiliary loss too: `pipe.moe`, finished by the last stage from the router
    statistics every stage passed on, `parallel.pipeline_moe`)."""
    batches = [_slices(mb, par, device) for mb in micro_batches]
    input_ids, labels, position_ids = (torch.cat(parts) for parts in zip(*batches))
    local_tokens = int((labels != -100).sum())
    global_tokens, global_flops = _reduce([float(local_tokens), float(local_flops)], token_group, device)
    if global_tokens == 0:
        raise DataError("a training step has no token with a label (every label is -100); "
                        "check data.seq_len and the documents")
    pipe.scale = token_ranks / global_tokens
    pipe.token_ranks = token_ranks
    losses: list[torch.Tensor] = []
    args = (input_ids,) if pipe.has_first else ()
    autocast = (torch.autocast(device.type, dtype=par.autocast_dtype) if par.autocast_dtype is not None
                else contextlib.nullcontext())
    vocab_parallel = par.tensor_parallel
    with autocast, (loss_parallel() if vocab_parallel else contextlib.nullcontext()):
        pipe.schedule.step(*args, target=labels if pipe.has_last else None,
                           losses=losses if pipe.has_last else None, position_ids=position_ids)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for value in pipe.settle(len(losses)):  # token-loss sums (the schedule's losses add the auxiliary term)
        total += (value.full_tensor() if isinstance(value, DTensor) else value).double()
    dist.all_reduce(total, group=pp_group)
    if token_group is not None:
        dist.all_reduce(total, group=token_group)
    aux_loss = pipe.moe.finish(token_group, device, pp_group) if pipe.moe is not None else 0.0
    sample_ids = [i for mb in micro_batches for i in mb.sample_ids]
    return StepResult(total.item() / global_tokens + aux_loss, int(global_tokens), global_flops, sample_ids)


class PackedStep:
    """Fixed-length packed rows, split over data parallel (and pipeline stages)."""

    def __init__(self, loader: DataLoader, par: Parallelized, flops: FlopModel, *, cp: int, token_group,
                 token_ranks: int, device: torch.device, pipeline: Pipeline | None = None, pp_group=None,
                 moe: MoeAux | None = None, loss_choice: LossChoice | None = None):
        self.loader, self.par, self.flops, self.cp = loader, par, flops, cp
        self.loss_choice = loss_choice  # kernels.fused_loss (None: the stock loss)
        self.token_group, self.token_ranks, self.device = token_group, token_ranks, device
        self.pipeline, self.pp_group = pipeline, pp_group
        self.moe = moe

    def run(self) -> StepResult:
        micro_batches = self.loader.next_step()
        local_flops = self.flops.exact_step_flops(
            [n for mb in micro_batches for row in mb.doc_lengths for n in row]) / self.cp
        if self.pipeline is not None:
            return pipeline_forward_backward(self.pipeline, self.par, micro_batches, token_group=self.token_group,
                                             token_ranks=self.token_ranks, pp_group=self.pp_group,
                                             device=self.device, local_flops=local_flops)
        return forward_backward(self.par, micro_batches, token_group=self.token_group,
                                token_ranks=self.token_ranks, device=self.device, local_flops=local_flops,
                                moe=self.moe, loss_choice=self.loss_choice)

    def metrics(self) -> dict:
        moe = self.pipeline.moe if self.pipeline is not None else self.moe
        return dict(moe.metrics) if moe is not None else {}


class HeteroStep:
    """Whole documents of varied length, planned into per-micro-step sequence-parallel groups.
    Every rank reads the whole batch (the plan needs every length); only rank 0 reports the
    sample ids, so a gathered sample log counts each once."""

    def __init__(self, loader: DataLoader, scheduler: HeteroScheduler, par: Parallelized, flops: FlopModel, *,
                 token_group, is_main: bool):
        self.loader, self.scheduler, self.par, self.flops = loader, scheduler, par, flops
        self.token_group, self.is_main = token_group, is_main
        module = par.wrapper if par.wrapper is not None else par.module
        self.call = lambda ids, pos: module(input_ids=ids, position_ids=pos, use_cache=False).logits

    def run(self) -> StepResult:
        sample_ids, docs = self.loader.next_sequences()
        lengths = [int(doc.size) - 1 for doc in docs]
        loss_sum, global_tokens = self.scheduler.forward_backward(docs, self.call, sync=self.par.micro_batch)
        if self.token_group is not None:
            dist.all_reduce(loss_sum, group=self.token_group)
        return StepResult(loss_sum.item() / global_tokens, global_tokens, self.flops.exact_step_flops(lengths),
                          sample_ids if self.is_main else [], tokens=sum(lengths))

    def metrics(self) -> dict:
        return self.scheduler.plan_metrics()
