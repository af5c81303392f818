"""Seeded permutations of [0, n) whose memory does not grow with n.

A corpus of 10^10 tokens has millions of rows and documents; a full `rng.permutation(n)` of
them costs 8 bytes per entry on every rank at start-up, which is exactly what prepared shards
exist to avoid. `WindowedPermutation` is a two-level permutation instead: the order of whole
windows (W entries each) is permuted, and each window's entries are permuted inside it, so
memory is O(n / W + W) and any entry is found in O(1).

Below one window (n <= W) it is `np.random.default_rng(key).permutation(n)` itself, so the small
corpora that the text path has always shuffled keep exactly the order they always had. The last,
partial window (n % W entries) stays at the end, permuted inside, so window offsets stay
multiples of W and no cumulative table is needed.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

DEFAULT_WINDOW = 1 << 20
_ORDER_TAG = 0x574F52  # keeps the window-order stream apart from the in-window streams
_INNER_TAG = 0x494E4E
_CACHED_WINDOWS = 2  # a step reads contiguous entries: the current window and the next


class WindowedPermutation:
    """perm[i] for i in [0, n): a bijection fixed by (n, key, window)."""

    def __init__(self, n: int, key: tuple[int, ...] | list[int], window: int = DEFAULT_WINDOW):
        if n < 0 or window < 1:
            raise ValueError(f"WindowedPermutation: n={n}, window={window}")
        self.n, self.key, self.window = int(n), tuple(int(k) for k in key), int(window)
        self.full_windows = self.n // self.window if self.n > self.window else 0
        self._order = (np.random.default_rng([*self.key, _ORDER_TAG]).permutation(self.full_windows)
                       if self.full_windows else None)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    @property
    def num_windows(self) -> int:
        """Windows in virtual order: the full ones, then the partial tail (if any)."""
        if not self.full_windows:
            return 1 if self.n else 0
        return self.full_windows + (1 if self.n % self.window else 0)

    def window_order(self) -> np.ndarray:
        """Physical windows in virtual order (`window_at` for every j)."""
        if not self.full_windows:
            return np.arange(self.num_windows, dtype=np.int64)
        return np.concatenate((self._order, np.arange(self.full_windows, self.num_windows))).astype(np.int64)

    def window_at(self, j: int) -> int:
        """The physical window placed at virtual window j."""
        return int(self._order[j]) if self.full_windows and j < self.full_windows else j

    def window_size(self, w: int) -> int:
        if not self.full_windows:
            return self.n
        return self.window if w < self.full_windows else self.n - self.full_windows * self.window

    def inner(self, w: int) -> np.ndarray:
        """The permutation inside physical window w (offsets within that window)."""
        perm = self._cache.get(w)
        if perm is None:
            if not self.full_windows:
                perm = np.random.default_rng(list(self.key)).permutation(self.n)
            else:
                perm = np.random.default_rng([*self.key, _INNER_TAG, w]).permutation(self.window_size(w))
            self._cache[w] = perm
            while len(self._cache) > _CACHED_WINDOWS:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(w)
        return perm

    def __getitem__(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} outside [0, {self.n})")
        if not self.full_windows:
            return int(self.inner(0)[i])
        j, off = divmod(i, self.window)
        w = self.window_at(j)
        return w * self.window + int(self.inner(w)[off])
