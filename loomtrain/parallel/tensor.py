"""Tensor parallelism (Megatron-style) and sequence parallelism for HF decoder models.

Driven by the model's own `base_model_tp_plan` (`"layers.*.self_attn.q_proj": "colwise"`, ...),
each style string read exactly by `tp_plan` and applied by `parallel_style`; models without a
plan get one from their module names (q/k/v, gate/up colwise; o/down rowwise), and a module that
cannot be classified is an error that names it. Parameters become DTensors on
the "tp" mesh, so their names (and checkpoints) do not change.

Where the activations live (sequence parallel on):

    embed (vocab-parallel, all-reduce) -> full [b, S, d]   HF builds masks and rotary from it
    block 0 input: sliced to this rank's [b, S/tp, d]       no communication
    norm (on the sequence shard) -> all-gather -> q,k,v / gate,up (column shards, local heads)
    -> o / down (row shards) -> reduce-scatter -> [b, S/tp, d] + residual
    final norm -> all-gather -> lm_head (vocab shards) -> logits DTensor, loss_parallel

The residual stream stays a plain local tensor, and the embedding output stays full length
because HF computes the attention mask, `cache_position` and rotary tables from the embedding
output's length; sharding it there would make those S/tp long. The price is one all-reduce
instead of a reduce-scatter at the embedding, once per forward.

Without sequence parallel, norms are replicated plain tensors and the residual stream is full
length on every rank (row-parallel outputs are all-reduced).
"""
from __future__ import annotations

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, RowwiseParallel, SequenceParallel,
                                               parallelize_module)

from loomtrain.errors import ConfigError
from loomtrain.parallel.tensor_styles import (Conv1DColwise, Conv1DRowwise, GatherHiddenStates, GatherSequence,
                                              ReplicatedFusedQKV, ReplicatedGradSum, ReplicatedKV, SliceHiddenStates)
from loomtrain.parallel.moe_tp import expert_paths, skipped_in_block, sparse_plan
from loomtrain.parallel.tp_plan import PlanEntry, block_entries, model_plan, refusal

_COLWISE_NAMES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "query", "key", "value", "fc1",
                  "w1", "w3", "c_fc")
_ROWWISE_NAMES = ("o_proj", "down_proj", "out_proj", "dense", "fc2", "w2", "c_proj")
# Fused [q | k | v] projections whose thirds are laid out one after another (GPT-2's Conv1D).
_FUSED_QKV = {"gpt2": "c_attn"}


def layer_plan(model: nn.Module, blocks: nn.ModuleList) -> list[PlanEntry]:
    """Per-block plan: the model's `base_model_tp_plan` read exactly (`tp_plan.block_entries`),
    or, for a model without one, derived from the linear layers' names (colwise / rowwise, GPT-2's
    fused `c_attn`). Every entry must name a module of a block (a mixture-of-experts model's
    entries for its experts and for the dense MLP its sparse blocks lack are dropped first:
    `moe_tp`); an entry loomtrain cannot apply is a `ConfigError` naming it."""
    model_type = model.config.model_type
    # A pipeline stage's blocks before its own are parameter-free stand-ins.
    owned = [b for b in blocks if any(True for _ in b.parameters())] or [blocks[0]]
    block = owned[0]
    entries = block_entries(sparse_plan(model_plan(model.config), owned, model.config), model_type)
    for entry in entries:
        module = next((m for m in (_submodule(b, entry.path) for b in owned) if m is not None), None)
        if module is None:
            raise refusal(model_type, f"layers.*.{entry.path}", entry.style,
                          f"which names no module of {type(block).__name__} (a parameter, or a missing layer)")
        if _is_conv1d(module) and entry.meaning not in ("colwise", "rowwise"):
            raise refusal(model_type, f"layers.*.{entry.path}", entry.style, "on an HF Conv1D layer")
    if entries:
        return entries
    fused = _FUSED_QKV.get(model_type)
    for name, module in block.named_modules():
        if not name:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if not (isinstance(module, nn.Linear) or _is_conv1d(module)):
            continue
        if leaf == fused:
            entries.append(PlanEntry(name, "fused_qkv", "fused_qkv"))
        elif leaf in ("c_attn", "qkv_proj", "query_key_value", "Wqkv"):
            raise refusal(model_type, f"{type(block).__name__}.{name}", "(none: the model has no tp plan)",
                          "a fused QKV projection whose head layout loomtrain does not know")
        elif leaf in _COLWISE_NAMES:
            entries.append(PlanEntry(name, "colwise", "colwise"))
        elif leaf in _ROWWISE_NAMES:
            entries.append(PlanEntry(name, "rowwise", "rowwise"))
        else:
            raise ConfigError(f"parallel.tp: cannot tell whether {type(block).__name__}.{name} is column- or "
                              f"row-parallel; {model_type} has no base_model_tp_plan to say; run it with parallel.tp=1")
    return entries + _head_local_modules(block, entries)


