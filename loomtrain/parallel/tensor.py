"""Tensor parallelism (Megatron-style) and sequence parallelism for HF decoder models.

Driven by the model's own `base_model_tp_plan` (`"layers.*.self_attn.q_proj": "colwise"`, ...);
models without one get a plan from their module names (q/k/v, gate/up colwise; o/down rowwise),
and a module that cannot be classified is an error that names it. Parameters become DTensors on
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

import re

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)
from torch.distributed.tensor.parallel.style import ParallelStyle

from loomtrain.errors import ConfigError

_COLWISE_NAMES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "query", "key", "value", "fc1",
                  "w1", "w3", "c_fc")
_ROWWISE_NAMES = ("o_proj", "down_proj", "out_proj", "dense", "fc2", "w2")


def layer_plan(model: nn.Module, blocks: nn.ModuleList) -> dict[str, str]:
    """Per-block plan {relative module path: "colwise" | "rowwise"}, from the HF config's
    `base_model_tp_plan` or derived from the linear layers' names."""
    plan = getattr(model.config, "base_model_tp_plan", None) or {}
    per_layer = {}
    for pattern, style in plan.items():
        match = re.match(r"^(?:[\w.]*\.)?layers\.\*\.(.+)$", pattern)
        if match:
            per_layer[match.group(1)] = style.replace("_rep", "")
    if per_layer:
        return per_layer
    block = blocks[0]
    for name, module in block.named_modules():
        if not name:
            continue
        leaf = name.rsplit(".", 1)[-1]
        is_linear = isinstance(module, nn.Linear)
        if type(module).__name__ == "Conv1D":
            raise ConfigError(
                f"parallel.tp: {type(model).__name__} uses a fused Conv1D ({name}) that tensor parallelism "
                "cannot split yet; run this model with parallel.tp=1")
        if not is_linear:
            continue
        if leaf in _COLWISE_NAMES:
            per_layer[name] = "colwise"
        elif leaf in _ROWWISE_NAMES:
            per_layer[name] = "rowwise"
        else:
            raise ConfigError(f"parallel.tp: cannot tell whether {type(block).__name__}.{name} is column- or "
                              f"row-parallel; the model has no base_model_tp_plan to say")
    return per_layer


def _find(model: nn.Module, kind: type, exclude: set[int]) -> tuple[str, nn.Module]:
    for name, module in model.named_modules():
        if isinstance(module, kind) and id(module) not in exclude:
            return name, module
    raise ConfigError(f"parallel.tp: {type(model).__name__} has no {kind.__name__} to parallelise")


def _norm_children(block: nn.Module) -> list[str]:
    return [n for n, m in block.named_children() if "norm" in type(m).__name__.lower() or n.endswith("norm")]


def _input_prep(module_forward_kwarg: bool) -> PrepareModuleInput:
    """All-gather the sequence shard before attention/MLP. HF calls attention with keyword
    arguments and the MLP positionally, hence the two forms."""
    if module_forward_kwarg:
        return PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                  desired_input_kwarg_layouts={"hidden_states": Replicate()},
                                  use_local_output=True)
    return PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                              use_local_output=True)


def apply_tp(model: nn.Module, blocks: nn.ModuleList, tp_mesh: DeviceMesh, *, sequence_parallel: bool) -> None:
    """Shard a (meta) HF causal LM over `tp_mesh` in place."""
    per_layer = layer_plan(model, blocks)
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
    if isinstance(head, nn.Linear):
        parallelize_module(head, tp_mesh, ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1),
                                                          use_local_output=False))
    elif sequence_parallel:
        # A stage that ends before the head hands the next stage full-length hidden states, as
        # HF rebuilds masks and rotary tables from the input length there.
        model.set_output_embeddings(GatherSequence(tp_mesh))
    owned = [i for i, block in enumerate(blocks) if any(True for _ in block.parameters())]
    for i, block in enumerate(blocks):
        if i not in owned:
            continue
        plan: dict[str, object] = {}
        attention_like = set()
        for path, style in per_layer.items():
            leaf = path.rsplit(".", 1)[-1]
            if replicate_kv and style.startswith("colwise") and leaf in ("k_proj", "v_proj", "key", "value"):
                plan[path] = ReplicatedKV(kv_heads, cfg.num_attention_heads, tp)
                block.get_submodule(path.rsplit(".", 1)[0]).num_key_value_groups = heads // tp
            elif style.startswith("colwise"):
                plan[path] = ColwiseParallel()
            elif style.startswith("rowwise"):
                plan[path] = RowwiseParallel(output_layouts=seq)
            else:
                raise ConfigError(f"parallel.tp: unsupported TP style {style!r} for {path} in the model's plan")
            if "." in path:
                attention_like.add(path.rsplit(".", 1)[0])
        if sequence_parallel:
            for norm in _norm_children(block):
                plan[norm] = SequenceParallel(use_local_output=True)
            for parent in attention_like:
                plan[parent] = _input_prep(module_forward_kwarg="attn" in parent)
            if i == owned[0]:
                plan[""] = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                                              use_local_output=True)
        _reject_unsharded_head_dims(block, tp)
        block_input = plan.pop("", None)
        parallelize_module(block, tp_mesh, plan)
        if block_input is not None:  # block 0 slices the full-length input to its sequence shard
            parallelize_module(block, tp_mesh, block_input)
    if sequence_parallel:
        final_norm = _final_norm(model, blocks)
        if final_norm is not None:
            parallelize_module(final_norm, tp_mesh, SequenceParallel(use_local_output=True))
    _retie(ties)


