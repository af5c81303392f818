"""Expert parallelism (`parallel.ep`): each rank holds E/ep of a MoE layer's experts and tokens
travel to them with an uneven all-to-all.

Mesh. ep is carved from dp_shard (torchtitan and Megatron do the same): dp_shard = dp_shard_mod_ep
x ep, ep innermost. Dense parts (attention, norms, routers, embeddings) stay data-parallel and
FSDP-sharded over all dp_shard ranks as before; expert weights are DTensors sharded on dim 0 (the
expert dim) over "ep", and FSDP shards each rank's experts again over "dp_shard_mod_ep". A
parameter keeps its HF name and global shape, so checkpoints (DCP) reshard across ep degrees.
With pp, the expert mesh keeps pp outermost: each stage's experts live on that stage's ep ranks.
With tp (no sequence parallelism), attention is tensor-parallel as the model's plan says, minus
the expert entries and the dense-MLP entries sparse blocks lack (`moe_tp`), and each MoE layer runs
replicated over tp: tp ranks see the same tokens and do the same dispatch in their own ep groups.
With dp_replicate (HSDP) the experts' FSDP mesh is (dp_replicate, dp_shard_mod_ep) and the
dense part's (dp_replicate, dp_shard), so the gradient arithmetic below holds with dp = dp_replicate
x dp_shard. With cp, the experts' FSDP spans dp_shard_mod_ep x cp (every rank holding the same
experts) and dp counts the cp ranks too (token_ranks = dp x cp).

Which modules. The model's own plan where transformers has one: `base_model_ep_plan` entries of
style `ep_dispatch_experts` name the expert containers (`layers.*.mlp.experts`), whose grouped
weights `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I] are the `grouped_gemm` entries. Without
a plan, every module holding such grouped [E, ...] weights. The router stays the model's: this
module changes only what the experts compute with, through transformers' own `ExpertsInterface`
(`loomtrain_ep`), so the block's top-k, its weight normalisation and the recorded router logits
(the auxiliary loss, `models.moe`) are untouched.

Dispatch, for the T token rows of this rank, top-k experts each (index i_tj, weight w_tj):
    1. the T*k (token, expert) pairs, stably sorted by expert; c_e pairs go to expert e;
    2. counts exchanged (all_to_all of [E] integers): rank r learns c_e^s for its experts from
       every rank s; send splits sum c_e over each destination's experts, receive splits over
       each source's -- uneven, nothing dropped, no capacity limit;
    3. rows exchanged: all_to_all_single with those splits (differentiable: its backward is the
       reverse all-to-all of the gradients);
    4. the received rows regrouped by local expert e and multiplied, one expert at a time (the
       reference grouped GEMM): y = down_e (act(gate_e x) * up_e x), with the model's own gate;
    5. results sent back by the reverse all-to-all and combined on the owning rank exactly as HF
       does: out_t = sum_j w_tj * y_tj (index_add into the token rows).
The arithmetic per pair is HF's; only the order of the final sums differs (float noise).

Gradients. Every rank back-propagates its tokens' loss times dp / global tokens (the step
averages over data parallel). An expert's gradient arrives from the tokens of its ep group only,
so summed over the dp_shard_mod_ep = dp/ep replicas it is dp x the true gradient. The experts'
FSDP averages over those replicas (divides by dp/ep), so each rank scales its local expert
gradients by 1/ep on the way back (`_ScaleGrad`; FSDP's own divide factor would be the
natural place, but a factor other than the mesh size needs PREMUL_SUM, which gloo lacks).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from loomtrain.errors import ConfigError
from loomtrain.models.moe import MoeSpec, grouped_experts
from loomtrain.parallel.data_parallel import offload_policy

EP_IMPL = "loomtrain_ep"
CONTEXT_ATTR = "_loomtrain_ep"
_WEIGHTS = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class ExpertGroup:
    """What an expert container needs at forward time: the ep group and its place in it."""

    group: dist.ProcessGroup
    size: int
    rank: int
    num_experts: int

    @property
    def local_experts(self) -> int:
        return self.num_experts // self.size


# --------------------------------------------------------------------------- which modules
def _plan_patterns(hf_config) -> list[str]:
    plan = getattr(hf_config, "base_model_ep_plan", None) or {}
    return [key for key, style in plan.items() if style == "ep_dispatch_experts"]


def expert_containers(model: nn.Module, hf_config) -> list[tuple[str, nn.Module]]:
    """(name, module) of every expert container, from the model's `base_model_ep_plan` or, without
    one, by detection of grouped expert weights. Raises a one-line ConfigError when the model has
    experts this module cannot dispatch to."""
    spec = MoeSpec.of(hf_config)
    if spec is None:
        raise ConfigError(f"parallel.ep: {hf_config.model_type} is not a mixture-of-experts model")
    patterns = _plan_patterns(hf_config)
    prefix = getattr(model, "base_model_prefix", "model") + "."
    found = []
    if patterns:
        for name, module in model.named_modules():
            rel = name.removeprefix(prefix)
            if any(fnmatch.fnmatchcase(rel, pat) for pat in patterns):
                found.append((name, module))
    else:
        ids = {id(m) for m in grouped_experts(model, spec.num_experts)}
        found = [(n, m) for n, m in model.named_modules() if id(m) in ids]
    if not found:
        raise ConfigError(f"parallel.ep: found no expert container in {type(model).__name__} (no base_model_ep_plan "
                          "entry and no grouped gate_up_proj/down_proj weights)")
    for name, module in found:
        weights = [getattr(module, w, None) for w in _WEIGHTS]
        if any(not isinstance(w, nn.Parameter) or w.dim() != 3 or w.shape[0] != spec.num_experts for w in weights) \
                or getattr(module, "has_bias", False) or getattr(module, "is_transposed", False) \
                or not getattr(module, "is_concatenated", True) or not getattr(module, "has_gate", True):
            raise ConfigError(f"parallel.ep: {name} ({type(module).__name__}) is not a grouped gate_up_proj/down_proj "
                              "expert container without biases; expert parallelism does not support it yet")
    return found


# --------------------------------------------------------------------------- dispatch
def _exchange(rows: torch.Tensor, recv_splits: list[int], send_splits: list[int], group) -> torch.Tensor:
    """Differentiable uneven all-to-all of token rows."""
    out = rows.new_empty((sum(recv_splits), rows.shape[1]))
    return dist_fn.all_to_all_single(out, rows, recv_splits, send_splits, group=group)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `scale` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def _local(weight: torch.Tensor, ep: int) -> torch.Tensor:
    """This rank's experts of a weight, with the 1/ep gradient factor of the module docstring."""
    return _ScaleGrad.apply(weight.to_local() if isinstance(weight, DTensor) else weight, 1.0 / ep)


