"""What a step does with a NaN/inf loss, gradient norm or learning rate (`train.nonfinite`).

Decided before the optimizer step from numbers that are the same on every rank (the global loss
and gradient norm), so every rank decides alike and no collective is needed. Stopping raises
`NonFiniteError`: the parameters stay the last good ones and nothing is committed, so the newest
checkpoint is the state to go back to. `skip` drops the step instead and counts it. A non-finite
learning rate would poison every later step, so it always stops.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from loomtrain.checkpoint.signals import NonFiniteError


@dataclass
class NonFiniteGuard:
    policy: str  # train.nonfinite: "stop" or "skip"
    is_main: bool
    skipped: int = 0  # steps skipped so far (`skipped_steps` in the metrics record)

    def skip(self, step: int, loss: float, grad_norm: float, lr: float) -> bool:
        """True when the step must be skipped; raises when the run must stop; False otherwise."""
        bad = [f"{name} {value}" for name, value in (("loss", loss), ("grad norm", grad_norm), ("lr", lr))
               if not math.isfinite(value)]
        if not bad:
            return False
        if self.policy == "skip" and math.isfinite(lr):
            self.skipped += 1
            if self.is_main:
                print(f"loomtrain: warning: step {step}: non-finite {', '.join(bad)}: step skipped "
                      f"({self.skipped} so far)", flush=True)
            return True
        raise NonFiniteError(f"step {step}: non-finite {', '.join(bad)}; stopped before the optimizer step, "
                             "nothing committed (the newest checkpoint is the last good state; lower optim.lr, "
                             "set optim.grad_clip, or train.nonfinite=skip)")
