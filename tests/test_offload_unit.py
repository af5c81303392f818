"""OffloadAdamW, the host arena and the component's re-planning, in one process (no launch)."""
from __future__ import annotations

import pytest
import torch
from torch.distributed.fsdp import CPUOffloadPolicy

from harness import case
from loomtrain.config import OffloadConfig, load_config
from loomtrain.errors import ConfigError
from loomtrain.hooks import LoopState
from loomtrain.offload.arena import HostArena
from loomtrain.offload.component import OffloadComponent
from loomtrain.offload.model import Machine
from loomtrain.offload.optimizer import OffloadAdamW, spread
from loomtrain.parallel.data_parallel import offload_policy
from loomtrain.runtime.trainer import Trainer

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


def test_offload_params_without_fsdp_is_refused(tmp_path):
    """ZeRO-3 on one data-parallel rank has no FSDP to hand the policy to: one clear line."""
    cfg = load_config(None, case("llama", "parallel.zero=3", "offload.params=true", f"train.output_dir={tmp_path}"))
    with pytest.raises(ConfigError) as err:
        Trainer(cfg).setup()
    assert str(err.value) == ("offload.params=true needs FSDP, i.e. parallel.zero=3 over more than one "
                              "data-parallel rank; this layout has 1")


# Two machines whose plans cut the same state differently: a slow, high-latency link wants few
# large sub-groups; a fast device with free copies wants many small ones (pipeline fill).
COARSE = Machine(h2d_gbps=5.0, d2h_gbps=5.0, cpu_adam_gps=0.01, gpu_adam_gps=5.0, gpu_free_gb=1.0, copy_latency_s=1e-3)
FINE = Machine(h2d_gbps=50.0, d2h_gbps=50.0, cpu_adam_gps=0.5, gpu_adam_gps=50.0, gpu_free_gb=1.0, copy_latency_s=0.0)


def test_replan_resizes_subgroups_and_keeps_the_state():
    """A re-plan that picks another sub-group size re-cuts the state in place; the steps before
    and after it equal plain fused AdamW's (parameters and both moments, every parameter group)."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(160, 97), (97,), (128, 130), (7,)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(6)]

    def groups(params):
        return [{"params": [params[0], params[2]], "weight_decay": 0.1},
                {"params": [params[1], params[3]], "weight_decay": 0.0}]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    ref_opt = torch.optim.AdamW(groups(ref), lr=1e-2, betas=(0.9, 0.95), fused=True)
    got = [torch.nn.Parameter(t.clone()) for t in init]
    opt = OffloadAdamW(groups(got), lr=1e-2, betas=(0.9, 0.95))
    comp = OffloadComponent(OffloadConfig(optimizer="interleaved"), torch.device("cpu"), is_main=False).attach(opt)
    comp.after_setup(LoopState())
    sizes, fractions = [], []
    try:
        for step, machine in enumerate([COARSE, COARSE, FINE, FINE, COARSE, COARSE]):
            if machine is not comp.machine:
                comp.machine = machine
                comp._replan(resize=True)  # what a drift re-plan calls, with constants it did not fit
                sizes.append(opt.group_size)
                fractions.append(opt.device_fraction)
            for p, r, g in zip(got, ref, grads[step]):
                p.grad, r.grad = g.clone(), g.clone()
            opt.step()
            ref_opt.step()
        assert len(set(sizes)) == 2 and sizes[0] == sizes[2], sizes  # coarse, fine, coarse again
        assert sizes[0] > sizes[1] and all(0 < f for f in fractions), (sizes, fractions)
        assert comp.regroups >= 2
        for a, b in zip(ref, got):
            assert (a - b).abs().max().item() <= 1e-6
            for key in ("exp_avg", "exp_avg_sq"):
                assert (ref_opt.state[a][key] - opt.state[b][key]).abs().max().item() <= 1e-6
            assert opt.state[b]["step"].item() == 6
    finally:
        opt.close()


def test_explicit_group_size_is_never_resized():
    params = [torch.nn.Parameter(torch.randn(50_000))]
    opt = OffloadAdamW(params)
    comp = OffloadComponent(OffloadConfig(optimizer="interleaved", group_size=5000), torch.device("cpu"),
                            is_main=False).attach(opt)
    comp.after_setup(LoopState())
    for machine in (COARSE, FINE):
        comp.machine = machine
        comp._replan(resize=True)
        assert opt.group_size == 5000
    assert comp.regroups == 0
    opt.close()


def test_offload_policy_pins_only_for_a_device():
    assert offload_policy(True, "cuda") == CPUOffloadPolicy(pin_memory=True)
    assert offload_policy(True, "cpu") == CPUOffloadPolicy(pin_memory=False)  # nothing to copy to: no pinning
    assert not isinstance(offload_policy(False, "cuda"), CPUOffloadPolicy)
