"""Tied input/output embeddings under pipeline parallelism (Megatron's "embedding group").

A model that ties its lm_head to its token embedding (Llama-3.2 1B/3B, Qwen3 up to 4B, Gemma,
GPT-2) uses one weight twice: to look tokens up on the first stage and to compute logits on the
last. Both stages hold a copy (`pipeline.carve_stage` keeps the embedding module on the last
stage too, unused, so the weight keeps its HF names and its layout-independent initialisation);
after every backward the two copies' gradients are summed over a process group of the first and
the last stage (one group per data/tensor/context coordinate), so both copies take the same
optimizer step from the gradient one process would compute, and stay equal.

In the gradient norm the weight counts once: the last stage leaves its copy out (the pipeline
sums the stages' squared norms), then clips it by the same factor as everything else, so the two
copies (and their Adam moments) stay identical. Checkpoint names are the non-pipelined model's (both stages
save `model.embed_tokens.weight` with the same value, the last stage `lm_head.weight` as well),
so a job resumes from a pipelined checkpoint into any layout, and back.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor


def ties_embeddings(model: nn.Module) -> bool:
    """True when the model's output embedding weight is its input embedding weight."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    return (embed is not None and head is not None and getattr(embed, "weight", None) is not None
            and embed.weight is getattr(head, "weight", None))


def embedding_groups(root_mesh, pp: int):
    """This rank's group of {first, last} pipeline rank with its own data/tensor/context
    coordinates. Every rank creates every such group, in the same order (new_group's contract)."""
    names = list(root_mesh.mesh_dim_names)
    ranks = root_mesh.mesh.movedim(names.index("pp"), 0).reshape(pp, -1)
    me = dist.get_rank()
    mine = None
    for column in range(ranks.shape[1]):
        members = sorted({int(ranks[0, column]), int(ranks[-1, column])})
        group = dist.new_group(members)
        if me in members:
            mine = group
    return mine


@dataclass
class TiedEmbeddings:
    """The shared weight's copies on this rank's first/last stages, and the group that sums them."""

    copies: list[nn.Parameter]  # the weight as held by this rank's first and/or last stage
    group: object
    last_copies: list[nn.Parameter]  # left out of the gradient norm (counted on the first stage)

    @classmethod
    def build(cls, parts: list[nn.Module], stage_ids: list[int], n_stages: int, root_mesh,
              pp: int) -> "TiedEmbeddings":
        """For a model that ties its embeddings (`ties_embeddings` of the whole model: every rank
        decides alike), carved into stages by `pipeline.carve_stage`."""
        group = embedding_groups(root_mesh, pp)
        copies, last = [], []
        for part, sid in zip(parts, stage_ids):
            if sid in (0, n_stages - 1):
                weight = part.get_input_embeddings().weight
                copies.append(weight)
                if sid == n_stages - 1:
                    last.append(weight)
        return cls(copies, group, last)

    def sum_grads(self) -> None:
        """Add the first and last stage's gradients of the shared weight (after backward)."""
        for weight in self.copies:
            grad = weight.grad
            if grad is None:  # a stage whose micro-batches did not reach it still takes part
                grad = weight.grad = torch.zeros_like(weight)
            if isinstance(grad, DTensor) and grad.placements != weight.placements:
                # A vocabulary-parallel embedding's gradient can come out replicated over tp while
                # the head's is sharded: give both stages the weight's own layout (a local slice).
                grad = weight.grad = grad.redistribute(weight.device_mesh, weight.placements)
            local = grad.to_local() if isinstance(grad, DTensor) else grad
            dist.all_reduce(local, group=self.group)

    def counted_once(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """`params` for the gradient norm, without the last stage's copy of the shared weight."""
        skip = {id(p) for p in self.last_copies}
        return [p for p in params if id(p) not in skip]

    def clip_left_out(self, max_norm: float, total_norm: torch.Tensor) -> None:
        """Clip the copy `counted_once` left out of the norm by the same factor as the rest (the
        first stage's copy was clipped with them), so that both copies take the same step."""
        if max_norm > 0 and self.last_copies:
            torch.nn.utils.clip_grads_with_norm_(self.last_copies, max_norm, total_norm, foreach=True)
