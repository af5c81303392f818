"""The compute clock of the straggler monitor: CPU time of the training (main) thread.

CPU time, not wall time: a rank that sleeps inside a collective waiting for a slow peer, or that
is descheduled by a busy neighbour, is not slow itself, and both would smear wall time over every
rank. The training thread's own time (`CLOCK_THREAD_CPUTIME_ID`, exact), not the whole process's:
the collectives' background threads (gloo's) burn CPU in proportion to how long and how they wait,
which differs by rank position and load, not by the rank's speed. Measured on the 2-core CI
machine at load 15-30, process CPU time made one clean rank look 10-20% slower for several
windows; user time from `getrusage` is tick-sampled and was noisier still (+-40% per window).
With intra-op threads (OMP_NUM_THREADS > 1) the main thread's share stands for the whole, which
is proportional when work is split evenly.
"""
from __future__ import annotations

import time


def compute_cpu_s() -> float:
    """CPU seconds used so far by the calling (training) thread."""
    return time.thread_time()