def check_sequence_parallel(blocks: nn.ModuleList, entries: list[PlanEntry]) -> None:
    """Sequence parallelism gathers the sequence at the entry of the module holding a block's
    projections (`self_attn`, `mlp`): a projection directly in the block (OPT's `fc1`/`fc2`,
    after the block flattens its tokens) has no such module to gather at, so it is refused."""
    loose = [e.path for e in entries if "." not in e.path]
    if loose:
        raise ConfigError(f"parallel.sequence_parallel: {type(blocks[0]).__name__}.{loose[0]} is a tensor-parallel "
                          "projection directly in the decoder block, where loomtrain cannot gather the sequence; "
                          "set parallel.sequence_parallel=false")


def _head_local_modules(block: nn.Module, entries: list[PlanEntry]) -> list[PlanEntry]:
    """For a plan derived from names: modules with weights of their own beside a column-parallel
    projection (HunYuan's per-head `query_layernorm`) see only this rank's heads, so their weight
    gradients are partial sums that must be added over tp, as a model's own plan says with
    `replicated_with_grad_allreduce` (Qwen3's q_norm)."""
    parents = {e.path.rsplit(".", 1)[0] for e in entries if e.meaning in ("colwise", "fused_qkv") and "." in e.path}
    planned = {e.path for e in entries}
    extra = []
    for parent in sorted(parents):
        for name, module in block.get_submodule(parent).named_children():
            path = f"{parent}.{name}"
            if path in planned or isinstance(module, nn.Linear) or _is_conv1d(module):
                continue
            if any(p is not None for p in module._parameters.values()):
                extra.append(PlanEntry(path, "replicated_with_grad_allreduce", "replicated_with_grad_allreduce"))
    return extra


def _submodule(block: nn.Module, path: str) -> nn.Module | None:
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def _norm_children(block: nn.Module) -> list[str]:
    return [n for n, m in block.named_children() if "norm" in type(m).__name__.lower() or n.endswith("norm")]


def apply_tp(model: nn.Module, blocks: nn.ModuleList, tp_mesh: DeviceMesh, *, sequence_parallel: bool) -> None:
    """Shard a (meta) HF causal LM over `tp_mesh` in place. A mixture-of-experts model's experts
    are left alone (expert-parallel or replicated over tp: `moe_tp`)."""
    per_layer = layer_plan(model, blocks)
    if sequence_parallel:
        check_sequence_parallel(blocks, per_layer)
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    tp = tp_mesh.size()
    replicate_kv = kv_heads % tp != 0
    if replicate_kv and tp % kv_heads:
        raise ConfigError(f"parallel.tp={tp} and num_key_value_heads={kv_heads}: one must divide the other")
    ties = _tied_parameters(model)
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    seq = Shard(1) if sequence_parallel else Replicate()
    # Vocabulary-parallel embedding and head; the logits stay sharded over the vocabulary. A
    # pipeline stage may own neither (they are nn.Identity there).
    if isinstance(embed, nn.Embedding):
        parallelize_module(embed, tp_mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()))
    if isinstance(head, nn.Linear):  # its input is full length again (see the final norm below)
        parallelize_module(head, tp_mesh, ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1),
                                                          use_local_output=False))
    elif sequence_parallel:
        # A stage that ends before the head hands the next stage full-length hidden states, as
        # HF rebuilds masks and rotary tables from the input length there.
        model.set_output_embeddings(GatherSequence(tp_mesh))
    owned = [i for i, block in enumerate(blocks) if any(True for _ in block.parameters())]
    for i, block in enumerate(blocks):
        if i not in owned:
            continue
        _reject_unsharded_head_dims(block, tp)  # before localize_head_counts makes them local
        plan: dict[str, object] = {}
        attention_like = set()
        experts = expert_paths(block, cfg)
        for entry in per_layer:
            path, leaf = entry.path, entry.path.rsplit(".", 1)[-1]
            if experts and skipped_in_block(block, path, experts):  # a sparse block's missing dense MLP
                continue
            parent = block.get_submodule(path.rsplit(".", 1)[0]) if "." in path else block
            conv1d = _is_conv1d(block.get_submodule(path))
            if entry.meaning == "fused_qkv":
                parent.split_size = parent.split_size // tp  # [q | k | v] of this rank's heads
            elif replicate_kv and entry.meaning == "colwise" and leaf in _KV_NAMES:
                parent.num_key_value_groups = heads // tp
            plan[path] = parallel_style(entry.meaning, conv1d=conv1d, seq=seq, tp=tp,
                                        kv_heads=kv_heads if replicate_kv and leaf in _KV_NAMES else None)
            if "." in path:
                attention_like.add(path.rsplit(".", 1)[0])
        # Heads become local only where a projection is split by columns (Phi-3's gathered qkv_proj
        # leaves every head on every rank).
        for parent in {e.path.rsplit(".", 1)[0] for e in per_layer if "." in e.path
                       and e.meaning in ("colwise", "fused_qkv")}:
            localize_head_counts(block.get_submodule(parent), heads, kv_heads, tp)
        if sequence_parallel:
            for norm in _norm_children(block):
                plan[norm] = SequenceParallel(use_local_output=True)
            for parent in attention_like:
                plan[parent] = GatherHiddenStates()
            if i == owned[0]:
                plan[""] = SliceHiddenStates()
        block_input = plan.pop("", None)
        parallelize_module(block, tp_mesh, plan)
        if block_input is not None:  # block 0 slices the full-length input to its sequence shard
            parallelize_module(block, tp_mesh, block_input)
    if sequence_parallel:
        # The final norm runs on the sequence shard and gathers its output to full length: HF code
        # after the last block may assume it (GPT-2 reshapes with the full sequence length).
        final_norm = _final_norm(model, blocks)
        if final_norm is not None:
            parallelize_module(final_norm, tp_mesh, SequenceParallel(use_local_output=True))
            gather = GatherSequence(tp_mesh)
            final_norm.register_forward_hook(lambda module, inputs, output: gather(output))
    _retie(ties)