def ep_experts_forward(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor) -> torch.Tensor:
    """`ExpertsInterface` function: HF's experts forward, with the experts spread over ep ranks."""
    ctx: ExpertGroup = getattr(module, CONTEXT_ATTR)
    n_local, ep = ctx.local_experts, ctx.size
    k = top_k_index.shape[1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = order // k
    counts = torch.bincount(flat, minlength=ctx.num_experts)
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=ctx.group)
    send_splits = counts.view(ep, n_local).sum(1).tolist()
    recv_splits = recv_counts.view(ep, n_local).sum(1).tolist()
    received = _exchange(hidden_states[token], recv_splits, send_splits, ctx.group)
    # Received rows come source by source, each source's sorted by expert: regroup by expert.
    local_ids = torch.repeat_interleave(torch.arange(n_local, device=flat.device).repeat(ep), recv_counts)
    by_expert = torch.argsort(local_ids, stable=True)
    gate_up, down = _local(module.gate_up_proj, ep), _local(module.down_proj, ep)
    outs = []
    for e, rows in enumerate(received[by_expert].split(recv_counts.view(ep, n_local).sum(0).tolist())):
        outs.append(F.linear(module._apply_gate(F.linear(rows, gate_up[e])), down[e]))
    computed = torch.cat(outs)
    back = torch.empty_like(by_expert)
    back[by_expert] = torch.arange(by_expert.numel(), device=by_expert.device)
    returned = _exchange(computed[back], send_splits, recv_splits, ctx.group)
    weighted = returned * top_k_weights.reshape(-1)[order, None]
    return torch.zeros_like(hidden_states).index_add_(0, token, weighted.to(hidden_states.dtype))


# --------------------------------------------------------------------------- apply
def _shard_dim0(param: nn.Parameter, mesh: DeviceMesh) -> nn.Parameter:
    """The parameter as a DTensor sharded on dim 0 over `mesh`, global shape kept (meta or real)."""
    size, rank = mesh.size(), mesh.get_local_rank()
    n = param.shape[0] // size
    local = param.detach()[rank * n:(rank + 1) * n]
    local = torch.empty_like(local) if local.is_meta else local.clone()
    return nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=param.shape,
                                           stride=param.stride()), requires_grad=param.requires_grad)


