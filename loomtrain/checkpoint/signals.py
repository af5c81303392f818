"""Why a run stops early, and what the checkpointer commits then.

SIGTERM / Ctrl-C: stop after the current optimizer step and commit a checkpoint. A scheduler's
preemption (SIGTERM) or a user's Ctrl-C reaches the ranks at different moments, or only some of
them; stopping where each one happens to be would leave ranks in different steps. So the handler
only records the signal, and after every optimizer step the ranks agree (a MAX all-reduce of the
signal number) whether any of them got one; all stop after the same step and the Checkpointer
commits that state.

One stop request usually arrives more than once: schedulers signal every process of a job
(`scancel`, `timeout` on a process group, Kubernetes) and torch's elastic agent forwards the
signal it got as well, so a worker nearly always sees two. Repeats within `grace_s` seconds of
the first are therefore absorbed; only a stop signal after that window means "stop at once,
commit nothing" (a SIGKILL always does). The console says so when it promises a checkpoint, and
says it again when that promise is withdrawn.

A non-finite loss or gradient norm also stops the run (`NonFiniteError`); the checkpointer then
commits nothing, so the newest checkpoint stays the last good one.
"""
from __future__ import annotations

import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

from loomtrain.errors import LoomError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class NonFiniteError(LoomError):
    """The loss, gradient norm or learning rate of a step is NaN or infinite; raised before the
    optimizer step, so the parameters are still the last good ones and nothing is committed."""


class StopOnSignal:
    def __init__(self, is_main: bool, grace_s: float = 30.0):
        self.is_main = is_main
        self.grace_s = float(grace_s)
        self.signum: int | None = None  # the signal that asked the run to stop (agreed on every rank)
        self.abort = False  # a stop signal after the grace period: stop now, commit nothing
        self.absorbed = 0  # repeats of the stop request that were ignored
        self._first_at: float | None = None
        self._old: dict = {}

    def install(self) -> None:
        """Take over SIGTERM and SIGINT (main thread only: a Trainer run from another thread keeps
        the process's handlers)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._on_signal)
            except (ValueError, OSError):
                pass

    def _on_signal(self, signum, frame) -> None:
        now = time.monotonic()
        if self._first_at is not None and now - self._first_at <= self.grace_s:
            self.absorbed += 1  # the same stop request, delivered again (agent + scheduler)
            return
        if self._first_at is not None:  # a stop signal after the grace period: abort
            self.abort = True
            self.restore()
            if self.is_main:
                print(f"\nloomtrain: {signal.Signals(signum).name} again after {self.grace_s:g} s: stopping at once; "
                      "no further checkpoint will be committed", file=sys.stderr, flush=True)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self._first_at = now
        self.signum = signum
        if self.is_main:
            print(f"\nloomtrain: {signal.Signals(signum).name}: stopping after this step and committing a "
                  f"checkpoint (stop signals in the next {self.grace_s:g} s are ignored; one after that "
                  "stops at once without it)", file=sys.stderr, flush=True)

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
            # Another rank got it: this rank's grace period starts now, so a forwarded copy of
            # the same request arriving late is absorbed too.
            self.signum = value
            self._first_at = time.monotonic()
        return value != 0

    def reraise(self) -> None:
        """After the final commit: end the process the way the signal asked."""
        if self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + self.signum)
