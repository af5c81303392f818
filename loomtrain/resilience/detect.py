"""Straggler and slow-link statistics: pure functions over one window's per-rank figures.

Why robust statistics: at scale a few ranks are always a little odd (a GC pause, a noisy
neighbour), and a mean/stddev test is dragged by the very outlier it looks for. Each rank is
compared to the median and the median absolute deviation (MAD) of the *other* ranks (leave one
out, so that in a 4-rank job the slow rank does not hide inside its own baseline), with the
modified z-score of Iglewicz and Hoaglin, z = 0.6745 (x - median) / MAD. A value is flagged when
all three hold:

  * z > `z` (3.5): an outlier relative to how much the others spread;
  * x / median - 1 > `min_slowdown`: slower by a margin that matters (10%, MegaScale's figure for
    the slow machines worth acting on; `resilience.min_slowdown`). Below it, drift is as likely
    noise as a slow chip: on a 2-core machine at a quiet load a clean rank sharing its core was
    seen 11% slow in one window and 5-9% in others, which at a 5% threshold was reported;
  * x - median > `floor_s`: above an absolute floor, so microsecond jitter on a tiny step never
    counts.

The MAD is floored at `mad_floor` x median, because a handful of near-identical peers (the three
others of a 4-rank job) can have a MAD of almost zero, and at the spread the other ranks showed
over the last `pool_windows` windows (the MAD of their deviations from each window's median,
pooled): three peers in one window say little about how noisy the measurement is, thirty
rank-windows do. On a 2-core machine at load 15-30 clean ranks drift 5-12% in single windows;
the pooled spread keeps those drifts below z 3.5 while a 30% slow rank still scores z > 8. At
1,024 ranks one window already estimates the spread well, and pooling changes nothing.

A flag is only *reported* when it persists: flagged in `need` (3) of the last `of` (5) windows.
Ranks report the lower quartile of their per-step figures inside a window (`low_quartile`):
interference (a GC pause, a noisy neighbour, a descheduled process) only ever adds time to a step,
so it does not reach the statistics unless it hits most steps of a window, while a slower chip
is slower on every step.

Attribution: the compute figure of a rank (seconds per unit of work) names the rank; the timed
probe of a process group names the *link* when the group is an outlier among the groups of the
same size and none of its members is a compute outlier in that window (a slow member would make
its groups look slow too). Everything here is numpy over plain arrays: no torch, no processes, so
`benchmarks/straggler_sim.py` can check it at 1,024 ranks and thousands of windows.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

_K = 0.6745  # Phi^-1(3/4): makes the MAD a consistent estimate of the standard deviation


def low_quartile(values) -> float:
    """The lower quartile of a window's per-step values (the minimum of up to 4 values)."""
    ordered = sorted(values)
    return float(ordered[(len(ordered) - 1) // 4])


@dataclass(frozen=True)
class DetectConfig:
    """Thresholds of the detector (see the module docstring for why each exists)."""

    z: float = 3.5
    min_slowdown: float = 0.10
    floor_s: float = 0.001  # compute: absolute excess over the median, seconds per step
    link_min_slowdown: float = 0.05
    link_floor_s: float = 0.0002  # probes: absolute excess, seconds
    mad_floor: float = 0.01  # MAD never below 1% of the median
    need: int = 3  # reported when flagged in `need` ...
    of: int = 5  # ... of the last `of` windows
    min_peers: int = 2  # fewer others than this: nothing to compare against
    pool_windows: int = 10  # windows of the other ranks' deviations pooled into the MAD (0 = off)


@dataclass(frozen=True)
class Flag:
    """One value flagged in one window: how much slower than its peers' median, and how odd."""

    slowdown: float
    z: float
    value: float
    median: float


@dataclass(frozen=True)
class Finding:
    """A persistent straggler (`kind="straggler"`, `rank`) or slow link (`kind="link"`, `group`)."""

    kind: str
    rank: int | None
    group: tuple[int, ...] | None
    slowdown: float
    z: float
    windows: int  # windows flagged among the last `of`
    value: float
    median: float

    def evidence(self) -> str:
        what = "compute" if self.kind == "straggler" else "probe"
        return (f"{what} {self.value * 1e3:.2f} ms vs peers' median {self.median * 1e3:.2f} ms, "
                f"z {self.z:.1f}, flagged in {self.windows} of the last windows")


def outliers(values, *, z: float, min_slowdown: float, floor: float, mad_floor: float,
             min_peers: int = 2, history=None) -> dict[int, Flag]:
    """Indices of `values` (NaN = absent) that are slow outliers against the others' median/MAD.

    Only candidates already above the all-values median by `min_slowdown` get the exact
    leave-one-out test, which keeps this O(n log n) for the common case of few candidates.
    `history` (windows x len(values), relative deviations from each window's median) floors the
    MAD at the spread of the *other* columns."""
    x = np.asarray(values, dtype=np.float64)
    present = np.flatnonzero(np.isfinite(x))
    if present.size < min_peers + 1:
        return {}
    vals = x[present]
    rough = float(np.median(vals))
    found: dict[int, Flag] = {}
    for pos in np.flatnonzero(vals > rough * (1.0 + min_slowdown)):
        others = np.delete(vals, pos)
        med = float(np.median(others))
        mad = max(float(np.median(np.abs(others - med))), mad_floor * abs(med), 1e-12)
        if history is not None and len(history):
            past = np.delete(np.asarray(history), present[pos], axis=1)
            past = past[np.isfinite(past)]
            if past.size:
                mad = max(mad, float(np.median(np.abs(past - np.median(past)))) * abs(med))
        value = float(vals[pos])
        score = _K * (value - med) / mad
        slowdown = value / med - 1.0 if med > 0 else float("inf")
        if score > z and slowdown > min_slowdown and value - med > floor:
            found[int(present[pos])] = Flag(slowdown=slowdown, z=score, value=value, median=med)
    return found


def link_outliers(probes, groups, rank_flags, cfg: DetectConfig) -> dict[int, Flag]:
    """Group indices whose probe time is an outlier among groups of the same size and whose
    members all compute normally (`rank_flags`: this window's compute outliers)."""
    probes = np.asarray(probes, dtype=np.float64)
    found: dict[int, Flag] = {}
    for size in sorted({len(g) for g in groups}):
        idx = [i for i, g in enumerate(groups) if len(g) == size]
        flags = outliers(probes[idx], z=cfg.z, min_slowdown=cfg.link_min_slowdown, floor=cfg.link_floor_s,
                         mad_floor=cfg.mad_floor, min_peers=cfg.min_peers)
        for local, flag in flags.items():
            gi = idx[local]
            if not any(r in rank_flags for r in groups[gi]):
                found[gi] = flag
    return found


@dataclass
class Detector:
    """The persistence rule over windows: feed one window at a time with `update`; it returns
    the findings that became persistent in this window (each reported once until it has been
    clean for `of` windows)."""

    groups: list[tuple[int, ...]] = field(default_factory=list)
    cfg: DetectConfig = field(default_factory=DetectConfig)
    # ranks compared only with each other (pipeline stages do different work by design); None: all
    cohorts: list[tuple[int, ...]] | None = None

    def __post_init__(self):
        self.groups = [tuple(int(r) for r in g) for g in self.groups]
        self._history: deque[tuple[dict, dict]] = deque(maxlen=self.cfg.of)
        self._spread: deque[np.ndarray] = deque(maxlen=max(1, self.cfg.pool_windows))
        self._reported: set[tuple[str, object]] = set()
        self.windows = 0

    def flags(self, compute, probes=None) -> tuple[dict[int, Flag], dict[int, Flag]]:
        """This window's compute flags (by rank) and link flags (by group index); the only history
        used is the pooled spread (see the module docstring), which this call extends."""
        cfg = self.cfg
        compute = np.asarray(compute, dtype=np.float64)
        ranks: dict[int, Flag] = {}
        cohorts = self.cohorts or [tuple(range(compute.size))]
        deviation = np.full(compute.size, np.nan)
        for cohort in cohorts:
            vals = compute[list(cohort)]
            if np.isfinite(vals).any():
                deviation[list(cohort)] = vals / np.nanmedian(vals) - 1.0
        if cfg.pool_windows and (not self._spread or self._spread[-1].size == compute.size):
            self._spread.append(deviation)
        history = np.stack(self._spread) if cfg.pool_windows and self._spread else None
        for cohort in cohorts:
            found = outliers(compute[list(cohort)], z=cfg.z, min_slowdown=cfg.min_slowdown, floor=cfg.floor_s,
                             mad_floor=cfg.mad_floor, min_peers=cfg.min_peers,
                             history=None if history is None else history[:, list(cohort)])
            ranks.update({cohort[i]: flag for i, flag in found.items()})
        links = link_outliers(probes, self.groups, ranks, cfg) if probes is not None and self.groups else {}
        return ranks, links

    def update(self, compute, probes=None) -> list[Finding]:
        """One window: `compute[r]` is rank r's compute seconds per step normalised by its work
        (NaN to skip a rank), `probes[g]` the probe seconds of `groups[g]`."""
        ranks, links = self.flags(compute, probes)
        self.windows += 1
        self._history.append((ranks, links))
        out: list[Finding] = []
        for kind, current, pick in (("straggler", ranks, 0), ("link", links, 1)):
            for key, flag in current.items():
                count = sum(1 for h in self._history if key in h[pick])
                tag = (kind, key)
                if count >= self.cfg.need and tag not in self._reported:
                    self._reported.add(tag)
                    out.append(Finding(kind=kind, rank=key if kind == "straggler" else None,
                                       group=self.groups[key] if kind == "link" else None,
                                       slowdown=flag.slowdown, z=flag.z, windows=count, value=flag.value,
                                       median=flag.median))
        # a key clean for a whole history may be reported again if it comes back
        for tag in list(self._reported):
            pick = 0 if tag[0] == "straggler" else 1
            if len(self._history) == self.cfg.of and not any(tag[1] in h[pick] for h in self._history):
                self._reported.discard(tag)
        return out
