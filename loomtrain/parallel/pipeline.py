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

import ast
import contextlib
import inspect
import textwrap
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.tensor import DTensor
from torch.distributed.pipelining.schedules import (Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B,
                                                    ScheduleZBVZeroBubble)

from loomtrain.errors import ConfigError
from loomtrain.kernels.head_loss import HIDDEN_KWARGS, head_loss_sum
from loomtrain.kernels.loss_select import LossChoice
from loomtrain.models.loss import token_loss_sum
from loomtrain.models.moe import MoeAux, MoeSpec
from loomtrain.models.build import find_blocks
from loomtrain.parallel.pipeline_moe import carry_router_stats, split_stats
from loomtrain.parallel.tied import ties_embeddings

_SINGLE = {"GPipe": ScheduleGPipe, "1F1B": Schedule1F1B}
_MULTI = {"Interleaved1F1B": ScheduleInterleaved1F1B, "ZBVZeroBubble": ScheduleZBVZeroBubble}
_SPLIT_BACKWARD = {"ZBVZeroBubble"}  # schedules whose backwards are mostly input/weight halves


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
    """Stands in for a decoder block another stage owns: returns its input unchanged, in the form
    the model's own blocks return (a tensor, or a tuple whose first item is the hidden states, as
    Falcon's blocks return)."""

    def __init__(self, arity: int = 0):
        super().__init__()
        self.arity = arity  # 0: a tensor; n: an n-tuple (hidden_states, None, ...)

    def forward(self, hidden_states, *args, **kwargs):
        if self.arity:
            return (hidden_states,) + (None,) * (self.arity - 1)
        return hidden_states


def block_output_arity(block: nn.Module) -> int:
    """0 when the block's forward returns a tensor, n when it returns an n-tuple, read from the
    return statements of its source (`return output, attn_weights`, or a name bound to a tuple)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(type(block).forward)))
    except (OSError, TypeError, SyntaxError):
        return 0
    tuples = {target.id: len(node.value.elts) for node in ast.walk(tree) if isinstance(node, ast.Assign)
              and isinstance(node.value, ast.Tuple) for target in node.targets if isinstance(target, ast.Name)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple):
            return len(node.value.elts)
        if isinstance(node, ast.Return) and isinstance(node.value, ast.Name) and node.value.id in tuples:
            return tuples[node.value.id]
    return 0


def carve_stage(model: nn.Module, start: int, end: int, *, first: bool, last: bool) -> nn.Module:
    """Keep blocks [start, end) of `model` (in place) and drop what other stages own."""
    blocks = find_blocks(model)
    arity = block_output_arity(blocks[0])
    tied = ties_embeddings(model)
    for i in range(len(blocks)):
        if not start <= i < end:
            blocks[i] = PassThrough(arity)
    # What the model does around its blocks lives in the module that holds them: the base model
    # for most (Llama's `model`, GPT-2's `transformer`), a decoder inside it for OPT (`model.decoder`,
    # with its learned positions and final norm).
    base = next((m for m in model.modules() if any(c is blocks for c in m.children())), model.base_model)
    if not first:
        # A tied embedding stays on the last stage, unused: it holds the weight the head shares,
        # under its HF names and with the embedding's initialisation (see `tied`).
        if not (tied and last):
            model.set_input_embeddings(nn.Identity())
        kept = model.get_input_embeddings()
        # Anything else the base model adds to the embeddings (GPT-2's learned positions `wpe`,
        # embedding dropout) belongs to the first stage only: later stages get hidden states.
        for name, module in base.named_children():
            if isinstance(module, nn.Embedding) and module is not kept:
                setattr(base, name, ZeroEmbedding(module.embedding_dim))
            elif isinstance(module, nn.Dropout) or ("emb" in name and "norm" in type(module).__name__.lower()):
                setattr(base, name, nn.Identity())  # Bloom's word_embeddings_layernorm: first stage's
    if not last:
        model.set_output_embeddings(nn.Identity())
        for name, module in base.named_children():
            # The final norm only: a norm of the embeddings (Bloom's word_embeddings_layernorm)
            # runs on the first stage, before its blocks.
            if ("norm" in type(module).__name__.lower() or name in ("norm", "ln_f")) and "emb" not in name:
                setattr(base, name, nn.Identity())
    return model


class ZeroEmbedding(nn.Module):
    """Replaces an additive embedding (learned positions) on stages after the first."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # OPT calls its positions with (attention mask, cache length, position_ids=...): the
        # first argument has the [batch, seq] shape in every case.
        return torch.zeros(*ids.shape, self.dim, device=ids.device)


