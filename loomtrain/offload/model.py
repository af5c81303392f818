"""The performance model of interleaved optimizer-state offloading, and the planner on top of it.

Pure arithmetic (no torch): `loomtrain plan-offload` uses it for a cluster the user does not have,
and `offload.component` feeds it the constants it measured at start-up.

The update phase (Deep Optimizer States, Maurya et al.)
-------------------------------------------------------
Each rank holds the optimizer state of its N parameters (fp32 master weight and the two Adam
moments: `s` bytes per parameter) in host memory. A fraction f of it is updated on the device:
its state is copied in over the host->device link, updated there and copied back; the gradients
of those parameters are already on the device and never leave it. The rest, 1-f, is updated on
the CPU at C params/s; for those parameters only the gradient goes down and the updated weight
goes up (`p` bytes per parameter on each direction of the link). The two paths run at once, so
the update takes the longer of the two, and the link carries both paths' traffic:

    T_cpu(f)  = (1-f) N / C
    T_link(f) = (f s + (1-f) p) N / B          (B: link bytes/s in the busier direction)
    T(f)      = max(T_cpu, T_link)             (device compute overlaps the copies)

T_cpu falls and T_link rises with f, so the optimum equates them:

    (1-f)/C = (f s + (1-f) p)/B   =>   (1-f)(B/C - p) = f s
    f* = (B/C - p) / (B/C - p + s)

and the speedup over updating everything on the CPU (T(0) = N/C, when B/C > p) is

    T(0)/T(f*) = 1/(1-f*) = 1 + (B/C - p)/s,

which with p = 0 is the paper's 1 + B/(s C). With B/C <= p the link cannot even carry the CPU
path's own traffic faster than the CPU computes, and f* = 0.

The planner does not use the closed form directly: it also charges what the closed form leaves
out, and searches the sub-group size S and the number of device sub-groups k (f = k/n, n = N/S):

* double buffering: the device path is a 3-stage pipeline (copy in, update, copy out) over its k
  sub-groups, so it takes the sum of one sub-group's stages plus (k-1) times the slowest stage;
  large sub-groups pay for this fill, small ones for the fixed cost of each copy and launch;
* the GPU Adam rate G (the update stage, S/G per sub-group);
* device memory: the two staging slots (2 S (s + gradient bytes)) must fit in the free device memory;
  with less than that for the smallest sub-group, nothing goes to the device (f = 0).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

GB = 1e9

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*$")
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(text: str | int | float) -> int:
    """`7B`, `350M`, `1.5e9`, `123456` -> a parameter count."""
    if isinstance(text, (int, float)):
        return int(text)
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a count (e.g. 7B, 350M, 1.3e9)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


@dataclass(frozen=True)
class Machine:
    """Constants of one rank's machine, measured (`offload.measure`) or given on the command line."""

    h2d_gbps: float  # host -> device GB/s (pinned)
    d2h_gbps: float  # device -> host GB/s (pinned)
    cpu_adam_gps: float  # CPU AdamW, G params/s available to this rank
    gpu_adam_gps: float  # device AdamW, G params/s
    gpu_free_gb: float  # device memory free for staging buffers during the update phase
    copy_latency_s: float = 20e-6  # fixed cost of one copy or update launch (a sub-group's overhead)


@dataclass(frozen=True)
class Plan:
    """The chosen split: `device_groups` of `n_groups` sub-groups of `group_size` parameters go
    to the device path (`fraction` of the state); `update_s` is the predicted update phase."""

    params: int  # parameters whose state this rank holds
    group_size: int
    n_groups: int
    device_groups: int
    update_s: float
    cpu_only_s: float
    staging_gb: float

    @property
    def fraction(self) -> float:
        return self.device_groups / self.n_groups if self.n_groups else 0.0

    @property
    def speedup(self) -> float:
        return self.cpu_only_s / self.update_s if self.update_s > 0 else 1.0

    def describe(self) -> str:
        return (f"{self.fraction:.0%} of the optimizer state on the device path ({self.device_groups} of "
                f"{self.n_groups} sub-groups of {self.group_size:,} params), update {self.update_s * 1e3:.1f} ms "
                f"predicted vs {self.cpu_only_s * 1e3:.1f} ms all-CPU ({self.speedup:.2f}x), "
                f"device staging {self.staging_gb:.3f} GB")


