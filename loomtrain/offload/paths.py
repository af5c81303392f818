"""The two update paths of interleaved offloading, over sub-groups of a flat host state.

A sub-group is a range of one parameter group's flat fp32 state (master weights, exp_avg,
exp_avg_sq in the host arena) that may span several parameters, or part of one; `Segment`s map it
back onto the parameters' local tensors (DTensor shards are updated through their local tensor).
With `offload.params` the parameters and their gradients are host tensors (FSDP2 moves them):
the CPU path then reads the gradients in place, and on CUDA the device path writes such
parameters from the host master copy once its state is back, never with a device->host copy
that the next forward's host->device copy could overtake.

* `CpuPath` (the calling thread): per sub-group, copy the gradients down into a host buffer,
  run fused AdamW on the host, copy the new weights up into the parameters.
* `DevicePath` (its own thread): per sub-group, copy the state up into one of two device staging
  slots, gather the gradients there (they never leave the device), run fused AdamW on the
  device, write the weights into the parameters and copy the state back down. On CUDA the copies
  in, the update and the copies out run on three streams with events, so with two slots sub-group
  i+1 comes in while i is updated and i-1 goes out. Without a GPU, separate host buffers stand
  in for the device and the steps run in order on the path's thread: the same code path, the
  same copies, the same arithmetic, so CPU tests prove the logic.

Both call the same elementwise kernel (`torch.optim.adamw.adamw(fused=True)`), so an element's
update does not depend on which path, or which sub-group boundaries, it went through.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import DTensor
from torch.optim.adamw import adamw


def local_flat(t: torch.Tensor) -> torch.Tensor:
    """A flat view of this rank's part of `t` (never a copy: updates must land in the parameter)."""
    local = t.to_local() if isinstance(t, DTensor) else t
    if not local.is_contiguous():
        raise RuntimeError(f"offload: a parameter's local tensor of shape {tuple(local.shape)} is not contiguous")
    return local.view(-1)


@dataclass(frozen=True)
class Segment:
    """`n` elements of `param`'s local tensor from `p_off`, at `g_off` of the sub-group."""

    param: torch.nn.Parameter
    p_off: int
    g_off: int
    n: int


@dataclass
class SubGroup:
    group: int  # parameter-group index (its hyper-parameters and step counter)
    start: int  # range of the group's flat state
    end: int
    segments: list[Segment] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Hyper:
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float


def adamw_step(master, grad, exp_avg, exp_avg_sq, step: torch.Tensor, hp: Hyper) -> None:
    """Fused AdamW on flat buffers; `step` (the count before this update) is incremented in place."""
    adamw([master], [grad], [exp_avg], [exp_avg_sq], [], [step], fused=True, amsgrad=False, beta1=hp.beta1,
          beta2=hp.beta2, lr=hp.lr, weight_decay=hp.weight_decay, eps=hp.eps, maximize=False)


def host_grad_views(sub: SubGroup) -> list[torch.Tensor] | None:
    """The sub-group's gradients as views, when they already lie in host memory as fp32 (no GPU):
    the CPU path then updates from them directly instead of gathering a copy first."""
    views = []
    for seg in sub.segments:
        if seg.param.grad is None:
            return None  # gather_grads raises the clear error
        grad = local_flat(seg.param.grad)
        if grad.device.type != "cpu" or grad.dtype != torch.float32:
            return None
        views.append(grad[seg.p_off:seg.p_off + seg.n])
    return views


def on_host(sub: SubGroup) -> bool:
    """The sub-group's parameters live in host memory (offload.params: FSDP2's CPUOffloadPolicy)."""
    return any(local_flat(seg.param.data).device.type == "cpu" for seg in sub.segments)


def gather_grads(sub: SubGroup, dst: torch.Tensor, non_blocking: bool = False) -> None:
    for seg in sub.segments:
        grad = seg.param.grad
        if grad is None:
            raise RuntimeError("offload: a parameter the optimizer steps has no gradient; every parameter "
                               "must take part in the loss (or be frozen with requires_grad=False)")
        dst[seg.g_off:seg.g_off + seg.n].copy_(local_flat(grad)[seg.p_off:seg.p_off + seg.n],
                                               non_blocking=non_blocking)


def scatter_params(sub: SubGroup, src: torch.Tensor, non_blocking: bool = False) -> None:
    for seg in sub.segments:
        local_flat(seg.param.data)[seg.p_off:seg.p_off + seg.n].copy_(src[seg.g_off:seg.g_off + seg.n],
                                                                        non_blocking=non_blocking)


@dataclass
class FlatState:
    """One parameter group's flat host state (views into the arena) and its step counter."""

    master: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    grad: torch.Tensor  # host landing buffer for the CPU path's gradients
    step: torch.Tensor  # 0-d fp32: updates done (shared by every parameter's state["step"])


