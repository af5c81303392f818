"""A NaN/inf loss or gradient norm never reaches the parameters or a checkpoint.

`train.nonfinite=stop` (the default) ends the run with one line naming the step and the value,
before the optimizer step, and commits nothing (the newest checkpoint stays the last good one);
`skip` drops such steps and counts them in the metrics record, as Megatron and DeepSpeed do.
The bad values are injected through public seams: a forward hook on the LM head (inf logits ->
inf loss) or an infinite gradient written after the backward pass (a loop component).
"""
import json
import math
import os

import pytest
import torch

from harness import case
from loomtrain import Trainer, load_config
from loomtrain.checkpoint import format as fmt
from loomtrain.checkpoint.signals import NonFiniteError
from loomtrain.errors import ConfigError, LoomError
from loomtrain.hooks import Hook

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class InfGrad(Hook):
    """Writes an infinite gradient into the first parameter during step `at`."""

    def __init__(self, trainer, at):
        self.trainer, self.at = trainer, at

    def after_backward(self, loop):
        if loop.step + 1 == self.at:
            next(self.trainer.model.parameters()).grad.fill_(float("inf"))


class Snapshot(Hook):
    """The parameters after step `at` (the last good state)."""

    def __init__(self, trainer, at):
        self.trainer, self.at, self.params = trainer, at, None

    def after_step(self, loop, record):
        if loop.step == self.at:
            self.params = {n: p.detach().clone() for n, p in self.trainer.model.named_parameters()}


def _trainer(tmp_path, *extra):
    return Trainer(load_config(None, case("llama", f"train.output_dir={tmp_path}", "train.max_steps=8",
                                          "checkpoint.every=2", *extra)))


def _inf_logits(trainer, at):
    def hook(module, args, output):
        return output * float("inf") if trainer.step + 1 == at else None
    trainer.model.lm_head.register_forward_hook(hook)


@pytest.mark.parametrize("what", ["loss", "grad norm"])
def test_nonfinite_stops_before_the_update_and_commits_nothing(tmp_path, what):
    trainer = _trainer(tmp_path)
    snap = trainer.add_hook(Snapshot(trainer, 4))
    if what == "grad norm":
        trainer.add_hook(InfGrad(trainer, 5))
    trainer.setup()
    if what == "loss":
        _inf_logits(trainer, 5)
    root = os.path.join(tmp_path, "checkpoints")
    with pytest.raises(NonFiniteError) as info:
        trainer.fit()
    message = str(info.value)
    assert message.startswith(f"step 5: non-finite {what} ") and "\n" not in message, message
    assert [s for s, _ in fmt.list_committed(root)] == [4, 2]  # nothing committed after the bad step
    man = fmt.read_manifest(fmt.list_committed(root)[0][1])
    assert fmt.verify_files(fmt.list_committed(root)[0][1], man, sorted(man["files"]), check="sha256") is None
    for name, param in trainer.model.named_parameters():  # the update never happened
        assert torch.equal(param.detach(), snap.params[name]), name


def test_infinite_lr_never_trains(tmp_path):
    """`optim.lr=.inf` must not train on NaN and exit 0: refused by the config checks, or at the
    first step by the non-finite stop."""
    try:
        trainer = _trainer(tmp_path, "optim.lr=.inf")
    except ConfigError:
        return
    with pytest.raises(LoomError, match=r"step 1: non-finite .*lr"):
        trainer.fit()
    assert not fmt.list_committed(os.path.join(tmp_path, "checkpoints"))


def test_skip_drops_the_step_and_counts_it(tmp_path):
    trainer = _trainer(tmp_path, "train.nonfinite=skip")
    snap = trainer.add_hook(Snapshot(trainer, 2))
    trainer.add_hook(InfGrad(trainer, 3))
    after = trainer.add_hook(Snapshot(trainer, 3))
    result = trainer.fit()
    assert result.steps == 8
    for name in snap.params:  # step 3 did not move the parameters
        assert torch.equal(after.params[name], snap.params[name]), name
    records = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert records[2]["grad_norm"] is None or not math.isfinite(records[2]["grad_norm"])
    assert all(math.isfinite(r["loss"]) for r in records)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
