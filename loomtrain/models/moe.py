"""Mixture-of-experts models: what the config says about routing, where the experts sit, and the
load-balancing auxiliary loss computed so that every layout gets the same number.

HF's loss (`load_balancing_loss_func` of modeling_mixtral / modeling_qwen3_moe, Switch Transformer
eq. 4-6), over the router logits of the L MoE layers of one forward of N token rows:

    f_e = (sum_l #{t : e in topk(softmax(z_lt))}) / (L*N)      fraction of assignments (no grad)
    P_e = (sum_l sum_t softmax(z_lt)_e) / (L*N)                 mean router probability
    aux = E * sum_e f_e * P_e,         training loss = CE + router_aux_loss_coef * aux

and only when `config.output_router_logits` is true (HF adds nothing otherwise).

HF computes it per forward call. loomtrain's unit is the *micro-batch*: `data.micro_batch_size`
rows at fixed global sample positions (`DataLoader`: rank r of dp takes a contiguous slice of the
step's samples and cuts it into micro-batches in order), so the set of micro-batches of a step is
the same for one process, any ZeRO stage, any dp size and any ep degree -- only which rank runs
which one changes. The step's auxiliary loss is the mean over the step's M = global_batch_size /
micro_batch_size micro-batches:

    loss_step = sum CE / global tokens + coef * (1/M) * sum_m aux_m

Ranks that share one micro-batch's tokens (context parallelism splits every row) sum their
counts and row numbers (one small all-reduce, no gradient) before forming f; each then
back-propagates E * sum_e f_e * P_e^local with P's denominator the micro-batch's global row
count, and these partial terms add up to aux_m exactly, value and gradient (f carries none). The
micro-batch unit, not the whole step, because f_e of the whole step is known only after the last
micro-batch's forward, while the first one's backward has already run: a whole-step statistic
would need a second forward pass or every micro-batch's graph kept alive.

Under pipeline parallelism no stage sees every layer's router logits: the stages carry running
sums of the counts and probability sums on with the hidden states, and the last stage finishes
the formula with `MoeAux.term_of` (`parallel.pipeline_moe`).

Expert containers come in two shapes in transformers 5.x: grouped weights (`gate_up_proj`,
`down_proj` parameters of shape [E, ...] in one `experts` module, dispatched through
`ExpertsInterface`), and older per-expert `nn.ModuleList`s. `expert_params` finds both.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

GROUPED_NAMES = ("gate_up_proj", "down_proj", "up_proj", "gate_proj")


@dataclass(frozen=True)
class MoeSpec:
    """Routing geometry of a MoE config: experts, experts per token, and the auxiliary loss."""

    num_experts: int
    top_k: int
    aux_coef: float
    aux_loss: bool  # config.output_router_logits: HF adds coef * aux to the loss only then

    @classmethod
    def of(cls, hf_config) -> "MoeSpec | None":
        """The spec of a MoE config, None for a dense one."""
        experts = getattr(hf_config, "num_local_experts", None) or getattr(hf_config, "num_experts", None)
        top_k = getattr(hf_config, "num_experts_per_tok", None)
        if not experts or not top_k:
            return None
        return cls(int(experts), int(top_k), float(getattr(hf_config, "router_aux_loss_coef", 0.0) or 0.0),
                   bool(getattr(hf_config, "output_router_logits", False)))


def grouped_experts(model: nn.Module, num_experts: int) -> list[nn.Module]:
    """Modules holding grouped expert weights: parameters named `gate_up_proj`/`down_proj`/...
    with one slice per expert on dim 0."""
    found = []
    for module in model.modules():
        params = [p for n, p in module.named_parameters(recurse=False) if n in GROUPED_NAMES]
        if params and all(p.dim() == 3 and p.shape[0] == num_experts for p in params):
            found.append(module)
    return found


def expert_params(model: nn.Module, num_experts: int) -> dict[int, nn.Parameter]:
    """Every parameter that belongs to one expert (grouped 3-D weights, or the members of a
    per-expert `nn.ModuleList` of length E), by id: the weights a token uses only if routed there."""
    out: dict[int, nn.Parameter] = {}
    for module in grouped_experts(model, num_experts):
        for p in module.parameters(recurse=False):
            out[id(p)] = p
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_experts and name.endswith("experts"):
            for p in module.parameters():
                out[id(p)] = p
    return out


def router_terms(router_logits, spec: MoeSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(assignment counts [E] (no grad), router probability sums [E] (with grad), rows) of one
    forward's router logits (one [rows, E] tensor per MoE layer), as HF's loss computes them."""
    counts = torch.zeros(spec.num_experts, dtype=torch.float32, device=router_logits[0].device)
    prob_sum = torch.zeros(spec.num_experts, dtype=torch.float32, device=router_logits[0].device)
    rows = 0
    for logits in router_logits:
        probs = F.softmax(logits.float(), dim=-1)
        _, chosen = torch.topk(probs, spec.top_k, dim=-1)
        counts += torch.bincount(chosen.reshape(-1), minlength=spec.num_experts).float()
        prob_sum = prob_sum + probs.sum(dim=0)
        rows += probs.shape[0]
    return counts, prob_sum, torch.tensor(float(rows), device=counts.device)