def closed_form(m: Machine, state_bytes: float = 12.0, path_bytes: float = 4.0) -> tuple[float, float]:
    """(f*, speedup) of the docstring's closed form, with B the slower link direction."""
    ratio = min(m.h2d_gbps, m.d2h_gbps) * GB / (m.cpu_adam_gps * GB) - path_bytes
    if ratio <= 0:
        return 0.0, 1.0
    return ratio / (ratio + state_bytes), 1.0 + ratio / state_bytes


def update_time(params: int, group_size: int, device_groups: int, m: Machine, *, state_bytes: float = 12.0,
                grad_bytes: float = 4.0, param_bytes: float = 4.0) -> float:
    """Predicted seconds of one update phase with `device_groups` sub-groups of `group_size`
    parameters (the last one may be short) on the device path and the rest on the CPU."""
    n_groups = max(1, math.ceil(params / group_size))
    device_groups = min(device_groups, n_groups)
    n_dev = min(params, device_groups * group_size)
    n_cpu = params - n_dev
    cpu_groups = n_groups - device_groups
    cpu = n_cpu / (m.cpu_adam_gps * GB) + cpu_groups * m.copy_latency_s
    if n_dev == 0:
        link = max(n_cpu * grad_bytes / (m.d2h_gbps * GB), n_cpu * param_bytes / (m.h2d_gbps * GB))
        return max(cpu, link)
    stage_in = group_size * state_bytes / (m.h2d_gbps * GB) + m.copy_latency_s
    stage_up = group_size / (m.gpu_adam_gps * GB) + m.copy_latency_s
    stage_out = group_size * state_bytes / (m.d2h_gbps * GB) + m.copy_latency_s
    pipeline = stage_in + stage_up + stage_out + (device_groups - 1) * max(stage_in, stage_up, stage_out)
    link_in = (n_dev * state_bytes + n_cpu * param_bytes) / (m.h2d_gbps * GB) + device_groups * m.copy_latency_s
    link_out = (n_dev * state_bytes + n_cpu * grad_bytes) / (m.d2h_gbps * GB) + device_groups * m.copy_latency_s
    return max(cpu, pipeline, link_in, link_out)


def _group_sizes(params: int, min_group: int) -> list[int]:
    """Candidate sub-group sizes: powers of two from `min_group` up to the whole state."""
    sizes, size = [], max(1, min_group)
    while size < params:
        sizes.append(size)
        size *= 2
    sizes.append(max(1, params))
    return sizes


def plan(params: int, m: Machine, *, state_bytes: float = 12.0, grad_bytes: float = 4.0,
         param_bytes: float = 4.0, min_group: int = 1 << 12, max_groups: int = 4096,
         group_size: int | None = None, fraction: float | None = None) -> Plan:
    """The sub-group size and device share that minimise `update_time` within `m.gpu_free_gb`.

    `group_size` / `fraction` fix one choice (the user's override) and search only the other.
    Sizes that would cut the state into more than `max_groups` sub-groups are skipped (the
    per-sub-group bookkeeping of the runtime grows with their number)."""
    if params <= 0:
        raise ValueError("params must be positive")
    for name in ("h2d_gbps", "d2h_gbps", "cpu_adam_gps", "gpu_adam_gps"):
        value = getattr(m, name)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name}={value}: must be finite and positive")
    kw = dict(state_bytes=state_bytes, grad_bytes=grad_bytes, param_bytes=param_bytes)
    cpu_only = update_time(params, params, 0, m, **kw)
    sizes = [group_size] if group_size else [s for s in _group_sizes(params, min_group)
                                            if math.ceil(params / s) <= max_groups] or [params]
    best: Plan | None = None
    for size in sizes:
        n_groups = max(1, math.ceil(params / size))
        staging_gb = 2 * size * (state_bytes + grad_bytes) / GB  # two slots: state + gradient
        fits = staging_gb <= m.gpu_free_gb
        if fraction is not None:
            k = round(fraction * n_groups)
            if abs(k / n_groups - fraction) > 0.01 and size != sizes[0]:
                continue  # too coarse to express the asked share; the smallest size always counts
            choices = [k] if fits or fraction == 0 else [0]
        else:
            choices = range(n_groups + 1) if fits else [0]
        for k in choices:
            t = update_time(params, size, k, m, **kw)
            if best is None or t < best.update_s - 1e-15:
                best = Plan(params=params, group_size=size, n_groups=n_groups, device_groups=k, update_s=t,
                            cpu_only_s=cpu_only, staging_gb=staging_gb if k else 0.0)
    assert best is not None
    return best
