"""Pipeline parallelism over an unmodified HF causal LM, with torch.distributed.pipelining.

A stage is the whole HF model in which the decoder blocks it does not own are replaced by
pass-throughs, and the embedding (all but the first stage) and final norm + head (all but the
last) by `nn.Identity`. Parameter names therefore stay the model's own (`model.layers.7.mlp...`),
so checkpoints do not depend on the split, and every stage runs HF's own forward: masks and
rotary tables are rebuilt on each stage from the `position_ids` that travel with every
micro-batch as a keyword argument (the schedules pass keyword arguments to all stages).

Splits are contiguous ranges of blocks chosen to minimise the most loaded stage, counting both
FLOPs and parameters, with the embedding on the first stage and the head on the last.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B,
                                                    ScheduleZBVZeroBubble)

from loomtrain.errors import ConfigError
from loomtrain.models.loss import token_loss_sum
from loomtrain.models.build import find_blocks

_SINGLE = {"GPipe": ScheduleGPipe, "1F1B": Schedule1F1B}
_MULTI = {"Interleaved1F1B": ScheduleInterleaved1F1B, "ZBVZeroBubble": ScheduleZBVZeroBubble}


def stages_per_rank(schedule: str, virtual: int) -> int:
    if schedule in _SINGLE:
        return 1
    if schedule == "ZBVZeroBubble":
        return 2
    return virtual


def stage_ids(schedule: str, pp_rank: int, pp: int, per_rank: int) -> list[int]:
    """Which global stages this rank runs: a loop for interleaved schedules, a V for ZBV."""
    if schedule == "ZBVZeroBubble":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(per_rank)]


def balanced_split(layer_cost: float, n_layers: int, first_extra: float, last_extra: float,
                   n_stages: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) block ranges for `n_stages` minimising the largest stage cost,
    where the first stage also pays `first_extra` and the last `last_extra` (exact DP)."""
    if n_stages > n_layers:
        raise ConfigError(f"pipeline: {n_stages} stages need at least as many decoder layers, "
                          f"the model has {n_layers}")
    inf = float("inf")
    # best[s][i]: minimal max-cost placing the first i layers into s stages.
    best = [[inf] * (n_layers + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n_layers + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, n_stages + 1):
        for i in range(s, n_layers - (n_stages - s) + 1):
            for j in range(s - 1, i):
                cost = (i - j) * layer_cost + (first_extra if s == 1 else 0) + (last_extra if s == n_stages else 0)
                value = max(best[s - 1][j], cost)
                if value < best[s][i] - 1e-12:
                    best[s][i], cut[s][i] = value, j
    bounds, i = [], n_layers
    for s in range(n_stages, 0, -1):
        bounds.append((cut[s][i], i))
        i = cut[s][i]
    return bounds[::-1]


def split_costs(hf_config, flops_model) -> tuple[float, float, float]:
    """Relative cost of one block, of the embedding and of norm+head: half FLOPs, half parameters.
    A model whose FLOPs are unknown is split by blocks alone."""
    if not flops_model.known:
        return 1.0, 0.0, 0.0
    d = hf_config.hidden_size
    vocab = hf_config.vocab_size
    n_layers = hf_config.num_hidden_layers
    head_matmul = vocab * d
    block_matmul = (flops_model.matmul_params - head_matmul) / n_layers
    block_params = (flops_model.total_params - flops_model.embedding_params
                    - (0 if flops_model.tied_embedding_params else head_matmul)) / n_layers
    total_flops = flops_model.matmul_params
    total_params = flops_model.total_params

    def cost(matmul: float, params: float) -> float:
        return 0.5 * matmul / total_flops + 0.5 * params / total_params

    return (cost(block_matmul, block_params), cost(0.0, flops_model.embedding_params),
            cost(head_matmul, head_matmul))


class PassThrough(nn.Module):
    """Stands in for a decoder block another stage owns: returns its input unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def carve_stage(model: nn.Module, start: int, end: int, *, first: bool, last: bool) -> nn.Module:
    """Keep blocks [start, end) of `model` (in place) and drop what other stages own."""
    blocks = find_blocks(model)
    for i in range(len(blocks)):
        if not start <= i < end:
            blocks[i] = PassThrough()
    base = model.base_model
    if not first:
        model.set_input_embeddings(nn.Identity())
        # Anything else the base model adds to the embeddings (GPT-2's learned positions `wpe`,
        # embedding dropout) belongs to the first stage only: later stages get hidden states.
        for name, module in base.named_children():
            if isinstance(module, nn.Embedding):
                setattr(base, name, ZeroEmbedding(module.embedding_dim))
            elif isinstance(module, nn.Dropout):
                setattr(base, name, nn.Identity())
    if not last:
        model.set_output_embeddings(nn.Identity())
        for name, module in base.named_children():
            if "norm" in type(module).__name__.lower() or name in ("norm", "ln_f"):
                setattr(base, name, nn.Identity())
    return model


class ZeroEmbedding(nn.Module):
    """Replaces an additive embedding (learned positions) on stages after the first."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.dim, device=ids.device)


class StageModule(nn.Module):
    """What a `PipelineStage` runs: the carved HF model, taking token ids on the first stage and
    hidden states elsewhere. Outputs are never views (zero-bubble schedules need that)."""

    def __init__(self, model: nn.Module, first: bool):
        super().__init__()
        self.model = model
        self.first = first

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        if self.first:
            out = self.model(input_ids=x, position_ids=position_ids, use_cache=False).logits
        else:
            out = self.model(inputs_embeds=x, position_ids=position_ids, use_cache=False).logits
        return out.clone() if out._base is not None else out


@dataclass
class Timeline:
    """Per-rank record of what each stage did and when, for the bubble picture (recorded only
    while `enabled`)."""

    events: list[dict] = field(default_factory=list)
    enabled: bool = False

    @contextlib.contextmanager
    def record(self, kind: str, stage: int, chunk: int):
        if not self.enabled:
            yield
            return
        t0 = time.time()
        try:
            yield
        finally:
            self.events.append({"kind": kind, "stage": stage, "mb": chunk, "t0": t0, "t1": time.time()})


class TimedStage(PipelineStage):
    """A `PipelineStage` that records each forward (F), full or input backward (B) and weight
    backward (W) of a micro-batch in `timeline`."""

    def __init__(self, *args, timeline: Timeline, **kwargs):
        super().__init__(*args, **kwargs)
        self.timeline = timeline

    def forward_one_chunk(self, fwd_chunk_id: int, *args, **kwargs):
        with self.timeline.record("F", self.stage_index, fwd_chunk_id):
            return super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)

    def backward_one_chunk(self, bwd_chunk_id: int, *args, **kwargs):
        with self.timeline.record("B", self.stage_index, bwd_chunk_id):
            return super().backward_one_chunk(bwd_chunk_id, *args, **kwargs)

    def backward_weight_one_chunk(self, bwd_chunk_id: int, *args, **kwargs):
        with self.timeline.record("W", self.stage_index, bwd_chunk_id):
            return super().backward_weight_one_chunk(bwd_chunk_id, *args, **kwargs)


