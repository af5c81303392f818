"""What a heterogeneous sequence plan is: per micro-step, disjoint aligned groups of ranks, each
running some of the batch's sequences (`planner.py` makes one; `executor.py` runs it).

Plain frozen data, so every rank can build the same plan and compare `Plan.fingerprint64` with one
all-gather before any collective of the plan runs.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np

from loomtrain.errors import LoomError


class PlanError(LoomError):
    """The batch cannot be planned (a sequence too long, bad rank count) or ranks disagree."""


@dataclass(frozen=True)
class Group:
    """Ranks [start, start + degree) running `seqs` (batch indices) packed in one micro-step."""

    start: int
    degree: int
    seqs: tuple[int, ...]
    tokens: int  # per rank: sum of ceil(L / degree), what the memory cap bounds
    time: float  # predicted seconds

    @property
    def empty(self) -> bool:  # a single rank running a zero-weight micro-step
        return not self.seqs


@dataclass(frozen=True)
class MicroStep:
    groups: tuple[Group, ...]  # sorted by start, disjoint, covering every rank

    @property
    def time(self) -> float:
        return max(g.time for g in self.groups)


@dataclass(frozen=True)
class Slot:
    """What one rank does in one micro-step (seqs empty: a zero-weight micro-step)."""

    step: int
    rank: int
    start: int
    degree: int
    seqs: tuple[int, ...]

    @property
    def local_rank(self) -> int:
        return self.rank - self.start


@dataclass(frozen=True)
class Plan:
    n_ranks: int
    capacity: int
    lengths: tuple[int, ...]
    steps: tuple[MicroStep, ...]
    strategy: str  # "hetero" or "homogeneous"
    degree: int | None  # the one degree of a homogeneous plan
    time: float  # predicted step seconds: sum of micro-step maxima plus the per-step overhead

    @cached_property
    def fingerprint(self) -> str:
        """Hex digest of everything the executor acts on; equal on every rank or a bug."""
        canon = (self.n_ranks, self.capacity, self.lengths,
                 tuple(tuple((g.start, g.degree, g.seqs) for g in s.groups) for s in self.steps))
        return hashlib.blake2b(repr(canon).encode(), digest_size=8).hexdigest()

    @property
    def fingerprint64(self) -> int:  # as a signed int64, to all-gather in a tensor
        return int.from_bytes(bytes.fromhex(self.fingerprint), "little", signed=True)

    def for_rank(self, rank: int) -> tuple[Slot, ...]:
        """This rank's micro-steps in order; the same count on every rank."""
        return tuple(Slot(i, rank, g.start, g.degree, g.seqs) for i, step in enumerate(self.steps)
                     for g in step.groups if g.start <= rank < g.start + g.degree)

    def assignment(self) -> dict[int, tuple[int, int]]:
        """Sequence index -> (micro-step, group start)."""
        return {s: (i, g.start) for i, step in enumerate(self.steps) for g in step.groups
                for s in g.seqs}


def aligned_blocks(n_ranks: int, max_degree: int | None = None) -> tuple[tuple[int, int], ...]:
    """Every aligned power-of-two block (start, degree), degree >= 2: what to pre-create."""
    check_ranks(n_ranks)
    n_ranks = int(n_ranks)
    top = n_ranks if max_degree is None else min(int(max_degree), n_ranks)
    return tuple((s, d) for d in (2 ** k for k in range(1, top.bit_length())) if d <= top
                 for s in range(0, n_ranks, d))


def verify_same_plan(plan: Plan, fingerprints: Sequence[int]) -> None:
    """Raise (naming the ranks) unless every rank's fingerprint64 equals this rank's plan."""
    bad = [r for r, f in enumerate(fingerprints) if int(f) != plan.fingerprint64]
    if bad:
        raise PlanError(f"the sequence plan differs on rank(s) {bad[:8]}{'...' if len(bad) > 8 else ''}"
                        f" ({len(bad)} of {len(fingerprints)}): the ranks saw different batches or "
                        "cost models; refusing to run a plan whose collectives would not match")


def check_ranks(n: int) -> None:
    if not isinstance(n, (int, np.integer)) or n < 1 or n & (n - 1):
        raise PlanError(f"the number of ranks must be a power of two >= 1, got {n}")