_KV_NAMES = ("k_proj", "v_proj", "key", "value")


def parallel_style(meaning: str, *, conv1d: bool, seq, tp: int, kv_heads: int | None = None) -> ParallelStyle:
    """The DTensor `ParallelStyle` with the meaning of one plan entry (see `tp_plan`).
    `seq`: where row-parallel outputs go (Shard(1) under sequence parallelism, else Replicate);
    `kv_heads`: set for a colwise K/V projection with fewer KV heads than tp ranks."""
    if meaning == "fused_qkv":
        return ReplicatedFusedQKV(tp)
    if meaning == "colwise":
        if kv_heads is not None:
            return ReplicatedKV(kv_heads, tp)
        return Conv1DColwise() if conv1d else ColwiseParallel()
    if meaning == "rowwise":
        return Conv1DRowwise(seq) if conv1d else RowwiseParallel(output_layouts=seq)
    if meaning == "colwise_gather_output":  # whole projection on every rank after an all-gather
        return ColwiseParallel(output_layouts=Replicate())
    if meaning == "rowwise_split_input":  # whole input: each rank slices its part of the last dim
        return RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
    if meaning == "replicated_with_grad_allreduce":
        return ReplicatedGradSum()
    raise ValueError(f"no ParallelStyle for {meaning!r}")  # block_entries refuses these before


def _final_norm(model: nn.Module, blocks: nn.ModuleList) -> nn.Module | None:
    """The norm applied after the last block (`model.norm`, `transformer.ln_f`)."""
    inside = {id(m) for m in blocks.modules()}
    found = None
    for name, module in model.named_modules():
        if id(module) not in inside and ("norm" in type(module).__name__.lower() or name.endswith("ln_f")):
            found = module
    return found


# Attributes in which HF attention modules keep head counts and reshape with (OPT's
# `view(b, -1, self.num_heads, d)`, StableLM's `view(b, s, self.num_key_value_heads, d)`).
_QUERY_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
_KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_head_kv")


def localize_head_counts(module: nn.Module, heads: int, kv_heads: int, tp: int) -> None:
    """After its projections are column-sharded, an attention module holds heads/tp query heads
    (and kv_heads/tp KV heads, or one replicated KV head when tp > kv_heads): head-count attributes
    that still say the global count would reshape this rank's columns into the wrong number of
    heads. Only an attribute holding the model's global count is changed (one already local, or a
    count of something else, is left alone). Megatron and torchtitan keep per-partition counts the
    same way; HF models that reshape with -1 have no such attribute to fix."""
    local_kv = max(1, kv_heads // tp)
    for names, full, local in ((_QUERY_HEAD_ATTRS, heads, heads // tp), (_KV_HEAD_ATTRS, kv_heads, local_kv)):
        for name in names:
            value = getattr(module, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value == full and full != local:
                setattr(module, name, local)


def _reject_unsharded_head_dims(block: nn.Module, tp: int) -> None:
    """Attention modules reshape with `-1` heads, so local heads follow from the local width."""
    for name, module in block.named_modules():
        if hasattr(module, "num_heads") and isinstance(module.num_heads, int) and module.num_heads % tp:
            raise ConfigError(f"parallel.tp={tp} does not divide {name}.num_heads={module.num_heads}")


def _tied_parameters(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for pname, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((module, pname))
    return [places for places in owners.values() if len(places) > 1]


def _retie(ties: list[list[tuple[nn.Module, str]]]) -> None:
    """A tied embedding/head shares one vocabulary-sharded DTensor (both are sharded on dim 0)."""
    for places in ties:
        first_module, first_name = places[0]
        for module, pname in places[1:]:
            setattr(module, pname, getattr(first_module, first_name))