class StageModule(nn.Module):
    """What a `PipelineStage` runs: the carved HF model, taking token ids on the first stage and
    hidden states elsewhere. Outputs are never views (zero-bubble schedules need that).

    A stage runs the model's whole forward, so what the model does around its blocks must happen
    exactly once, on the stage that owns it:
    * Entry: on a later stage the incoming hidden states are handed to the model as
      `inputs_embeds` (HF builds masks, rotary tables and per-layer attention types from them),
      but they enter the computation at the stage's first owned block: whatever the model does to
      its embeddings (Gemma's normaliser, Granite's multiplier, GPT-2's learned positions) was
      done on the first stage already and is discarded here.
    * Exit: a stage before the last hands on what reaches its head stand-in, not the model's
      output, so logit scaling and soft-capping (Cohere, Granite, Gemma) are applied only by the
      last stage, to real logits.
    * Fused loss (`hidden_out`): the last stage returns the final norm's output instead of the
      logits, and the schedule's loss function applies the head chunk by chunk
      (`kernels.head_loss`), so the stage never builds the `[tokens, vocab]` logits.
    """

    def __init__(self, model: nn.Module, first: bool, last: bool = True, hidden_out: bool = False,
                 moe: MoeSpec | None = None):
        super().__init__()
        self.model = model
        self.first = first
        self.extra = HIDDEN_KWARGS if last and hidden_out else {}
        self.moe = moe  # a MoE model's router statistics travel with the hidden states (`pipeline_moe`)
        self._entry: torch.Tensor | None = None
        self._exit: torch.Tensor | None = None
        if not first:
            owned = [b for b in find_blocks(model) if not isinstance(b, PassThrough)]
            # prepend: before any hook that parallelisms put on the block (the sequence-parallel
            # slice must see the stage's input, not the model's stand-in for it).
            owned[0].register_forward_pre_hook(self._enter, with_kwargs=True, prepend=True)
        if not last:
            model.get_output_embeddings().register_forward_hook(self._leave)

    def _enter(self, block, args, kwargs):
        def real(placeholder: torch.Tensor) -> torch.Tensor:
            # A recomputed block (activation checkpointing) sees the same placeholder again, and
            # must get the same input back even if later micro-batches have entered since.
            entry = getattr(placeholder, "_loomtrain_stage_input", None)
            if entry is None:
                entry = self._entry
                placeholder._loomtrain_stage_input = entry
            return entry

        if args and isinstance(args[0], torch.Tensor):
            return (real(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": real(kwargs["hidden_states"])}

    def _leave(self, head, inputs, output):
        self._exit = output

    def forward(self, x: torch.Tensor, *carried: torch.Tensor, position_ids: torch.Tensor):
        """Hidden states (logits on the last stage); with `moe`, followed by the running router
        statistics (`pipeline_moe`), received as `carried` on every stage but the first."""
        self._exit = None
        extra = {**self.extra, "output_router_logits": True} if self.moe is not None else self.extra
        if self.first:
            result = self.model(input_ids=x, position_ids=position_ids, use_cache=False, **extra)
        else:
            self._entry = x
            try:
                result = self.model(inputs_embeds=x, position_ids=position_ids, use_cache=False, **extra)
            finally:
                self._entry = None
        out = result.hidden_states[-1] if self.extra else result.logits
        if self._exit is not None:
            out, self._exit = self._exit, None
        out = out.clone() if out._base is not None else out
        if self.moe is None:
            return out
        return (out, *carry_router_stats(self.moe, carried, result.router_logits))


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
    backward (W) of a micro-batch in `timeline`.

    torch's schedules accumulate gradients over micro-batches themselves only when a stage's
    module *is* the FSDP or DDP module; ours is a `StageModule` around it, so a full backward
    runs inside `sync(last_backward)` (`Parallelized.micro_batch`): gradients are reduced once,
    on the schedule's last backward of the stage. A split backward (zero-bubble input/weight)
    keeps FSDP's per-backward hooks as they are."""

    def __init__(self, *args, timeline: Timeline, sync=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.timeline = timeline
        self.sync = sync

    def forward_one_chunk(self, fwd_chunk_id: int, *args, **kwargs):
        with self.timeline.record("F", self.stage_index, fwd_chunk_id):
            return super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)

    def backward_one_chunk(self, bwd_chunk_id: int, loss=None, full_backward: bool = True,
                           last_backward: bool = False):
        accumulate = (self.sync(last_backward) if self.sync is not None and full_backward
                      else contextlib.nullcontext())
        with self.timeline.record("B", self.stage_index, bwd_chunk_id), accumulate:
            return super().backward_one_chunk(bwd_chunk_id, loss=loss, full_backward=full_backward,
                                              last_backward=last_backward)

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
    stages: list = field(default_factory=list)  # this rank's `TimedStage`s, in `stage_ids` order
    token_ranks: int = 1  # ranks that see different tokens (the auxiliary term's scale)
    moe: MoeAux | None = None  # a MoE model's auxiliary loss, finished by the last stage
    token_sums: list = field(default_factory=list)  # the last stage's token-loss sums of the step

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last(self) -> bool:
        return self.n_stages - 1 in self.stage_ids

    def settle(self, n: int) -> list:
        """After a step that ran `n` micro-batches through the last stage: their token-loss sums
        (and the MoE statistics counted), without any call of the loss on shape inference."""
        sums = self.token_sums[len(self.token_sums) - n:] if n else []
        self.token_sums = []
        if self.moe is not None:
            self.moe.keep_last(n)
        return sums

    @classmethod
    def build(cls, parts: list[nn.Module], ids: list[int], n_stages: int, pp_group, device: torch.device,
              schedule: str, n_microbatches: int, syncs: list | None = None, loss_choice: LossChoice | None = None,
              autocast_dtype: torch.dtype | None = None, moe: MoeAux | None = None) -> "Pipeline":
        """`syncs[i](last)`: the context part i's full backward runs in (see `TimedStage`). A
        zero-bubble schedule splits most backwards into input and weight halves, and FSDP's
        hooks fire on the input half: there they are left to reduce every micro-batch.
        `loss_choice` (fused): the last stage returns final hidden states and the loss function
        applies that stage's head through the fused linear + cross-entropy. `moe`: the model's
        auxiliary loss, whose router statistics the stages pass on (`pipeline_moe`)."""
        timeline = Timeline()
        if not syncs or schedule in _SPLIT_BACKWARD:
            syncs = [None] * len(parts)
        fused = loss_choice is not None and loss_choice.fused
        spec = moe.spec if moe is not None else None
        stages = [TimedStage(StageModule(part, first=sid == 0, last=sid == n_stages - 1, hidden_out=fused, moe=spec),
                             sid, n_stages, device, group=pp_group, timeline=timeline, sync=sync)
                  for part, sid, sync in zip(parts, ids, syncs)]
        pipe = cls(None, ids, n_stages, timeline, stages=stages, moe=moe)
        head_root = next((part for part, sid in zip(parts, ids) if sid == n_stages - 1), None)

        def loss_fn(output, labels: torch.Tensor) -> torch.Tensor:
            # The schedule's first step also calls this on its shape-inference forward: what it
            # records is kept for the step's real micro-batches only (`Pipeline.settle`).
            final = output[0] if isinstance(output, (tuple, list)) else output
            if fused:
                token_sum = head_loss_sum(final, head_root, loss_choice, labels, autocast_dtype=autocast_dtype)
            else:
                token_sum = token_loss_sum(final, labels)
            pipe.token_sums.append(token_sum.detach())
            loss = token_sum * pipe.scale
            if moe is None:
                return loss
            counts, rows = split_stats(output[1])
            aux = moe.term_of(counts, output[2], rows, pipe.token_ranks, defer=True)
            if aux is None:
                return loss
            if isinstance(loss, DTensor):  # tp: the same term on every tp rank
                aux = DTensor.from_local(aux, loss.device_mesh, loss.placements, run_check=False)
            return loss + aux

        if schedule in _SINGLE:
            pipe.schedule = _SINGLE[schedule](stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn,
                                              scale_grads=False)
        else:
            pipe.schedule = _MULTI[schedule](stages, n_microbatches=n_microbatches, loss_fn=loss_fn,
                                             scale_grads=False)
        return pipe
