"""`OffloadAdamW`: AdamW whose state lives in one host arena, updated by two paths at once.

It is a `torch.optim.Optimizer` over whatever parameters it is given, so it runs wherever AdamW
does: on the local shards of FSDP2 (ZeRO-2/3, DTensor parameters, their local tensors updated in
place), on TP's DTensors, on DDP's replicas, and as the local optimizer inside
`ZeroRedundancyOptimizer` (ZeRO-1). Per parameter group the state is flat: fp32 master weights,
exp_avg and exp_avg_sq, cut into sub-groups of `group_size` elements; `set_split` sends some of
them to the device path and the rest to the CPU path (`offload.paths`); `regroup` re-cuts them at
another size without touching the state.

Checkpoints see the usual AdamW state: `state[p]` holds `step`, `exp_avg` and `exp_avg_sq` with
the parameter's shape (a DTensor with the parameter's mesh and placements when it is one), as
views into the arena. The checkpoint layer saves and loads them in place under the same names as
plain AdamW's, so a run can turn offload on or off at a resume. The master weights are not saved:
they equal the parameters (exactly, in fp32), and are refreshed from the parameters before the
first step after set-up or a load.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.distributed.tensor import DTensor

from loomtrain.offload.arena import HostArena
from loomtrain.offload.paths import CpuPath, DevicePath, FlatState, Hyper, Segment, SubGroup, local_flat


def _state_view(flat: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    local = p.to_local() if isinstance(p, DTensor) else p
    view = flat.view(local.shape)
    if isinstance(p, DTensor):
        return DTensor.from_local(view, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    return view


def spread(n: int, k: int) -> list[bool]:
    """k of n slots marked, evenly spread (so every parameter group gets its share)."""
    return [(i + 1) * k // n > i * k // n for i in range(n)] if n else []


class OffloadAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as `torch.optim.AdamW`) with host-resident state.

    Call `materialize(group_size)` once every parameter group is added (the first `step` does it
    with the default size otherwise), then `set_split(k)` to update k sub-groups on the device."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, device: torch.device | str | None = None, max_host_gb: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        first = next((p for g in self.param_groups for p in g["params"]), None)
        self.device = torch.device(device) if device is not None else (first.device if first is not None
                                                                         else torch.device("cpu"))
        self.max_host_gb = max_host_gb
        self.flats: list[FlatState] = []
        self.subgroups: list[SubGroup] = []
        self._spans: list[list[tuple[torch.nn.Parameter, int, int]]] = []  # per group: (param, offset, numel)
        self.on_device: list[bool] = []
        self.arena: HostArena | None = None
        self.cpu_path = CpuPath(self.device)
        self.device_path: DevicePath | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._master_stale = True
        self.group_size = 0
        self.last_update_s = self.last_cpu_s = self.last_device_s = 0.0

    # ---------------------------------------------------------------- layout
    @property
    def materialized(self) -> bool:
        return self.arena is not None

    @property
    def numel(self) -> int:
        return sum(local_flat(p).numel() for g in self.param_groups for p in g["params"] if p.requires_grad)

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "arena", None) is not None:
            raise RuntimeError("OffloadAdamW: parameter groups must be added before materialize()")
        super().add_param_group(param_group)

    def materialize(self, group_size: int) -> None:
        """Allocate the arena, lay the state out flat per group and cut it into sub-groups."""
        if self.materialized:
            return
        if group_size < 1:
            raise ValueError(f"group_size={group_size}: must be at least 1")
        self.group_size = group_size
        total = self.numel
        self.arena = HostArena(4 * total, pin=self.device.type == "cuda", max_gb=self.max_host_gb)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.requires_grad]
            n = sum(local_flat(p).numel() for p in params)
            st = FlatState(master=self.arena.take(n), exp_avg=self.arena.take(n).zero_(),
                           exp_avg_sq=self.arena.take(n).zero_(), grad=self.arena.take(n),
                           step=torch.zeros((), dtype=torch.float32))
            self.flats.append(st)
            spans, off = [], 0
            for p in params:
                k = local_flat(p).numel()
                self.state[p] = {"step": st.step, "exp_avg": _state_view(st.exp_avg[off:off + k], p),
                                 "exp_avg_sq": _state_view(st.exp_avg_sq[off:off + k], p)}
                spans.append((p, off, k))
                off += k
            self._spans.append(spans)
        self.subgroups = self._cut(group_size)
        self.on_device = [False] * len(self.subgroups)
        self._master_stale = True

    def _cut(self, group_size: int) -> list[SubGroup]:
        """Sub-groups of `group_size` elements over each parameter group's flat state."""
        subgroups = []
        for gi, spans in enumerate(self._spans):
            n = self.flats[gi].master.numel()
            for a in range(0, n, group_size):
                b = min(n, a + group_size)
                sub = SubGroup(group=gi, start=a, end=b)
                for p, p_start, k in spans:
                    lo, hi = max(a, p_start), min(b, p_start + k)
                    if lo < hi:
                        sub.segments.append(Segment(param=p, p_off=lo - p_start, g_off=lo - a, n=hi - lo))
                subgroups.append(sub)
        return subgroups

    def regroup(self, group_size: int) -> None:
        """Cut the state into sub-groups of a new size (a re-plan chose it), between steps.

        The state itself does not move: sub-groups are only ranges of the flat per-group arrays
        in the arena, so master weights, moments and step counts carry over untouched. The device
        path's staging slots are re-made at the new size; every sub-group is on the CPU path
        until the next `set_split`."""
        if group_size < 1:
            raise ValueError(f"group_size={group_size}: must be at least 1")
        if not self.materialized or group_size == self.group_size:
            return
        self.group_size = group_size
        self.subgroups = self._cut(group_size)
        self.on_device = [False] * len(self.subgroups)
        if self.device_path is not None:
            self.device_path = DevicePath(self.device, group_size)

    def set_split(self, device_groups: int) -> None:
        """Update `device_groups` of the sub-groups (spread evenly) on the device path from now on."""
        n = len(self.subgroups)
        device_groups = max(0, min(device_groups, n))
        if device_groups and self.device_path is None:
            self.device_path = DevicePath(self.device, self.group_size)
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loomtrain-offload-device")
        self.on_device = spread(n, device_groups)

    @property
    def device_fraction(self) -> float:
        return sum(self.on_device) / len(self.on_device) if self.on_device else 0.0

    def split_numel(self) -> tuple[int, int]:
        """(elements on the CPU path, elements on the device path)."""
        dev = sum(s.size for s, d in zip(self.subgroups, self.on_device) if d)
        return sum(s.size for s in self.subgroups) - dev, dev

    def mark_params_changed(self) -> None:
        """The parameters were written from outside (a load): refresh the master weights before the next step."""
        self._master_stale = True

    def _refresh_master(self) -> None:
        for sub in self.subgroups:
            st = self.flats[sub.group]
            for seg in sub.segments:
                st.master[sub.start + seg.g_off:sub.start + seg.g_off + seg.n].copy_(
                    local_flat(seg.param.data)[seg.p_off:seg.p_off + seg.n])
        self._master_stale = False

    # ---------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.materialized:
            self.materialize(1 << 22)
        if self._master_stale:
            self._refresh_master()
        start = time.perf_counter()
        hypers = [Hyper(lr=float(g["lr"]), beta1=float(g["betas"][0]), beta2=float(g["betas"][1]),
                        eps=float(g["eps"]), weight_decay=float(g["weight_decay"])) for g in self.param_groups]
        dev_subs = [s for s, d in zip(self.subgroups, self.on_device) if d]
        cpu_subs = [s for s, d in zip(self.subgroups, self.on_device) if not d]
        future = self._pool.submit(self.device_path.run, dev_subs, self.flats, hypers) if dev_subs else None
        try:
            self.last_cpu_s = self.cpu_path.run(cpu_subs, self.flats, hypers)
        finally:
            self.last_device_s = future.result() if future is not None else 0.0
        for st in self.flats:
            st.step += 1
        self.last_update_s = time.perf_counter() - start
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's `load_state_dict` would replace the state tensors; copy into the arena instead."""
        if not self.materialized:
            self.materialize(1 << 22)
        params = [p for g in self.param_groups for p in g["params"]]
        for index, entry in state_dict["state"].items():
            for key, value in entry.items():
                target = self.state[params[int(index)]][key]
                target.copy_(value)
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