def apply_ep(model: nn.Module, hf_config, ep_mesh: DeviceMesh) -> list[nn.Module]:
    """Shard every expert container's weights over `ep_mesh` and route its forward through the
    all-to-all dispatch. Returns the containers (for `shard_experts`)."""
    spec = MoeSpec.of(hf_config)
    containers = expert_containers(model, hf_config)
    if spec.num_experts % ep_mesh.size():
        raise ConfigError(f"parallel.ep={ep_mesh.size()} does not divide the model's {spec.num_experts} experts")
    ctx = ExpertGroup(ep_mesh.get_group(), ep_mesh.size(), ep_mesh.get_local_rank(), spec.num_experts)
    for _, module in containers:
        for name in _WEIGHTS:
            setattr(module, name, _shard_dim0(getattr(module, name), ep_mesh))
        setattr(module, CONTEXT_ATTR, ctx)
    ALL_EXPERTS_FUNCTIONS.register(EP_IMPL, ep_experts_forward)
    model.set_experts_implementation(EP_IMPL)
    return [module for _, module in containers]


def shard_experts(containers: list[nn.Module], shard_mesh: DeviceMesh, *, param_dtype: torch.dtype,
                  zero: int, reduce_dtype: torch.dtype = torch.float32, offload_params: bool = False) -> None:
    """FSDP of each rank's experts over `shard_mesh` (dp_shard_mod_ep; with dp_replicate, HSDP
    over (dp_replicate, dp_shard_mod_ep)), before the blocks are wrapped (their FSDP then leaves
    these parameters alone). Gradients are divided by the whole data-parallel size `dp` in
    effect: FSDP divides by the mesh size dp/ep, the forward's `_ScaleGrad` by ep (module
    docstring)."""
    mp = (MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
          if param_dtype != torch.float32 else MixedPrecisionPolicy())  # as data_parallel.apply_fsdp
    for module in containers:
        fully_shard(module, mesh=shard_mesh, mp_policy=mp, reshard_after_forward=zero == 3,
                    offload_policy=offload_policy(offload_params, shard_mesh.device_type))


# --------------------------------------------------------------------------- checks
def check_moe_layout(cfg, hf_config, degrees: dict[str, int]) -> None:
    """Refuse, before launch, the MoE layouts that would not compute the same loss as one process."""
    spec = MoeSpec.of(hf_config)
    ep = degrees.get("ep", 1)
    if spec is None:
        if ep > 1:
            raise ConfigError(f"parallel.ep={ep}: model_type={hf_config.model_type} has no experts; set parallel.ep=1")
        return
    if degrees["tp"] > 1 and cfg.parallel.sequence_parallel:
        raise ConfigError(f"parallel.tp={degrees['tp']} with a mixture-of-experts model needs "
                          "parallel.sequence_parallel=false (its MoE layers run replicated over tp on full-length "
                          "hidden states)")
    if cfg.parallel.sequence_scheduler == "hetero":
        raise ConfigError("parallel.sequence_scheduler=hetero with a mixture-of-experts model: its load-balancing "
                          "loss is defined per fixed micro-batch; use sequence_scheduler=static")
    if ep == 1:
        return
    if spec.num_experts % ep:
        raise ConfigError(f"parallel.ep={ep} does not divide the model's {spec.num_experts} experts")
    if cfg.parallel.zero < 2:
        raise ConfigError(f"parallel.ep={ep} needs parallel.zero=2 or 3 (FSDP): DDP would average expert "
                          "gradients over ranks that hold different experts")
    # pp: each stage's experts are sharded over the ep ranks of that stage (the expert mesh keeps
    # pp outermost); the stages pass the auxiliary loss's router statistics on (`pipeline_moe`).
    # tp: attention is tensor-parallel, the MoE layer replicated over tp (each tp rank runs the
    # same dispatch within its own ep group) -- which needs full-length hidden states there.
    # dp_replicate (HSDP): each rank's experts are replicated over dp_replicate and sharded over
    # dp_shard_mod_ep, like the dense part over dp_replicate x dp_shard. cp: the context-parallel
    # ranks of a row hold the same experts and send their own tokens; the experts' FSDP spans
    # them (dp_shard_mod_ep x cp), as the dense part's spans dp_shard x cp.
