"""`OffloadComponent`: interleaved optimizer offload as a component on the loop's hooks.

    after_setup            measure this rank's machine, plan the sub-group size and the device
                           share, lay the state out in the host arena (before the checkpointer's
                           resume, which then loads into it)
    before_optimizer_step  first step on a GPU: re-plan with the device memory free now, after
                           backward (activations are gone; this is what the staging slots get)
    after_step             add update_s, update_pred_s, offload_gpu_fraction, peak_host_gb to the
                           step's record; when measured and predicted update time differ by more
                           than offload.replan_drift for two steps in a row, fit the model's rates
                           to what was measured and re-plan the device share and, unless
                           offload.group_size fixes it, the sub-group size (the state is re-cut
                           in place; an explicit gpu_fraction is kept)
    end_fit                stop the device path's thread; publish the plan in loop.extra

The trainer builds its optimizer with `optimizer_args()` (the class and its arguments, so ZeRO-1
can wrap it) and registers the component first, so its record keys reach the metrics file and
its set-up runs before a resume. Each rank plans for itself; the update needs no collective.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch.distributed.optim import ZeroRedundancyOptimizer

from loomtrain.config import OffloadConfig
from loomtrain.errors import ConfigError
from loomtrain.hooks import Hook, LoopState
from loomtrain.offload.arena import peak_host_gb
from loomtrain.offload.measure import free_device_gb, measure_machine
from loomtrain.offload.model import GB, Machine, Plan, plan, update_time
from loomtrain.offload.optimizer import OffloadAdamW


class OffloadComponent(Hook):
    def __init__(self, cfg: OffloadConfig, device: torch.device, *, is_main: bool):
        self.cfg, self.device, self.is_main = cfg, device, is_main
        self.optimizer: OffloadAdamW | None = None
        self.machine: Machine | None = None
        self.plan: Plan | None = None
        self.replans = 0
        self.regroups = 0  # re-plans that changed the sub-group size
        self._drifted = 0
        self._first_step = True

    # ---------------------------------------------------------------- wiring
    def optimizer_args(self) -> dict:
        """Keyword arguments for `loomtrain.optim.build.build_optimizer`."""
        return {"optimizer_class": OffloadAdamW,
                "optimizer_kwargs": {"device": self.device, "max_host_gb": self.cfg.max_host_gb}}

    def attach(self, optimizer: torch.optim.Optimizer) -> "OffloadComponent":
        inner = optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer
        if not isinstance(inner, OffloadAdamW):
            raise TypeError(f"offload needs an OffloadAdamW optimizer, got {type(inner).__name__}")
        self.optimizer = inner
        return self

    @property
    def fixed_fraction(self) -> float | None:
        if self.cfg.optimizer == "cpu":
            return 0.0
        return None if self.cfg.gpu_fraction == "auto" else float(self.cfg.gpu_fraction)

    # ---------------------------------------------------------------- hooks
    def after_setup(self, loop: LoopState) -> None:
        opt = self.optimizer
        n = opt.numel
        self.machine = measure_machine(self.device)
        fraction = self.fixed_fraction
        if n == 0:  # a ZeRO-1 rank that owns no parameters
            opt.materialize(1)
            return
        size = self.cfg.group_size or plan(n, self.machine, fraction=fraction).group_size
        opt.materialize(min(size, n))
        self._replan()
        if fraction and not opt.device_fraction and fraction * len(opt.subgroups) >= 0.5:
            need = 2 * opt.group_size * 16 / GB
            raise ConfigError(f"offload.gpu_fraction={fraction:g}: the device staging slots need {need:.3f} GB but "
                              f"only {self.machine.gpu_free_gb:.3f} GB is free; lower offload.group_size")
        if self.is_main:
            m = self.machine
            where = "GPU" if self.device.type == "cuda" else "host stand-in for the device (no GPU)"
            print(f"loomtrain: offload {self.cfg.optimizer}: {self.plan.describe()}; arena "
                  f"{opt.arena.gb:.3f} GB{' pinned' if opt.arena.pinned else ''}; measured link "
                  f"{m.h2d_gbps:.1f}/{m.d2h_gbps:.1f} GB/s, Adam CPU {m.cpu_adam_gps:.2f} / device "
                  f"{m.gpu_adam_gps:.2f} G params/s ({where})", flush=True)

    def _replan(self, *, resize: bool = False) -> None:
        """Plan for the current machine constants. With `resize` and a planned sub-group size
        (offload.group_size=0) the size is searched again too, and a new one re-cuts the state
        (`OffloadAdamW.regroup`: the state stays where it is)."""
        opt = self.optimizer
        fixed_size = opt.group_size if not resize or self.cfg.group_size else None
        new = plan(opt.numel, self.machine, group_size=fixed_size, fraction=self.fixed_fraction)
        size = min(new.group_size, opt.numel)
        if size != opt.group_size:
            if self.is_main:
                print(f"loomtrain: offload re-planned the sub-groups: {opt.group_size:,} -> {size:,} params",
                      flush=True)
            opt.regroup(size)
            self.regroups += 1
            new = plan(opt.numel, self.machine, group_size=size, fraction=self.fixed_fraction)
        self.plan = new
        opt.set_split(self.plan.device_groups)

    def before_optimizer_step(self, loop: LoopState) -> None:
        if self._first_step and self.device.type == "cuda" and self.plan is not None and self.fixed_fraction is None:
            self.machine = replace(self.machine, gpu_free_gb=free_device_gb(self.device))
            self._replan(resize=True)
        self._first_step = False

    def after_step(self, loop: LoopState, record: dict) -> None:
        opt = self.optimizer
        measured = opt.last_update_s
        predicted = self.plan.update_s if self.plan is not None else 0.0
        record.update(update_s=measured, update_pred_s=predicted, offload_gpu_fraction=opt.device_fraction,
                      peak_host_gb=peak_host_gb())
        if self.plan is None or predicted <= 0 or measured <= 0:
            return
        if abs(measured / predicted - 1) > self.cfg.replan_drift:
            self._drifted += 1
        else:
            self._drifted = 0
        if self._drifted >= 2:
            self._recalibrate()
            self._drifted = 0
            self.replans += 1

    def _recalibrate(self) -> None:
        """Fit the model's rates to the last step's measured path times, then plan again."""
        opt, m = self.optimizer, self.machine
        n_cpu, n_dev = opt.split_numel()
        if n_cpu and opt.last_cpu_s > 0:
            m = replace(m, cpu_adam_gps=n_cpu / opt.last_cpu_s / GB)
        if n_dev and opt.last_device_s > 0:
            predicted = update_time(n_dev, opt.group_size, math.ceil(n_dev / opt.group_size), m)
            scale = predicted / opt.last_device_s
            m = replace(m, h2d_gbps=m.h2d_gbps * scale, d2h_gbps=m.d2h_gbps * scale,
                        gpu_adam_gps=m.gpu_adam_gps * scale)
        self.machine = m
        self._replan(resize=True)

    def end_fit(self, loop: LoopState, exc: BaseException | None) -> None:
        if self.optimizer is not None:
            self.optimizer.close()
        if self.plan is not None:
            loop.extra["offload"] = {"mode": self.cfg.optimizer, "gpu_fraction": self.optimizer.device_fraction,
                                     "group_size": self.optimizer.group_size, "replans": self.replans,
                                     "regroups": self.regroups,
                                     "update_pred_s": self.plan.update_s}
