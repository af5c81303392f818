"""The training loop's hook protocol: the named points where components join the loop.

The loop (`loomtrain.runtime.trainer.Trainer`) is a short loop; everything else that happens
during training (checkpoints, metrics, the pipeline timeline, sample logs, and later optimizer
offload, straggler and hang detection) is a component registered on these points:

    after_setup(loop)                once, when the model, optimizer and data exist (resume here)
    begin_fit(loop)                  when `fit` starts (signal handlers, metric sinks)
    for every optimizer step:
        before_step(loop)
        ... forward and backward of every micro-batch ...
        after_backward(loop)         gradients are reduced, not yet clipped
        before_optimizer_step(loop)  after clipping, right before `optimizer.step()`
        after_optimizer_step(loop)   parameters updated, `loop.step` already counts this step
        after_step(loop, record)     the step's metrics record; return True to request a stop
    on_stop(loop)                    a component requested a stop: every component hears it
    end_fit(loop, exc)               always, last; `exc` is what ended the loop, or None

`end_fit` runs in reverse registration order (the last set up is the first torn down), so a
component registered early (metrics) still sees what later ones (the checkpointer) left in
`loop` when they ended. A component implements only the points it needs, by subclassing `Hook`.

This module is the bottom layer's: it imports nothing from loomtrain, so any layer (checkpoint,
offload, resilience) can write components against it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

POINTS = ("after_setup", "begin_fit", "before_step", "after_backward", "before_optimizer_step",
          "after_optimizer_step", "after_step", "on_stop", "end_fit")


@dataclass
class LoopState:
    """What the loop shares with its components. `step` counts completed optimizer steps (it is
    restored on resume); the rest describes the step in flight or the run's end."""

    step: int = 0
    max_steps: int = 0
    last_result: Any = None  # the forward/backward result of the step in flight
    last_checkpoint: str | None = None  # newest committed checkpoint, set by the checkpointer
    stop_reason: str | None = None
    extra: dict = field(default_factory=dict)  # further facts components publish for the summary

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


class Hook:
    """A component of the loop. Every point is a no-op here; override the ones you need."""

    def after_setup(self, loop: LoopState) -> None: ...

    def begin_fit(self, loop: LoopState) -> None: ...

    def before_step(self, loop: LoopState) -> None: ...

    def after_backward(self, loop: LoopState) -> None: ...

    def before_optimizer_step(self, loop: LoopState) -> None: ...

    def after_optimizer_step(self, loop: LoopState) -> None: ...

    def after_step(self, loop: LoopState, record: dict) -> bool | None: ...

    def on_stop(self, loop: LoopState) -> None: ...

    def end_fit(self, loop: LoopState, exc: BaseException | None) -> None: ...


class Hooks:
    """The registered components, called in registration order (`end_fit` in reverse)."""

    def __init__(self, hooks: list[Hook] | None = None):
        self.hooks: list[Hook] = list(hooks or [])

    def add(self, hook: Hook) -> Hook:
        if not isinstance(hook, Hook):
            raise TypeError(f"{type(hook).__name__} is not a loomtrain.hooks.Hook")
        self.hooks.append(hook)
        return hook

    def __iter__(self):
        return iter(self.hooks)

    def call(self, point: str, loop: LoopState) -> None:
        for hook in self.hooks:
            getattr(hook, point)(loop)

    def after_step(self, loop: LoopState, record: dict) -> bool:
        """Every component sees the record; True if any of them asked to stop."""
        stop = False
        for hook in self.hooks:
            stop = bool(hook.after_step(loop, record)) or stop
        return stop

    def end_fit(self, loop: LoopState, exc: BaseException | None) -> None:
        """Every component ends, even when one raises; the first error is re-raised afterwards
        (unless the loop is already unwinding an exception, which the caller re-raises)."""
        first: BaseException | None = None
        for hook in reversed(self.hooks):
            try:
                hook.end_fit(loop, exc)
            except BaseException as err:  # noqa: BLE001 -- the others still get to end
                first = first or err
        if first is not None and exc is None:
            raise first
