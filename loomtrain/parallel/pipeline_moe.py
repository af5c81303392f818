"""A mixture-of-experts model's load-balancing loss under pipeline parallelism.

HF's loss (`models.moe`) is not a sum of per-layer terms: it is E * sum_e f_e * P_e with f and
P both means over ALL layers' router outputs of one micro-batch. No stage can compute its share
alone. So each stage passes running sums of the router statistics on, next to the hidden states,
as extra outputs of its `StageModule` that torch.distributed.pipelining sends like any other
activation:

    stats    [E + 1]  expert-assignment counts summed over the layers so far, then the row count
                      (L_so_far * N); detached: f carries no gradient in HF's loss either
    prob_sum [E]      routing-probability sums over the same layers and rows; differentiable

Stage s receives (hidden, stats, prob_sum), adds its own layers' `router_terms` and sends the
sums on. The last stage's loss function finishes HF's formula (`MoeAux.term_of`) and adds it to
the token loss, so its gradient runs back through the pipeline's own backward: the schedule
sends d loss / d prob_sum to the previous stage with the hidden states' gradient, and each
stage's routers receive theirs. `stats` requires no gradient, so the schedule sends none for it.

The micro-batch is the pipeline's chunk, which is the loader's micro-batch (`n_microbatches` =
the rank's micro-batches), so the loss is the one every other layout computes.
"""
from __future__ import annotations

import torch

from loomtrain.models.moe import MoeSpec, router_terms


def carry_router_stats(spec: MoeSpec, carried: tuple, router_logits) -> tuple[torch.Tensor, torch.Tensor]:
    """(stats, prob_sum) after this stage's MoE layers: `carried` is what the previous stage sent
    (empty on the first stage), `router_logits` this stage's layers' logits (one [rows, E] each)."""
    counts, prob_sum, rows = router_terms(router_logits, spec)
    stats = torch.cat([counts, rows.reshape(1)])
    if carried:
        stats = carried[0].detach() + stats
        prob_sum = carried[1] + prob_sum
    return stats.detach(), prob_sum


def split_stats(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(assignment counts [E], rows) of a carried `stats` tensor."""
    return stats[:-1], stats[-1]