class MoeAux:
    """Per-step bookkeeping of the auxiliary loss and of the expert load, for a step runner.

    `term(router_logits)` gives what one micro-batch adds to the loss this rank back-propagates
    (already scaled like the token loss: by `token_ranks`, since gradients are averaged over the
    ranks that see different tokens); `finish()` returns the step's auxiliary loss and metrics.
    `share_group` is the group of ranks that hold parts of the same micro-batch (context
    parallel), None when every rank holds whole micro-batches."""

    def __init__(self, spec: MoeSpec, micro_batches_per_step: int, *, share_group=None):
        self.spec, self.m = spec, micro_batches_per_step
        self.share_group = share_group
        self._aux = 0.0  # this rank's partial sum of aux_m over its micro-batches
        self._counts = torch.zeros(spec.num_experts, dtype=torch.float64)
        self.metrics: dict = {}  # the last finished step's expert load (and auxiliary loss)
        self._pending: list = []  # deferred micro-batches (`term_of(defer=True)`)

    @property
    def forward_kwargs(self) -> dict:
        return {"output_router_logits": True}

    def term(self, router_logits, token_ranks: int) -> torch.Tensor | None:
        """The micro-batch's share of coef * aux / M, times token_ranks; None if the model adds no
        auxiliary loss (its expert load is still counted)."""
        return self.term_of(*router_terms(router_logits, self.spec), token_ranks)

    def term_of(self, counts: torch.Tensor, prob_sum: torch.Tensor, rows: torch.Tensor, token_ranks: int, *,
                defer: bool = False) -> torch.Tensor | None:
        """`term` from a micro-batch's router statistics summed over its layers (`router_terms`'
        three values; under pipeline parallelism, summed stage by stage: `parallel.pipeline_moe`).
        `defer`: not counted in the step until `keep_last` says it was a real micro-batch (a
        pipeline schedule's first step also calls its loss on a shape-inference forward)."""
        term, value = None, 0.0
        if self.spec.aux_loss:
            shared = torch.cat([counts, rows.reshape(1)])
            if self.share_group is not None:
                dist.all_reduce(shared, group=self.share_group)
            counts_all, rows_all = shared[:-1], shared[-1]
            partial = self.spec.num_experts * ((counts_all / rows_all) * (prob_sum / rows_all)).sum()
            value = float(partial.detach())
            term = partial * (self.spec.aux_coef * token_ranks / self.m)
        entry = (counts.detach().double().cpu(), value)
        if defer:
            self._pending.append(entry)
        else:
            self._add(*entry)
        return term

    def keep_last(self, n: int) -> None:
        """Count the last `n` deferred micro-batches in the step and forget the others."""
        for entry in self._pending[len(self._pending) - n:] if n else []:
            self._add(*entry)
        self._pending.clear()

    def _add(self, counts: torch.Tensor, value: float) -> None:
        self._counts += counts
        self._aux += value

    def finish(self, token_group, device: torch.device, pp_group=None) -> float:
        """coef * the step's auxiliary loss, reduced over `token_group` (and over `pp_group`: only
        the last pipeline stage computes it, from every stage's statistics); the expert load goes
        to `self.metrics`; resets for the next step."""
        t = torch.cat([torch.tensor([self._aux], dtype=torch.float64), self._counts]).to(device)
        for group in (token_group, pp_group):
            if group is not None:
                dist.all_reduce(t, group=group)
        aux = float(t[0]) / self.m
        counts = t[1:].cpu()
        self._aux, self._counts = 0.0, torch.zeros_like(self._counts)
        mean = float(counts.mean())
        metrics = {"moe_tokens_per_expert": [int(c) for c in counts.tolist()],
                   "moe_imbalance": float(counts.max()) / mean if mean > 0 else 0.0}
        if self.spec.aux_loss:
            metrics["aux_loss"] = aux
        self.metrics = metrics
        return self.spec.aux_coef * aux if self.spec.aux_loss else 0.0
