"""The offload performance model and planner over a table of machine constants, the
`plan-offload` command, and the `offload.*` config checks. No torch, no processes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loomtrain.config import load_config
from loomtrain.errors import ConfigError
from loomtrain.launch.cli import main
from loomtrain.offload.model import Machine, closed_form, parse_count, plan, update_time

PER_RANK_7B = parse_count("7B") // 8


@pytest.mark.parametrize("link, cpu, low, high", [
    (25, 1.0, 0.5, 0.7),  # PCIe 4/5 x16 per GPU, ~1 G params/s of CPU Adam: half to two thirds on the device
    (12, 1.0, 0.3, 0.5),  # PCIe 3
    (50, 2.0, 0.5, 0.7),  # the same ratio B/C, scaled
    (400, 1.0, 0.9, 1.0),  # a coherent CPU-GPU link (GH200 class): nearly all
    (4, 1.0, 0.0, 0.0),  # the link carries the CPU path's own traffic no faster than the CPU computes
])
def test_split_follows_link_over_cpu_rate(link, cpu, low, high):
    m = Machine(h2d_gbps=link, d2h_gbps=link, cpu_adam_gps=cpu, gpu_adam_gps=50, gpu_free_gb=10)
    chosen = plan(PER_RANK_7B, m)
    assert low <= chosen.fraction <= high, chosen.describe()
    f_star, speedup_star = closed_form(m)
    assert abs(chosen.fraction - f_star) <= 0.02, (chosen.describe(), f_star)
    assert abs(chosen.speedup / speedup_star - 1) <= 0.10, (chosen.speedup, speedup_star)
    assert chosen.update_s <= chosen.cpu_only_s + 1e-12


def test_pcie_numbers_match_the_closed_form():
    m = Machine(h2d_gbps=25, d2h_gbps=25, cpu_adam_gps=1, gpu_adam_gps=50, gpu_free_gb=10)
    chosen = plan(PER_RANK_7B, m)
    # (B/C - p)/(B/C - p + s) with B/C = 25 bytes/param, p = 4, s = 12: 21/33
    assert closed_form(m) == pytest.approx((21 / 33, 1 + 21 / 12))
    assert round(chosen.fraction, 2) == 0.64
    assert chosen.speedup == pytest.approx(2.75, rel=0.05)
    # with p = 0 the closed form is the paper's 1 + B/(s C)
    assert closed_form(m, path_bytes=0)[1] == pytest.approx(1 + 25 / 12)


@pytest.mark.parametrize("free_gb", [0.0, 1e-6, 1e-4])
def test_too_little_device_memory_puts_nothing_on_the_device(free_gb):
    m = Machine(h2d_gbps=25, d2h_gbps=25, cpu_adam_gps=1, gpu_adam_gps=50, gpu_free_gb=free_gb)
    chosen = plan(PER_RANK_7B, m)
    assert chosen.fraction == 0 and chosen.staging_gb == 0
    assert chosen.speedup == pytest.approx(1.0)


def test_staging_buffers_fit_the_free_memory():
    for free in (0.01, 0.1, 1.0, 10.0):
        m = Machine(h2d_gbps=25, d2h_gbps=25, cpu_adam_gps=1, gpu_adam_gps=50, gpu_free_gb=free)
        chosen = plan(PER_RANK_7B, m)
        assert chosen.staging_gb <= free
        assert chosen.fraction > 0.5


def test_asymmetric_link_uses_the_slower_direction():
    m = Machine(h2d_gbps=50, d2h_gbps=25, cpu_adam_gps=1, gpu_adam_gps=50, gpu_free_gb=10)
    assert abs(plan(PER_RANK_7B, m).fraction - closed_form(m)[0]) <= 0.02


def test_fraction_override_and_model_monotonic():
    m = Machine(h2d_gbps=25, d2h_gbps=25, cpu_adam_gps=1, gpu_adam_gps=50, gpu_free_gb=10)
    forced = plan(PER_RANK_7B, m, fraction=0.3)
    assert forced.fraction == pytest.approx(0.3, abs=0.01)
    assert forced.update_s > plan(PER_RANK_7B, m).update_s
    # the update time falls while the CPU is the bottleneck and rises once the link is
    times = [update_time(1 << 26, 1 << 20, k, m) for k in range(0, 65, 8)]
    best = times.index(min(times))
    assert all(a > b for a, b in zip(times[:best], times[1:best + 1]))
    assert all(a < b for a, b in zip(times[best:], times[best + 1:]))


def test_parse_count():
    assert parse_count("7B") == 7_000_000_000
    assert parse_count("350M") == 350_000_000
    assert parse_count("1.5e9") == 1_500_000_000
    with pytest.raises(ValueError):
        parse_count("seven")


def test_plan_offload_command(capsys):
    argv = ["plan-offload", "--params", "7B", "--shards", "8", "--h2d", "25", "--cpu-adam", "1", "--gpu-adam", "50",
            "--gpu-free-gb", "10"]
    assert main(argv + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpu_fraction"] == pytest.approx(0.64, abs=0.01)
    assert out["speedup"] == pytest.approx(out["closed_form_speedup"], rel=0.1)
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "64% of the optimizer state on the device path" in text and "2.75x" in text
    assert main(argv[:-2] + ["--gpu-free-gb", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "loomtrain: error: --gpu-free-gb=-1.0: must be finite and not negative"


def test_plan_offload_does_not_import_torch():
    code = ("import sys; from loomtrain.launch.cli import main; "
            "main(['plan-offload','--params','1B','--h2d','25','--cpu-adam','1','--gpu-adam','50',"
            "'--gpu-free-gb','1','--json']); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


@pytest.mark.parametrize("override, message", [
    ("offload.optimizer=gpu", "offload.optimizer='gpu': must be one of none, cpu, interleaved"),
    ("offload.gpu_fraction=1.5", "offload.gpu_fraction=1.5: must be auto or a number within [0, 1]"),
    ("offload.gpu_fraction=half", "offload.gpu_fraction='half': must be auto or a number within [0, 1]"),
    ("offload.gpu_fraction=0.5", "offload.gpu_fraction=0.5: applies only to offload.optimizer=interleaved (it is none)"),
    ("offload.group_size=-4", "offload.group_size=-4: must be 0 (planned) or a positive count of parameters"),
    ("offload.replan_drift=0", "offload.replan_drift=0.0: must be finite and positive (0.15 = 15%)"),
])
def test_offload_config_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == message


def test_offload_config_values():
    cfg = load_config(None, ["offload.optimizer=interleaved", "offload.gpu_fraction=0.7"]).offload
    assert (cfg.optimizer, cfg.gpu_fraction) == ("interleaved", 0.7)
    assert load_config(None, []).offload.gpu_fraction == "auto"


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_offload_params_needs_zero3(zero):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["offload.params=true", f"parallel.zero={zero}"])
    assert str(err.value) == ("offload.params=true needs parallel.zero=3 (FSDP2 CPUOffloadPolicy offloads sharded "
                              f"parameters); it is parallel.zero={zero}")
    assert load_config(None, ["offload.params=true", "parallel.zero=3"]).offload.params is True
