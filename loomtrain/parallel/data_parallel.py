"""Data parallelism at every ZeRO stage, on PyTorch's own building blocks.

| zero | what is sharded                     | built from                                            |
| ---- | ----------------------------------- | ----------------------------------------------------- |
| 0    | nothing (DDP)                       | `DistributedDataParallel`                             |
| 1    | optimizer state                     | DDP + `ZeroRedundancyOptimizer`                       |
| 2    | optimizer state, gradients          | FSDP2 `fully_shard(reshard_after_forward=False)`      |
| 3    | optimizer state, gradients, params  | FSDP2 `fully_shard(reshard_after_forward=True)`       |

With `dp_replicate > 1` the FSDP mesh is 2-D (replicate x shard): HSDP, sharding inside a group
and all-reducing across groups. FSDP2 keeps parameter names unchanged (they become DTensors), so
checkpoints and optimizer state stay keyed by the model's own HF names.

Gradient accumulation (`accumulate`): with several micro-batches per optimizer step, gradients
are reduced once per step, on the last micro-batch's backward, never after every micro-batch:

| zero | micro-batches before the last                        | collectives per step             |
| ---- | ---------------------------------------------------- | -------------------------------- |
| 0, 1 | DDP `no_sync`                                        | one all-reduce per bucket        |
| 2    | FSDP2 no gradient sync, no reshard after backward    | one all-gather + one reduce-scatter per unit |
| 3    | FSDP2 no gradient sync (parameters reshard as usual) | all-gathers per micro-batch, one reduce-scatter per unit |

ZeRO-2 thus keeps full parameters and full fp32 gradients between the micro-batches of a step;
ZeRO-3 keeps its parameter memory but holds full gradients. Where that memory is short,
`parallel.grad_sync=micro_batch` reduces (and keeps sharded) after every micro-batch instead.
FSDP2 accumulates the unsharded gradients in its reduce dtype (fp32), so the numbers are the same
as reducing every micro-batch, up to float summation order.
"""
from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from loomtrain.mesh import Mesh


def fsdp_mesh(mesh: Mesh) -> DeviceMesh:
    """The mesh FSDP shards over: 1-D over dp_shard x cp, or 2-D (HSDP) when dp_replicate > 1."""
    if mesh["dp_replicate"].size() > 1:
        return mesh["dp_replicate", "dp_shard_cp"]
    return mesh["dp_shard_cp"]


def offload_policy(offload_params: bool, device_type: str) -> OffloadPolicy:
    """`offload.params`: FSDP2's `CPUOffloadPolicy` keeps the sharded parameters and reduced
    gradients in host memory (copied in for each unit's all-gather, out after its reduce-scatter),
    so the optimizer steps them on the host. Pinned only where there is a device to copy to."""
    return CPUOffloadPolicy(pin_memory=device_type == "cuda") if offload_params else OffloadPolicy()


def apply_fsdp(model: nn.Module, blocks: nn.ModuleList, mesh: Mesh, *, zero: int,
               param_dtype: torch.dtype, reduce_dtype: torch.dtype = torch.float32,
               offload_params: bool = False) -> nn.Module:
    """Shard each decoder block, then the root (embeddings, final norm, head).

    Blocks are their own FSDP units so that only one block's full parameters exist at a time
    (ZeRO-3) and its all-gather overlaps the previous block's compute. The last block is not
    resharded after forward: backward starts with it immediately, so resharding would only buy an
    extra all-gather (torchtitan does the same).
    """
    dp_mesh = fsdp_mesh(mesh)
    # An fp32 policy on fp32 parameters is not free: FSDP2 would still cast every forward input.
    mp = (MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
          if param_dtype != torch.float32 else MixedPrecisionPolicy())
    reshard = zero == 3
    offload = offload_policy(offload_params, dp_mesh.device_type)
    for i, block in enumerate(blocks):
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, offload_policy=offload,
                    reshard_after_forward=reshard and i < len(blocks) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=reshard)
    return model


def apply_ddp(model: nn.Module, mesh: Mesh) -> nn.Module:
    """Replicate over all data- and context-parallel ranks (ZeRO-0/1): context ranks hold the same
    weights and see different tokens, so their gradients are averaged like data parallel ones.
    Returns the DDP wrapper; the caller keeps the inner module for names and state."""
    device = next(model.parameters()).device
    # Buffers (rotary tables) are computed identically everywhere: no per-forward sync. The switch
    # is `forward_sync_buffers` where torch has it, else `broadcast_buffers` (torch 2.11).
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
               else {"broadcast_buffers": False})
    return DDP(model, process_group=mesh["dp_cp"].get_group(),
               device_ids=[device] if device.type == "cuda" else None,
               gradient_as_bucket_view=True, **no_sync)


@contextlib.contextmanager
def accumulate(module: nn.Module, wrapper: nn.Module | None, *, last: bool, keep_params: bool):
    """Run one micro-batch's forward and backward inside this: unless `last`, its gradients stay
    local (accumulated) and, with `keep_params` (ZeRO-2), the full parameters stay gathered for
    the next micro-batch.

    `module` is the (FSDP-sharded or plain) model, `wrapper` its DDP wrapper or None. The FSDP
    switches are restored on exit, so nothing carries over to the next step or to a caller that
    runs the model outside a step. A plain model (one process, tensor/context parallel only)
    needs nothing."""
    if last:
        yield
        return
    if wrapper is not None:
        with wrapper.no_sync():
            yield
        return
    if not isinstance(module, FSDPModule):
        yield
        return
    module.set_requires_gradient_sync(False)
    if keep_params:
        module.set_reshard_after_backward(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)
        if keep_params:
            module.set_reshard_after_backward(True)
