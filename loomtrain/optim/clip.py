"""Gradient-norm clipping that is correct on sharded gradients (DTensor shards, pipeline stages)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float, pp_group=None) -> torch.Tensor:
    """Global L2 norm of all gradients (a DTensor norm is reduced over its mesh; pipeline stages'
    squared norms are summed over `pp_group`), clipped in place when `max_norm > 0`.
    Returns the norm before clipping as a plain tensor."""
    with_grad = [p for p in params if p.grad is not None]
    # Norms are computed per group of gradients with the same layout (plain, or DTensor on one
    # mesh with one set of placements): foreach kernels cannot mix them, and a DTensor norm is
    # reduced over its own mesh. The groups' norms then combine as a root of summed squares.
    groups: dict[tuple, list[torch.nn.Parameter]] = {}
    for p in with_grad:
        g = p.grad
        key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else ("plain", g.device)
        groups.setdefault(key, []).append(p)
    squares = []
    for members in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in members], norm_type=2.0, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm.double() ** 2)
    device = with_grad[0].device if with_grad else torch.device("cpu")
    total_sq = torch.stack(squares).sum() if squares else torch.zeros((), dtype=torch.float64, device=device)
    if pp_group is not None:
        dist.all_reduce(total_sq, group=pp_group)
    total = total_sq.sqrt().float()
    if max_norm > 0:
        for members in groups.values():
            torch.nn.utils.clip_grads_with_norm_(members, max_norm, total, foreach=True)
    return total
