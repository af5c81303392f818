"""`build_optimizer`: AdamW over decay / no-decay groups, sharded by ZeRO-1 when asked."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor

from loomtrain.mesh import Mesh


def build_optimizer(model: nn.Module, *, zero: int, mesh: Mesh | None, lr: float,
                    weight_decay: float, betas: tuple[float, float], eps: float,
                    optimizer_class: type | None = None, optimizer_kwargs: dict | None = None) -> torch.optim.Optimizer:
    """AdamW over two groups: matrices decay, vectors (norm weights, biases) do not (as Megatron
    and nanoGPT do). ZeRO-1 shards its state with `ZeroRedundancyOptimizer`.

    `fused=True`: one kernel for the whole update of a group (CPU and CUDA), DTensor shards included.
    `optimizer_class` (with its own `optimizer_kwargs`) replaces AdamW, e.g. the offload layer's
    `OffloadAdamW`; ZeRO-1 then wraps that class.
    """
    # Groups are also split by layout (plain tensors vs DTensors on one mesh): fused/foreach
    # kernels cannot take a list that mixes them, which plain TP (replicated norms) produces.
    by_key: dict[tuple, list] = {}
    for param in model.parameters():
        if param.requires_grad:
            layout = (param.device_mesh, param.placements) if isinstance(param, DTensor) else None
            by_key.setdefault((param.ndim >= 2, str(layout)), []).append(param)
    groups = [{"params": ps, "weight_decay": weight_decay if decays else 0.0}
              for (decays, _), ps in sorted(by_key.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]
    cls = optimizer_class or torch.optim.AdamW
    kwargs = dict(lr=lr, betas=betas, eps=eps, **((optimizer_kwargs or {}) if optimizer_class else {"fused": True}))
    if zero == 1 and mesh is not None and mesh["dp_cp"].size() > 1:
        zro = ZeroRedundancyOptimizer(groups[0]["params"], optimizer_class=cls,
                                      process_group=mesh["dp_cp"].get_group(),
                                      parameters_as_bucket_view=_bucket_view(groups, optimizer_class),
                                      weight_decay=groups[0]["weight_decay"], **kwargs)
        for group in groups[1:]:
            zro.add_param_group(group)
        return zro
    return cls(groups, **kwargs)


def _bucket_view(groups: list[dict], optimizer_class: type | None) -> bool:
    """Whether ZeRO-1 may pack the parameters into one flat bucket per rank, so that the updated
    shards go out in one broadcast per rank and step instead of one per parameter (DeepSpeed's
    stage 1 likewise all-gathers flat partitions).

    The bucket makes every `param.data` a view into it, which needs plain dense tensors of one
    dtype (torch's own requirement). A replacement optimizer class (the offload layer's) keeps the
    per-parameter broadcasts: it manages its own copies of the parameters' storage."""
    params = [p for g in groups for p in g["params"]]
    return (optimizer_class is None and all(type(p) is nn.Parameter and p.layout == torch.strided for p in params)
            and len({p.dtype for p in params}) <= 1)
