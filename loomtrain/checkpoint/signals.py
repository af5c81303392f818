"""SIGTERM / Ctrl-C during training: stop after the current optimizer step and commit a checkpoint.

A scheduler's preemption (SIGTERM) or a user's Ctrl-C reaches the ranks at different moments, or
only some of them; stopping where each one happens to be would leave ranks in different steps.
So the handler only records the signal, and after every optimizer step the ranks agree (a MAX
all-reduce of the signal number) whether any of them got one; all stop after the same step and
the Checkpointer commits that state. A second signal stops at once and saves nothing more.
"""
from __future__ import annotations

import signal
import sys
import threading

import torch
import torch.distributed as dist


class StopOnSignal:
    def __init__(self, is_main: bool):
        self.is_main = is_main
        self.signum: int | None = None  # the signal that asked the run to stop (agreed on every rank)
        self.abort = False  # a second signal: stop now, commit nothing
        self._old: dict = {}

    def install(self) -> None:
        """Take over SIGTERM and SIGINT (main thread only: a Trainer run from another thread keeps
        the process's handlers)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._on_signal)
            except (ValueError, OSError):
                pass

    def _on_signal(self, signum, frame) -> None:
        if self.signum is not None:  # a second Ctrl-C / SIGTERM: stop at once, save nothing more
            self.abort = True
            self.restore()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.signum = signum
        if self.is_main:
            print(f"\nloomtrain: {signal.Signals(signum).name}: stopping after this step and committing a "
                  "checkpoint (send it again to stop at once)", file=sys.stderr, flush=True)

    def restore(self) -> None:
        for sig, handler in self._old.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, OSError, TypeError):
                pass
        self._old = {}

    def agreed(self, world_size: int, device: torch.device) -> bool:
        """True on every rank when any rank got a signal (a collective: call it on every rank at
        the same point)."""
        if not self._old:
            return False
        if world_size == 1 or not dist.is_initialized():
            return self.signum is not None
        flag = torch.tensor([0 if self.signum is None else self.signum], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        value = int(flag.item())
        if value and self.signum is None:
            self.signum = value
        return value != 0

    def reraise(self) -> None:
        """After the final commit: end the process the way the signal asked."""
        if self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + self.signum)
