"""One bounded host arena for all offloaded optimizer state.

A single allocation (pinned on CUDA, so copies to and from the device are asynchronous DMA)
carved into views, rather than one pinned allocation per tensor: pinned allocations are slow to
make, fragment the host, and each costs locked pages the scheduler counts. The arena's size is
known before training starts (the state of every parameter this rank steps), so a host that
cannot hold it is refused at start-up with one line, instead of being found out by the OOM killer
half-way through the first step.
"""
from __future__ import annotations

import os
import resource

import torch

from loomtrain.errors import ConfigError

GB = 1024**3


def host_available_bytes() -> int | None:
    """Memory the kernel says a new allocation can get without swapping (`MemAvailable`)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_host_gb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


class HostArena:
    """`numel` fp32 elements in one host block; `take(n)` hands out consecutive views."""

    def __init__(self, numel: int, *, pin: bool, max_gb: float = 0.0, what: str = "offloaded optimizer state"):
        nbytes = numel * 4
        available = host_available_bytes()
        if max_gb > 0 and nbytes > max_gb * GB:
            raise ConfigError(f"offload: the {what} needs {nbytes / GB:.2f} GB of host memory on this rank, more "
                              f"than offload.max_host_gb={max_gb:g}; raise it, or shard the state over more ranks")
        if available is not None and nbytes > available:
            raise ConfigError(f"offload: the {what} needs {nbytes / GB:.2f} GB of host memory on this rank but "
                              f"only {available / GB:.2f} GB is available; use more ranks or nodes, or "
                              "offload.optimizer=none")
        if pin:
            soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
            # CUDA's pinned allocations are not always charged to RLIMIT_MEMLOCK, but a container that
            # sets a small limit usually means it: refuse rather than fail inside cudaHostAlloc.
            ignore = os.environ.get("LOOMTRAIN_IGNORE_MEMLOCK") == "1"
            if soft != resource.RLIM_INFINITY and 0 < soft < nbytes and not ignore:
                raise ConfigError(f"offload: pinning {nbytes / GB:.2f} GB of host memory exceeds the locked-memory "
                                  f"limit ({soft / GB:.2f} GB, ulimit -l); raise it or set LOOMTRAIN_IGNORE_MEMLOCK=1")
        self.buffer = torch.empty(numel, dtype=torch.float32, pin_memory=pin)
        self.numel, self.used, self.pinned = numel, 0, pin

    @property
    def gb(self) -> float:
        return self.numel * 4 / GB

    def take(self, n: int) -> torch.Tensor:
        if self.used + n > self.numel:
            raise RuntimeError(f"host arena exhausted: {self.used} + {n} > {self.numel} elements")
        view = self.buffer[self.used:self.used + n]
        self.used += n
        return view
