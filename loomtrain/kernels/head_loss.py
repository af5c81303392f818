"""The model's loss through the fused path: run the HF model for its final hidden states and
apply the output head inside `fused_linear_cross_entropy`, so the `[tokens, vocab]` logits are
never built.

The model is called whole (through its DDP/FSDP wrapper, so every hook runs) with
`logits_to_keep=1` (HF's head runs on the last position only: [batch, 1, vocab], which stays
unused; zero positions would be cheaper but DTensor cannot view an empty vocab-sharded tensor) and
`output_hidden_states=True`; HF's last hidden state is the
output of the final norm (the exact input its head would get). The head's weight is then read
from the model:
- FSDP2 root: `unshard()` first (under ZeRO-3 the root reshards after its forward); the gradient
  lands on the unsharded parameter and FSDP's post-backward reduce-scatters it as usual.
- tensor parallel: the weight is a DTensor sharded over the vocabulary (`Shard(0)`); this rank's
  rows (`to_local`, whose backward returns the gradient to the DTensor) and their offset in the
  vocabulary form the `VocabShard` the kernel combines over.
- tied embeddings: the head's weight is the embedding's, so both gradients add up on one tensor.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate, Shard

from loomtrain.kernels.fused_loss import VocabShard, fused_linear_cross_entropy, liger_loss
from loomtrain.kernels.loss_select import LIGER, LossChoice

# What the model is called with on the fused path: HF's head runs on the last position only, and
# the final norm's output (the head's input) comes back as the last hidden state.
HIDDEN_KWARGS = {"logits_to_keep": 1, "output_hidden_states": True}


def fused_model_loss(call, root: nn.Module, choice: LossChoice, *, input_ids: torch.Tensor,
                     position_ids: torch.Tensor, labels: torch.Tensor,
                     autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sum of token cross-entropies (labels != -100) of the model `call` (the module or its DDP
    wrapper) whose unwrapped module is `root`; the same number `token_loss_sum(logits, labels)` gives."""
    autocast = (torch.autocast(input_ids.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    with autocast:
        out = call(input_ids=input_ids, position_ids=position_ids, use_cache=False, **HIDDEN_KWARGS)
    hidden = out.hidden_states[-1]
    del out
    return head_loss_sum(hidden, root, choice, labels, autocast_dtype=autocast_dtype)


def head_loss_sum(hidden: torch.Tensor, root: nn.Module, choice: LossChoice, labels: torch.Tensor, *,
                  autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sum of token cross-entropies of the final hidden states `hidden` (HF's last hidden state,
    called with `HIDDEN_KWARGS`) through the output head of `root`: the part of the fused loss
    after the model. A pipeline's last stage calls it from the schedule's loss function, on what
    the stage returned."""
    if isinstance(root, FSDPModule):
        root.unshard()
    head = root.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    shard = None
    if isinstance(weight, DTensor):
        weight, shard = _local_rows(weight)
        if bias is not None:
            bias, _ = _local_rows(bias)
    if isinstance(hidden, DTensor):
        hidden = hidden.to_local() if all(isinstance(p, Replicate) for p in hidden.placements) else hidden.full_tensor()
    if autocast_dtype is not None:  # what autocast does to the head's matmul in the stock path
        hidden, weight = hidden.to(autocast_dtype), weight.to(autocast_dtype)
        bias = None if bias is None else bias.to(autocast_dtype)
    else:
        hidden = hidden.to(weight.dtype)
    if choice.path == LIGER and shard is None:
        return liger_loss(hidden, weight, labels, bias=bias, transform=choice.transform)
    return fused_linear_cross_entropy(hidden, weight, labels, bias=bias, transform=choice.transform,
                                      chunk_tokens=choice.chunk_tokens, shard=shard)


def _local_rows(param: DTensor) -> tuple[torch.Tensor, VocabShard | None]:
    """This rank's rows of a head parameter on a 1-D tensor-parallel mesh, and where they start."""
    mesh = param.device_mesh
    placements = tuple(param.placements)
    if mesh.ndim != 1 or placements not in ((Shard(0),), (Replicate(),)):
        raise ValueError(f"the output head's layout {placements} on a {mesh.ndim}-D mesh is not "
                         "vocabulary-parallel over one tensor-parallel dimension")
    local = param.to_local()
    if placements == (Replicate(),):
        return local, None
    rows = math.ceil(param.shape[0] / mesh.size())  # torch.chunk's split, as DTensor shards
    start = min(mesh.get_local_rank() * rows, param.shape[0])
    if local.shape[0] != min(rows, param.shape[0] - start):
        raise ValueError(f"head shard of {local.shape[0]} rows does not start at row {start}")
    return local, VocabShard(mesh.get_group(), start)
