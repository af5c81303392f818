"""Learning-rate schedule: linear warmup, then cosine, linear or constant."""
from __future__ import annotations

import math

from loomtrain.config import OptimConfig


def lr_lambda(cfg: OptimConfig, max_steps: int):
    """Linear warmup to `lr`, then cosine or linear decay to `lr * min_lr_ratio` at `max_steps`.

    `step` is the number of optimizer steps already taken, so the first step (step 0) runs at
    lr/warmup rather than 0: a zero first step would waste a step and make step 1's loss identical
    to step 2's.
    """
    warmup = cfg.warmup_steps
    floor = cfg.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant" or max_steps <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        if cfg.schedule == "linear":
            return 1.0 - (1.0 - floor) * progress
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
