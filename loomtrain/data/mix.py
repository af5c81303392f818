"""`data.mix`: several token sources in fixed proportions, one deterministic sample sequence.

Sample g is assigned to a source by a fixed schedule of `PERIOD` slots that repeats forever:
each source gets slots in proportion to its weight (largest-remainder rounding, at least one),
spread evenly through the period (each slot goes to the source furthest behind its share), so
any window of samples holds the sources in their proportions, not long runs of one. Sample g is
slot g mod PERIOD of period g div PERIOD, and so the j-th sample of its source, with j computed in
O(1) from the slot's rank among its source's slots; no table grows with the number of samples.

Each source then loops over its own rows independently (epoch = j div its rows), shuffled per
epoch with its own seeded `WindowedPermutation` when `data.shuffle` is on. The loader's state
stays one integer: the global sample count.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from loomtrain.data.permute import WindowedPermutation
from loomtrain.data.prepared import PreparedCorpus
from loomtrain.errors import DataError

PERIOD = 4096
_CACHED_PERMS = 4


def slot_counts(weights: list[float], period: int = PERIOD) -> np.ndarray:
    """Slots per source in one period: proportional to the weights, each at least one."""
    w = np.asarray(weights, dtype=np.float64)
    if w.size == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise DataError(f"data.mix: weights must be finite and positive, got {list(weights)}")
    if w.size > period:
        raise DataError(f"data.mix: at most {period} sources")
    share = w / w.sum() * (period - w.size)
    counts = np.floor(share).astype(np.int64) + 1
    rest = period - int(counts.sum())
    order = np.argsort(-(share - np.floor(share)), kind="stable")
    counts[order[:rest]] += 1
    return counts


def schedule(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source of each slot, rank of the slot among its source's slots) for one period."""
    period = int(counts.sum())
    src = np.empty(period, dtype=np.int64)
    rank = np.empty(period, dtype=np.int64)
    given = np.zeros(counts.size, dtype=np.int64)
    for s in range(period):
        c = int(np.argmax(counts * (s + 1) / period - given))  # furthest behind; ties: lowest index
        src[s], rank[s] = c, given[c]
        given[c] += 1
    return src, rank


class MixCorpus:
    """Rows of several `PreparedCorpus` sources interleaved by weight (see the module doc)."""

    num_samples = None  # an endless sequence: each source wraps around on its own

    def __init__(self, sources: list[PreparedCorpus], weights: list[float], *, seed: int, shuffle: bool):
        self.sources, self.seed, self.shuffle = sources, seed, shuffle
        self.counts = slot_counts(weights)
        self.slot_source, self.slot_rank = schedule(self.counts)
        self.period = int(self.counts.sum())
        self._perms: OrderedDict[tuple[int, int], WindowedPermutation] = OrderedDict()

    def locate(self, g: int) -> tuple[int, int]:
        """(source, that source's sample number) of global sample g."""
        k, s = divmod(int(g), self.period)
        c = int(self.slot_source[s])
        return c, k * int(self.counts[c]) + int(self.slot_rank[s])

    def _row_of(self, c: int, j: int) -> int:
        n = self.sources[c].num_samples
        epoch, i = divmod(j, n)
        if not self.shuffle:
            return i
        perm = self._perms.get((c, epoch))
        if perm is None:
            perm = self._perms[(c, epoch)] = WindowedPermutation(n, (self.seed, c + 1, epoch))
            while len(self._perms) > _CACHED_PERMS:
                self._perms.popitem(last=False)
        return perm[i]

    def row(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        c, j = self.locate(g)
        return self.sources[c].row(self._row_of(c, j))

    def document(self, g: int) -> np.ndarray:
        c, j = self.locate(g)
        return self.sources[c].document(j)
