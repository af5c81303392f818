"""The training loss: the sum of token cross-entropies, divided by the global count of valid
tokens of the step (never a mean of per-rank or per-micro-batch means)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over labels != -100 (labels are already shifted).

    Under tensor parallelism the logits are a DTensor sharded over the vocabulary; call this (and
    the backward) inside `loss_parallel()` so the softmax is computed across shards without
    gathering the full [tokens, vocab] logits on any rank."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                           reduction="sum")


@dataclass
class StepResult:
    loss: float  # global sum of token losses / global valid tokens
    valid_tokens: int  # global count of labels != -100
    exact_flops: float  # global sum of the ranks' exact training FLOPs (packed causal attention)
    sample_ids: list[int]  # this rank's samples
    tokens: int | None = None  # input tokens processed in the step, over all ranks
