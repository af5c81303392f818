"""Tensor-parallel styles torch does not ship, for HF layers as they are.

torch's ColwiseParallel/RowwiseParallel cover `nn.Linear` and `nn.Embedding`; HF models also use
`Conv1D` (GPT-2: y = x @ W + b with W stored [in, out]), fused QKV projections, fewer KV heads
than TP ranks, and pass attention inputs positionally or by keyword. Each style here keeps the
parameter a DTensor whose shards are contiguous slices of the HF tensor (or the whole tensor), so
checkpoints stay in the model's own layout.

Gradient rule used throughout: a rank that uses only its slice of a replicated projection's output
hands the output back with `grad_placements=[Partial()]`; DTensor then sums the ranks' gradient
contributions into the replicated weight's gradient and into the replicated input's.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle


def _replicated_input(module, inputs, mesh):
    x = inputs[0]
    return (x if isinstance(x, DTensor) else DTensor.from_local(x, mesh, [Replicate()], run_check=False),
            *inputs[1:])


def _distribute_params(module: nn.Module, mesh: DeviceMesh, placements: dict[str, list]) -> None:
    for pname, param in list(module.named_parameters(recurse=False)):
        module.register_parameter(pname, nn.Parameter(distribute_tensor(param, mesh, placements[pname])))


class _HiddenStatesLayout(ParallelStyle):
    """Redistribute a module's `hidden_states` input (positional, as GPT-2 passes it, or keyword,
    as Llama does) from one sequence layout to another; the module sees a local tensor."""

    source: object
    target: object

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def convert(x):
            return DTensor.from_local(x, device_mesh, [self.source], run_check=False).redistribute(
                device_mesh, [self.target]).to_local()

        def hook(mod, args, kwargs):
            if args and isinstance(args[0], torch.Tensor):
                args = (convert(args[0]), *args[1:])
            elif isinstance(kwargs.get("hidden_states"), torch.Tensor):
                kwargs = {**kwargs, "hidden_states": convert(kwargs["hidden_states"])}
            return args, kwargs

        module.register_forward_pre_hook(hook, with_kwargs=True)
        return module


class GatherHiddenStates(_HiddenStatesLayout):
    """Before attention or MLP under sequence parallelism: all-gather [b, S/tp, d] to [b, S, d]."""

    source, target = Shard(1), Replicate()


class SliceHiddenStates(_HiddenStatesLayout):
    """Into the first block under sequence parallelism: keep this rank's [b, S/tp, d] slice of the
    full-length embedding output (backward: all-gather the slices' gradients)."""

    source, target = Replicate(), Shard(1)


class Conv1DColwise(ParallelStyle):
    """HF `Conv1D` split over its output features (W[:, cols], b[cols]); output stays local."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(
            module, device_mesh,
            lambda name, mod, mesh: _distribute_params(mod, mesh, {"weight": [Shard(1)], "bias": [Shard(0)]}),
            _replicated_input, lambda mod, out, mesh: out.to_local())


class Conv1DRowwise(ParallelStyle):
    """HF `Conv1D` split over its input features (W[rows, :]); partial sums are reduced into
    `output_layout` (Replicate, or Shard(1) under sequence parallelism)."""

    def __init__(self, output_layout=None):
        super().__init__()
        self.output_layout = output_layout or Replicate()

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def local_input(mod, inputs, mesh):
            x = inputs[0]
            return (x if isinstance(x, DTensor) else DTensor.from_local(x, mesh, [Shard(-1)], run_check=False),
                    *inputs[1:])

        return distribute_module(
            module, device_mesh,
            lambda name, mod, mesh: _distribute_params(mod, mesh, {"weight": [Shard(0)], "bias": [Replicate()]}),
            local_input, lambda mod, out, mesh: out.redistribute(mesh, [self.output_layout]).to_local())


class ReplicatedFusedQKV(ParallelStyle):
    """A fused [q | k | v] projection (GPT-2's `c_attn`) kept whole on every rank; each rank keeps
    the columns of its own heads from each third. Sharding it instead would need a strided layout
    that checkpoints cannot store as one slice; the cost is 3·d² replicated weights per layer."""

    def __init__(self, tp: int):
        super().__init__()
        self.tp = tp

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def output(mod, out, mesh):
            local = out.to_local(grad_placements=[Partial()])
            third = local.shape[-1] // 3
            width = third // self.tp
            j = mesh.get_local_rank()
            return torch.cat([local[..., k * third + j * width:k * third + (j + 1) * width] for k in range(3)], dim=-1)

        return distribute_module(
            module, device_mesh,
            lambda name, mod, mesh: _distribute_params(mod, mesh, {"weight": [Replicate()], "bias": [Replicate()]}),
            _replicated_input, output)


class ReplicatedKV(ParallelStyle):
    """K/V projection when there are fewer KV heads than TP ranks (GQA/MQA): the weights stay whole
    on every rank, and each rank keeps the one KV head its query heads attend to (rank j holds
    query heads [j·H/tp, (j+1)·H/tp), which all read KV head j·kv/tp)."""

    def __init__(self, kv_heads: int, tp: int):
        super().__init__()
        self.kv_heads, self.tp = kv_heads, tp

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def output(mod, out, mesh):
            local = out.to_local(grad_placements=[Partial()])
            width = local.shape[-1] // self.kv_heads
            head = mesh.get_local_rank() * self.kv_heads // self.tp
            return local[..., head * width:(head + 1) * width]

        return distribute_module(
            module, device_mesh,
            lambda name, mod, mesh: _distribute_params(mod, mesh, {n: [Replicate()] for n, _ in
                                                                   mod.named_parameters(recurse=False)}),
            _replicated_input, output)


class GatherSequence(nn.Module):
    """All-gather a [b, S/tp, d] sequence shard to [b, S, d] (backward: keep this rank's slice).
    Stands in for the head on pipeline stages that end before it."""

    def __init__(self, tp_mesh: DeviceMesh):
        super().__init__()
        self.tp_mesh = tp_mesh

    def forward(self, x):
        return DTensor.from_local(x, self.tp_mesh, [Shard(1)]).redistribute(self.tp_mesh, [Replicate()]).to_local()


class _SumGradOverGroup(torch.autograd.Function):
    """Identity forward; backward all-reduces (sums) the gradient over `group`."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class ReplicatedGradSum(ParallelStyle):
    """transformers' `replicated_with_grad_allreduce`: a module (Qwen3's or Gemma-3's per-head
    `q_norm`/`k_norm`) whose weights stay whole on every rank but which only sees this rank's heads,
    so each rank's weight gradient is a partial sum over heads and the ranks' gradients must be added.

    The sum is taken on the way into the weight's gradient, inside autograd, once per backward:
    during the module's forward each parameter is replaced by an identity view whose backward
    all-reduces over the tp group. Reducing the accumulated `.grad` after each backward instead (as
    transformers' own object does) would sum earlier micro-batches' gradients again on every
    micro-batch of an accumulated step. The parameter stays a plain tensor (FSDP shards it as any
    other replicated weight) and the gradient norm counts it once."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        group = device_mesh.get_group()
        saved: list[dict] = []

        def swap_in(mod, args):
            params = dict(mod._parameters)
            saved.append(params)
            for name, param in params.items():
                if param is not None and param.requires_grad and torch.is_grad_enabled():
                    mod._parameters[name] = _SumGradOverGroup.apply(param, group)

        def swap_out(mod, args, output):
            mod._parameters.update(saved.pop())
            return output

        module.register_forward_pre_hook(swap_in)
        module.register_forward_hook(swap_out, always_call=True)
        return module