@dataclass
class Pipeline:
    """A rank's stages, their schedule, and the loss scale the schedule's loss function applies.

    The loss function multiplies each micro-batch's token-loss sum by `scale` (dp / global valid
    tokens, set before every step), so gradients come out exactly as without pipelining; the
    schedule's own averaging over micro-batches is switched off (`scale_grads=False`)."""

    schedule: object
    stage_ids: list[int]
    n_stages: int
    timeline: Timeline
    scale: float = 1.0

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last(self) -> bool:
        return self.n_stages - 1 in self.stage_ids

    @classmethod
    def build(cls, parts: list[nn.Module], ids: list[int], n_stages: int, pp_group, device: torch.device,
              schedule: str, n_microbatches: int) -> "Pipeline":
        timeline = Timeline()
        stages = [TimedStage(StageModule(part, first=sid == 0), sid, n_stages, device, group=pp_group,
                             timeline=timeline)
                  for part, sid in zip(parts, ids)]
        pipe = cls(None, ids, n_stages, timeline)

        def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return token_loss_sum(logits, labels) * pipe.scale

        if schedule in _SINGLE:
            pipe.schedule = _SINGLE[schedule](stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn,
                                              scale_grads=False)
        else:
            pipe.schedule = _MULTI[schedule](stages, n_microbatches=n_microbatches, loss_fn=loss_fn,
                                             scale_grads=False)
        return pipe
