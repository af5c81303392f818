"""OffloadAdamW, the host arena and the component's re-planning, in one process (no launch)."""
from __future__ import annotations

import pytest
import torch

from loomtrain.config import OffloadConfig
from loomtrain.errors import ConfigError
from loomtrain.hooks import LoopState
from loomtrain.offload.arena import HostArena
from loomtrain.offload.component import OffloadComponent
from loomtrain.offload.model import Machine
from loomtrain.offload.optimizer import OffloadAdamW, spread

SHAPES = [(37, 19), (19,), (64, 33), (5,)]


def _train(make, steps: int = 5):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    groups = [{"params": [params[0], params[2]], "weight_decay": 0.1},
              {"params": [params[1], params[3]], "weight_decay": 0.0}]
    opt = make(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / 3)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        sched.step()
    return params, opt


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("group_size", [1, 100, 5000])
def test_matches_fused_adamw(fraction, group_size):
    ref, ref_opt = _train(lambda g: torch.optim.AdamW(g, lr=1e-2, betas=(0.9, 0.95), fused=True))

    def make(groups):
        opt = OffloadAdamW(groups, lr=1e-2, betas=(0.9, 0.95))
        opt.materialize(group_size)
        opt.set_split(round(fraction * len(opt.subgroups)))
        return opt
    got, opt = _train(make)
    try:
        assert opt.device_fraction == pytest.approx(fraction, abs=0.5 / len(opt.subgroups) + 1e-9)
        for a, b in zip(ref, got):
            assert (a - b).abs().max().item() <= 1e-6
            for key in ("exp_avg", "exp_avg_sq"):
                assert (ref_opt.state[a][key] - opt.state[b][key]).abs().max().item() <= 1e-6
            assert list(opt.state[b]) == list(ref_opt.state[a]) == ["step", "exp_avg", "exp_avg_sq"]
            assert opt.state[b]["step"].item() == ref_opt.state[a]["step"].item() == 5
    finally:
        opt.close()


def test_state_is_the_arena_and_loads_in_place():
    ref, ref_opt = _train(lambda g: torch.optim.AdamW(g, lr=1e-2, fused=True), steps=2)
    params = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    opt = OffloadAdamW([{"params": [params[0], params[2]]}, {"params": [params[1], params[3]]}], lr=1e-2)
    opt.materialize(64)
    arena_ptr = opt.arena.buffer.data_ptr()
    before = opt.state[params[0]]["exp_avg"].data_ptr()
    opt.load_state_dict(ref_opt.state_dict())
    assert opt.state[params[0]]["exp_avg"].data_ptr() == before
    assert arena_ptr <= before < arena_ptr + opt.arena.numel * 4
    assert torch.equal(opt.state[params[2]]["exp_avg_sq"], ref_opt.state[ref[2]]["exp_avg_sq"])


def test_missing_gradient_is_one_clear_error():
    p = torch.nn.Parameter(torch.ones(10))
    opt = OffloadAdamW([p])
    opt.materialize(4)
    with pytest.raises(RuntimeError, match="has no gradient"):
        opt.step()


def test_arena_refuses_beyond_the_cap():
    with pytest.raises(ConfigError) as err:
        HostArena(1 << 28, pin=False, max_gb=0.5)
    assert str(err.value).startswith("offload: the offloaded optimizer state needs 1.00 GB of host memory on this "
                                      "rank, more than offload.max_host_gb=0.5")
    with pytest.raises(ConfigError, match="only .* GB is available"):
        HostArena(1 << 50, pin=False)


def test_spread_is_even():
    assert spread(10, 3) == [False, False, False, True, False, False, True, False, False, True]
    assert sum(spread(7, 7)) == 7 and sum(spread(7, 0)) == 0


def test_component_replans_on_drift():
    """A model that is far off (a 1000x too fast CPU) is refitted to the measured path times and
    the split re-planned; an explicit fraction is kept."""
    for cfg, keeps in ((OffloadConfig(optimizer="interleaved", group_size=64), False),
                       (OffloadConfig(optimizer="interleaved", group_size=64, gpu_fraction=0.5), True)):
        params = [torch.nn.Parameter(torch.randn(100_000))]
        opt = OffloadAdamW(params)
        comp = OffloadComponent(cfg, torch.device("cpu"), is_main=False).attach(opt)
        loop = LoopState()
        comp.after_setup(loop)
        comp.machine = Machine(h2d_gbps=1.0, d2h_gbps=1.0, cpu_adam_gps=1000.0, gpu_adam_gps=1000.0, gpu_free_gb=1.0)
        comp._replan()
        first = opt.device_fraction
        records = []
        for _ in range(3):
            params[0].grad = torch.randn(100_000)
            opt.step()
            record = {}
            comp.after_step(loop, record)
            records.append(record)
        comp.end_fit(loop, None)
        assert comp.replans >= 1
        assert comp.machine.cpu_adam_gps < 100  # refitted to what the CPU did
        assert set(records[0]) == {"update_s", "update_pred_s", "offload_gpu_fraction", "peak_host_gb"}
        if keeps:
            assert opt.device_fraction == first == pytest.approx(0.5, abs=1e-3)
        assert loop.extra["offload"]["replans"] == comp.replans