class CpuPath:
    """Sub-groups updated by the host CPU, in the calling thread."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def run(self, subs: list[SubGroup], flats: list[FlatState], hypers: list[Hyper]) -> float:
        start = time.perf_counter()
        for sub in subs:
            st, a, b = flats[sub.group], sub.start, sub.end
            grads = host_grad_views(sub)  # on the host already: no GPU, or offload.params
            if grads is None:
                gather_grads(sub, st.grad[a:b])  # blocking: the host reads them next
                adamw_step(st.master[a:b], st.grad[a:b], st.exp_avg[a:b], st.exp_avg_sq[a:b], st.step.clone(),
                           hypers[sub.group])
            else:  # one fused call over the segments, reading the gradients where they are
                spans = [slice(a + seg.g_off, a + seg.g_off + seg.n) for seg in sub.segments]
                hp = hypers[sub.group]
                adamw([st.master[x] for x in spans], grads, [st.exp_avg[x] for x in spans],
                      [st.exp_avg_sq[x] for x in spans], [], [st.step.clone() for _ in spans], fused=True,
                      amsgrad=False, beta1=hp.beta1, beta2=hp.beta2, lr=hp.lr, weight_decay=hp.weight_decay,
                      eps=hp.eps, maximize=False)
            scatter_params(sub, st.master[a:b], non_blocking=self.cuda)
        if self.cuda and subs:
            torch.cuda.current_stream(self.device).synchronize()
        return time.perf_counter() - start


class DevicePath:
    """Sub-groups updated on the device through two staging slots of `slot_size` elements."""

    def __init__(self, device: torch.device, slot_size: int):
        self.device, self.slot_size = device, slot_size
        self.cuda = device.type == "cuda"
        # Separate buffers even without a GPU: they stand in for device memory.
        self.slots = [[torch.empty(slot_size, dtype=torch.float32, device=device) for _ in range(4)]
                      for _ in range(2)] if slot_size > 0 else []
        if self.cuda:
            self.streams = [torch.cuda.Stream(device) for _ in range(3)]  # in, update, out

    @property
    def staging_bytes(self) -> int:
        return 2 * 4 * self.slot_size * 4

    def run(self, subs: list[SubGroup], flats: list[FlatState], hypers: list[Hyper]) -> float:
        start = time.perf_counter()
        if subs and self.cuda:
            with torch.cuda.device(self.device):  # this runs on the path's own thread
                self._run_cuda(subs, flats, hypers)
        elif subs:
            self._run_standin(subs, flats, hypers)
        return time.perf_counter() - start

    def _run_standin(self, subs, flats, hypers) -> None:
        for i, sub in enumerate(subs):
            master, m, v, grad = (t[:sub.size] for t in self.slots[i % 2])
            st, a, b = flats[sub.group], sub.start, sub.end
            master.copy_(st.master[a:b])
            m.copy_(st.exp_avg[a:b])
            v.copy_(st.exp_avg_sq[a:b])
            gather_grads(sub, grad)
            adamw_step(master, grad, m, v, st.step.clone(), hypers[sub.group])
            scatter_params(sub, master)
            st.master[a:b].copy_(master)
            st.exp_avg[a:b].copy_(m)
            st.exp_avg_sq[a:b].copy_(v)

    def _run_cuda(self, subs, flats, hypers) -> None:
        s_in, s_up, s_out = self.streams
        main = torch.cuda.current_stream(self.device)
        s_up.wait_stream(main)  # the gradients were produced on the main stream
        freed = [None, None]
        for i, sub in enumerate(subs):
            slot = i % 2
            master, m, v, grad = (t[:sub.size] for t in self.slots[slot])
            st, a, b = flats[sub.group], sub.start, sub.end
            with torch.cuda.stream(s_in):
                if freed[slot] is not None:
                    s_in.wait_event(freed[slot])  # sub-group i-2 has left this slot
                master.copy_(st.master[a:b], non_blocking=True)
                m.copy_(st.exp_avg[a:b], non_blocking=True)
                v.copy_(st.exp_avg_sq[a:b], non_blocking=True)
                arrived = torch.cuda.Event()
                arrived.record(s_in)
            with torch.cuda.stream(s_up):
                s_up.wait_event(arrived)
                gather_grads(sub, grad, non_blocking=True)
                adamw_step(master, grad, m, v, st.step.to(self.device), hypers[sub.group])
                if not on_host(sub):
                    scatter_params(sub, master, non_blocking=True)
                updated = torch.cuda.Event()
                updated.record(s_up)
            with torch.cuda.stream(s_out):
                s_out.wait_event(updated)
                st.master[a:b].copy_(master, non_blocking=True)
                st.exp_avg[a:b].copy_(m, non_blocking=True)
                st.exp_avg_sq[a:b].copy_(v, non_blocking=True)
                freed[slot] = torch.cuda.Event()
                freed[slot].record(s_out)
        s_out.synchronize()
        for sub in subs:  # offload.params: host-held parameters take the new weights from the host master copy
            if on_host(sub):
                scatter_params(sub, flats[sub.group].master[sub.start:sub.end])
        main.wait_stream(s_up)  # the parameters are written before the next forward reads them
