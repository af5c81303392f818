"""The training loop's hook protocol: which points run, in which order, with what; a stop request
from a component; the end of the loop after an exception. One process, a tiny Llama."""
from __future__ import annotations

import pytest

from harness import case
from loomtrain.config import load_config
from loomtrain.hooks import Hook, Hooks, LoopState
from loomtrain.runtime.trainer import Trainer


class Recorder(Hook):
    def __init__(self, stop_at: int | None = None):
        self.calls: list[tuple] = []
        self.stop_at = stop_at

    def after_setup(self, loop):
        self.calls.append(("after_setup", loop.step))

    def begin_fit(self, loop):
        self.calls.append(("begin_fit", loop.step))

    def before_step(self, loop):
        self.calls.append(("before_step", loop.step))

    def after_backward(self, loop):
        self.calls.append(("after_backward", loop.step, loop.last_result.valid_tokens > 0))

    def before_optimizer_step(self, loop):
        self.calls.append(("before_optimizer_step", loop.step))

    def after_optimizer_step(self, loop):
        self.calls.append(("after_optimizer_step", loop.step))

    def after_step(self, loop, record):
        self.calls.append(("after_step", loop.step, record["step"]))
        return loop.step == self.stop_at

    def on_stop(self, loop):
        self.calls.append(("on_stop", loop.step))

    def end_fit(self, loop, exc):
        self.calls.append(("end_fit", loop.step, type(exc).__name__ if exc else None))


def _trainer(tmp_path, *extra):
    return Trainer(load_config(None, case("llama", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=3",
                                          *extra)))


def test_points_order_stop_and_exception(tmp_path):
    # every point, in order, with the step counter as documented in loomtrain.hooks
    trainer = _trainer(tmp_path / "a")
    rec = trainer.add_hook(Recorder())
    result = trainer.fit()
    per_step = lambda s: [("before_step", s), ("after_backward", s, True), ("before_optimizer_step", s),  # noqa: E731
                          ("after_optimizer_step", s + 1), ("after_step", s + 1, s + 1)]
    assert rec.calls == ([("after_setup", 0), ("begin_fit", 0)] + per_step(0) + per_step(1) + per_step(2)
                         + [("end_fit", 3, None)])
    assert result.steps == 3 and len(result.losses) == 3
    with pytest.raises(RuntimeError, match="before setup"):
        trainer.add_hook(Recorder())

    # a component asks to stop: every component hears on_stop, the loop ends after that step
    trainer = _trainer(tmp_path / "b")
    rec = trainer.add_hook(Recorder(stop_at=2))
    result = trainer.fit()
    assert result.steps == 2 and rec.calls[-2:] == [("on_stop", 2), ("end_fit", 2, None)]

    # an exception inside a step: end_fit sees it, then it propagates unchanged
    trainer = _trainer(tmp_path / "c")
    rec = trainer.add_hook(Recorder())
    trainer.setup()
    real = trainer.loader.next_step

    def failing():
        if trainer.step == 1:
            raise RuntimeError("injected")
        return real()

    trainer.loader.next_step = failing
    with pytest.raises(RuntimeError, match="injected"):
        trainer.fit()
    assert rec.calls[-2:] == [("before_step", 1), ("end_fit", 1, "RuntimeError")]


def test_hooks_end_every_component_and_order():
    order = []

    class Ends(Hook):
        def __init__(self, name, fail=False):
            self.name, self.fail = name, fail

        def end_fit(self, loop, exc):
            order.append(self.name)
            if self.fail:
                raise ValueError(self.name)

    hooks = Hooks([Ends("first"), Ends("second", fail=True), Ends("third")])
    with pytest.raises(ValueError, match="second"):
        hooks.end_fit(LoopState(), None)
    assert order == ["third", "second", "first"]  # reverse order, and every one ran despite the error
    order.clear()
    hooks.end_fit(LoopState(), RuntimeError("the loop's own"))  # the loop re-raises its own error
    assert order == ["third", "second", "first"]
    with pytest.raises(TypeError):
        Hooks().add(object())
    state = LoopState(step=7)
    other = LoopState()
    other.load_state_dict(state.state_dict())
    assert other.step == 7