class ReplicatedKV(ParallelStyle):
    """K/V projection when there are fewer KV heads than TP ranks (GQA/MQA): the weights stay whole
    on every rank (Replicate), and each rank keeps the one KV head its query heads attend to.

    Rank j holds query heads [j*H/tp, (j+1)*H/tp), which all read KV head j*kv/tp. Each rank's
    gradient reaches only its own head's rows, so the output is handed back with Partial grad
    placements: DTensor sums the ranks' contributions into the replicated weight's gradient.
    """

    def __init__(self, kv_heads: int, heads: int, tp: int):
        super().__init__()
        self.kv_heads, self.heads, self.tp = kv_heads, heads, tp

    def _partition(self, name, module, mesh):
        for pname, param in list(module.named_parameters(recurse=False)):
            module.register_parameter(pname, nn.Parameter(distribute_tensor(param, mesh, [Replicate()])))

    @staticmethod
    def _input(module, inputs, mesh):
        x = inputs[0]
        return (x if isinstance(x, DTensor) else DTensor.from_local(x, mesh, [Replicate()], run_check=False),
                *inputs[1:])

    def _output(self, module, output, mesh):
        local = output.to_local(grad_placements=[Partial()])
        width = local.shape[-1] // self.kv_heads
        head = mesh.get_local_rank() * self.kv_heads // self.tp
        return local[..., head * width:(head + 1) * width]

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, self._partition, self._input,
                                 lambda mod, out, mesh: self._output(mod, out, mesh))


class GatherSequence(nn.Module):
    """All-gather a [b, S/tp, d] sequence shard to [b, S, d] (backward: keep this rank's slice)."""

    def __init__(self, tp_mesh: DeviceMesh):
        super().__init__()
        self.tp_mesh = tp_mesh

    def forward(self, x):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(x, self.tp_mesh, [Shard(1)]).redistribute(self.tp_mesh, [Replicate()]).to_local()


def _final_norm(model: nn.Module, blocks: nn.ModuleList) -> nn.Module | None:
    """The norm applied after the last block (`model.norm`, `transformer.ln_f`)."""
    inside = {id(m) for m in blocks.modules()}
    found = None
    for name, module in model.named_modules():
        if id(module) not in inside and ("norm" in type(module).__name__.lower() or name.endswith("ln_f")):
            found = module
    return found


def _reject_unsharded_head_dims(block: nn.Module, tp: int) -> None:
    """Attention modules reshape with `-1` heads, so local heads follow from the local width."""
    for name, module in block.named_modules():
        if hasattr(module, "num_heads") and isinstance(module.num_heads, int) and module.num_heads % tp:
            raise ConfigError(f"parallel.tp={tp} does not divide {name}.num_heads={module.num_heads}")


def _tied_parameters(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for pname, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((module, pname))
    return [places for places in owners.values() if len(places) > 1]


def _retie(ties: list[list[tuple[nn.Module, str]]]) -> None:
    """A tied embedding/head shares one vocabulary-sharded DTensor (both are sharded on dim 0)."""
    for places in ties:
        first_module, first_name = places[0]
        for module, pname in places[1:]:
            module._parameters[pname] = first_module._parameters[first_name]
