"""The one place that decides in which order parallelisms are applied to a (stage of a) model.

Order: tensor parallel (and expert parallel) -> context parallel -> activation checkpointing -> compile -> FSDP.
- TP first: it replaces parameters by DTensors sharded over the tp mesh; FSDP then shards those
  DTensors again over the dp mesh (2-D parameters). The other way round FSDP would have to know
  the TP layout of every parameter.
- Activation checkpointing before FSDP: the recomputed region must be the block's own forward,
  with FSDP's all-gather hooks outside it, or backward would all-gather each block twice.
- compile per block after checkpointing so the compiled region includes the recomputation
  decision, and before FSDP so FSDP's hooks are not traced.
- FSDP last, wrapping blocks and then the root (see data_parallel.apply_fsdp).
ZeRO-0/1 wrap the whole model in DDP instead; that happens after materialisation (DDP needs real
tensors to broadcast), so it is returned as a separate step.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn as nn

from loomtrain.config import Config
from loomtrain.errors import ConfigError
from loomtrain.kernels.hf import use_packed
from loomtrain.kernels.select import PACKED, choose_attention
from loomtrain.parallel.activation import apply_activation_checkpointing
from loomtrain.parallel.context.apply import apply_cp
from loomtrain.parallel.data_parallel import accumulate, apply_ddp, apply_fsdp
from loomtrain.parallel.expert import apply_ep, shard_experts
from loomtrain.parallel.tensor import apply_tp
from loomtrain.mesh import Mesh
from loomtrain.models.build import find_blocks


@dataclass
class Parallelized:
    module: nn.Module  # the model with its own parameter names (FSDP-sharded or plain)
    wrapper: nn.Module | None  # DDP wrapper to call for forward (ZeRO-0/1), else None
    uses_fsdp: bool
    tensor_parallel: bool  # logits come out vocabulary-sharded (DTensor): use loss_parallel
    autocast_dtype: torch.dtype | None  # compute dtype when mixed precision is done by autocast
    checkpointed_blocks: list[int]
    cp: int = 1  # context-parallel degree: each rank holds a slice of every sequence
    cp_rank: int = 0
    cp_impl: str = "ulysses"
    attention: str = "sdpa"  # the attention in use, as the run banner names it
    zero: int = 0  # the ZeRO stage in force (parallel.zero)
    grad_sync: str = "step"  # parallel.grad_sync: reduce gradients once per step, or every micro-batch

    def micro_batch(self, last: bool) -> AbstractContextManager:
        """Wrap one micro-batch's forward and backward: gradients are reduced only on the last
        micro-batch of a step (`data_parallel.accumulate`), unless `parallel.grad_sync=micro_batch`."""
        return accumulate(self.module, self.wrapper, last=last or self.grad_sync == "micro_batch",
                          keep_params=self.uses_fsdp and self.zero == 2)


def parallelize(model: nn.Module, cfg: Config, mesh: Mesh | None) -> Parallelized:
    """Apply the config's parallelisms to a model whose parameters are still on the meta device."""
    pcfg = cfg.parallel
    compute_dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    blocks = find_blocks(model)
    if mesh is not None and mesh["tp"].size() > 1:
        apply_tp(model, blocks, mesh["tp"], sequence_parallel=pcfg.sequence_parallel)
    # Expert parallelism next to TP: both turn parameters into DTensors that FSDP shards again.
    experts = apply_ep(model, model.config, mesh["ep"]) if mesh is not None and pcfg.ep > 1 else []
    cp = 1 if mesh is None else mesh["cp"].size()
    # Context-parallel paths always run the packed kernel; the plain path takes it unless the
    # model needs what it lacks (`kernels.select`, which also refuses an impossible explicit choice).
    choice = choose_attention(cfg.model.attn_implementation, model.config, cfg.data.seq_len)
    if cp > 1:
        apply_cp(model, mesh["cp"], pcfg.cp_impl)
        attention = f"{pcfg.cp_impl} cp{cp} over the packed kernel"
    elif pcfg.sequence_scheduler == "hetero":  # groups are chosen per micro-step by the executor
        apply_cp(model, None, "ulysses")
        attention = "hetero Ulysses groups over the packed kernel"
    else:
        if choice.name == PACKED:
            use_packed(model)
        elif model.config._attn_implementation != choice.name:
            model.set_attn_implementation(choice.name)
        attention = f"{choice.name} ({choice.reason})"
    checkpointed = apply_activation_checkpointing(blocks, pcfg.activation_checkpointing)
    if pcfg.compile:
        for block in blocks:
            block.compile()  # in place: parameter names keep no `_orig_mod.` prefix
    dp_size = 1 if mesh is None else mesh["dp_cp"].size()
    uses_fsdp = dp_size > 1 and pcfg.zero >= 2
    offload_params = cfg.offload.params
    if offload_params and not uses_fsdp:  # ZeRO<3 is refused by the config checks already
        raise ConfigError("offload.params=true needs FSDP, i.e. parallel.zero=3 over more than one data-parallel "
                          f"rank; this layout has {dp_size}")
    if uses_fsdp:
        if experts:  # each rank's experts first, so the blocks' FSDP leaves them alone
            shard_experts(experts, mesh["experts_fsdp"], param_dtype=compute_dtype,
                          zero=pcfg.zero, offload_params=offload_params)
        apply_fsdp(model, blocks, mesh, zero=pcfg.zero, param_dtype=compute_dtype, offload_params=offload_params)
    mixed_by_autocast = not uses_fsdp and compute_dtype != torch.float32
    tp = mesh is not None and mesh["tp"].size() > 1
    return Parallelized(model, None, uses_fsdp, tp, compute_dtype if mixed_by_autocast else None, checkpointed,
                        cp=cp, cp_rank=mesh["cp"].get_local_rank() if cp > 1 else 0, cp_impl=pcfg.cp_impl,
                        attention=attention, zero=pcfg.zero, grad_sync=pcfg.grad_sync)


def wrap_after_materialize(par: Parallelized, cfg: Config, mesh: Mesh | None) -> Parallelized:
    """DDP for ZeRO-0/1 once parameters hold real values."""
    if mesh is not None and not par.uses_fsdp and mesh["dp_cp"].size() > 1:
        par.wrapper = apply_ddp(par.module, mesh)
    return par
