"""`OrphanGuard`: a worker exits when the launcher that started it dies.

torch's elastic agent starts workers in sessions of their own, so when the agent is SIGKILLed
(an OOM killer, a crashed node agent) nothing signals them: they sleep on in their collectives,
holding their GPUs, until someone kills them by hand. A daemon thread compares the parent pid
with the one at start every `interval_s` seconds; a changed parent (re-parented to init or a
subreaper) means the launcher is gone, and the worker exits with code 1 at once.
"""
from __future__ import annotations

import os
import sys
import threading

ORPHAN_EXIT_CODE = 1


class OrphanGuard:
    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self.parent = os.getppid()
        self._stop = threading.Event()

    def start(self) -> "OrphanGuard":
        if self.interval_s > 0:
            threading.Thread(target=self._watch, name="loomtrain-orphan-guard", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            if os.getppid() != self.parent:
                print(f"loomtrain: the launcher (pid {self.parent}) is gone; worker {os.getpid()} exits",
                      file=sys.stderr, flush=True)
                os._exit(ORPHAN_EXIT_CODE)
