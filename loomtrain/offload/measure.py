"""Measure the machine constants the offload planner needs, on this rank, in about 0.1 s.

Host->device and device->host bandwidth (pinned buffers), CPU and device fused-AdamW throughput,
free device memory and the fixed cost of one small copy. Without a GPU the "device" is the host
stand-in (`offload.paths`): its link is a host memcpy and its AdamW the same CPU, so the plan it
gives describes the stand-in, not a GPU machine.
"""
from __future__ import annotations

import time

import torch

from loomtrain.offload.arena import host_available_bytes
from loomtrain.offload.model import GB, Machine
from loomtrain.offload.paths import Hyper, adamw_step

_HYPER = Hyper(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
STANDIN_FREE_GB = 1.0  # the stand-in "device" may stage at most this much


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(fn, device: torch.device, reps: int) -> float:
    fn()  # warm-up (allocations, kernel selection)
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def adam_rate(device: torch.device, n: int, reps: int = 3) -> float:
    """Fused AdamW params/s on `device` over `n` fp32 elements."""
    bufs = [torch.rand(n, device=device) for _ in range(4)]
    step = torch.zeros((), dtype=torch.float32, device=device)
    return n / _best(lambda: adamw_step(*bufs, step, _HYPER), device, reps)


def free_device_gb(device: torch.device) -> float:
    if device.type == "cuda":  # free to the driver, plus what torch's cache holds but no tensor uses
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return (torch.cuda.mem_get_info(device)[0] + cached) / GB
    available = host_available_bytes()
    return min(STANDIN_FREE_GB, (available or 0) / GB / 4)


def measure_machine(device: torch.device, n: int = 1 << 20, reps: int = 3) -> Machine:
    """The constants of this rank's machine (see the module docstring for the stand-in)."""
    cuda = device.type == "cuda"
    host = torch.zeros(n, dtype=torch.float32, pin_memory=cuda)  # touched: no first-touch page faults timed
    dev = torch.zeros(n, dtype=torch.float32, device=device)
    nbytes = n * 4
    h2d = nbytes / _best(lambda: dev.copy_(host, non_blocking=cuda), device, reps) / GB
    d2h = nbytes / _best(lambda: host.copy_(dev, non_blocking=cuda), device, reps) / GB
    tiny_h, tiny_d = host[:1], dev[:1]
    latency = _best(lambda: tiny_d.copy_(tiny_h, non_blocking=cuda), device, reps)
    cpu = adam_rate(torch.device("cpu"), n, reps) / GB
    gpu = adam_rate(device, n, reps) / GB if cuda else cpu
    return Machine(h2d_gbps=h2d, d2h_gbps=d2h, cpu_adam_gps=cpu, gpu_adam_gps=gpu, gpu_free_gb=free_device_gb(device),
                   copy_latency_s=latency)
