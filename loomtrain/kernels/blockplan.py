"""Where documents start in a packed micro-batch, and which (query block, key block) pairs of the
blockwise kernel hold any visible score.

Every token of a packed micro-batch has a *global index*: rows laid end to end, so token s of row
b is b * S + s. A document is a run of consecutive global indices (it never crosses a row), and
its boundaries are the cumulative sequence lengths `cu_seqlens`, the form flash-attention's varlen
kernels take. Causal attention inside a document is then one interval per query:

    query i sees key j  <=>  start(i) <= j <= i      (start(i): global index of i's document start)

so queries need (index, start) and keys only their index. Because nothing else is assumed, the
same kernel serves the plain path (queries = keys = every token), Ulysses (the whole sequence after
the all-to-all), and ring attention, where a rank's queries are its zig-zag chunks and each ring
step's keys are another rank's chunks: both are just runs of global indices (`index_from_runs`).

`plan_blocks` turns the intervals into the list of block pairs worth computing: a pair is skipped
when no query of the block can see any key of it, and marked unmasked when every query sees every
key (no mask is built for it). Both tests use per-block minima and maxima only, so planning costs
O(blocks), never O(tokens^2).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DocLayout:
    """Document boundaries of a packed [b, S] micro-batch, flattened to b*S global indices."""

    cu_seqlens: torch.Tensor  # int64 [n_docs + 1]: global index of every document start, then b*S
    max_seqlen: int  # longest document (what varlen kernels size their grid by)
    index: torch.Tensor  # int64 [b*S]: global index of every token (0..b*S-1)
    start: torch.Tensor  # int64 [b*S]: global index of the start of each token's document
    shape: tuple[int, int]  # (b, S)


def layout_from_position_ids(position_ids: torch.Tensor) -> DocLayout:
    """A document starts at every row start and wherever the position does not continue the
    previous one (the loader restarts positions at 0 at each document)."""
    if position_ids.dim() != 2 or position_ids.is_floating_point():
        raise ValueError(f"position_ids must be an integer [batch, seq] tensor, got {position_ids.dtype} "
                         f"{tuple(position_ids.shape)}")
    b, s = position_ids.shape
    pos = position_ids.to(torch.int64)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    flat = starts.reshape(-1)
    first = flat.nonzero().reshape(-1)
    total = torch.tensor([b * s], dtype=torch.int64, device=pos.device)
    cu = torch.cat([first, total])
    doc = flat.to(torch.int64).cumsum(0) - 1
    max_len = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    index = torch.arange(b * s, dtype=torch.int64, device=pos.device)
    return DocLayout(cu, max_len, index, cu[doc], (b, s))


class LayoutCache:
    """Derive a micro-batch's `DocLayout` once, not once per layer: every attention layer of one
    forward (and its recomputation under activation checkpointing) receives the same
    position_ids tensor object. Held by the attention modules of one model (an attribute, not
    global state); a weak reference, so a finished micro-batch is not kept alive.

    `derive` computes the layout when it is not cached (context parallelism gathers the other
    ranks' positions first: every rank of a group misses and hits together, so the collective
    stays matched); `key` names the derivation (e.g. ring over a given cp group), so two
    derivations from the same tensor are never confused."""

    def __init__(self) -> None:
        self._ref = None
        self._stamp = None
        self._layout = None

    def get(self, position_ids: torch.Tensor, derive=layout_from_position_ids, key="plain"):
        held = self._ref() if self._ref is not None else None
        stamp = (position_ids._version, key)
        if held is position_ids and self._stamp == stamp and self._layout is not None:
            return self._layout
        self._layout = derive(position_ids)
        self._ref, self._stamp = weakref.ref(position_ids), stamp
        return self._layout


def index_from_runs(runs, device=None) -> torch.Tensor:
    """int64 global indices of the runs [(first, stop), ...], laid end to end."""
    parts = [torch.arange(a, b, dtype=torch.int64, device=device) for a, b in runs if b > a]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=device)


@dataclass(frozen=True)
class BlockPlan:
    """Per query block: (q0, q1, [(k0, k1, needs_mask), ...]) in key order. Query blocks with no
    visible key are absent (their rows keep output 0 and log-sum-exp -inf)."""

    rows: tuple[tuple[int, int, tuple[tuple[int, int, bool], ...]], ...]
    pairs: int  # block pairs computed
    skipped: int  # block pairs skipped as fully masked


def _block_reduce(x: torch.Tensor, block: int, fill: int, largest: bool) -> torch.Tensor:
    pad = (-x.numel()) % block
    if pad:
        x = torch.cat([x, x.new_full((pad,), fill)])
    x = x.reshape(-1, block)
    return x.amax(dim=1) if largest else x.amin(dim=1)


def plan_blocks(q_index: torch.Tensor, q_start: torch.Tensor, k_index: torch.Tensor,
                block_q: int, block_k: int) -> BlockPlan:
    """Which block pairs to compute (see the module docstring). Conservative: a kept pair may
    still turn out fully masked (the kernel checks its mask), a skipped one never holds a
    visible score."""
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block sizes must be >= 1, got block_q={block_q}, block_k={block_k}")
    if q_index.numel() == 0 or k_index.numel() == 0:
        return BlockPlan((), 0, 0)
    big, small = torch.iinfo(torch.int64).max, torch.iinfo(torch.int64).min
    q_hi = _block_reduce(q_index, block_q, small, True)  # latest query of the block
    q_lo_idx = _block_reduce(q_index, block_q, big, False)  # earliest query
    s_lo = _block_reduce(q_start, block_q, big, False)  # earliest document start seen
    s_hi = _block_reduce(q_start, block_q, small, True)  # latest document start
    k_lo = _block_reduce(k_index, block_k, big, False)
    k_hi = _block_reduce(k_index, block_k, small, True)
    some = (k_lo[None, :] <= q_hi[:, None]) & (k_hi[None, :] >= s_lo[:, None])
    full = (k_lo[None, :] >= s_hi[:, None]) & (k_hi[None, :] <= q_lo_idx[:, None])
    some_l, full_l = some.tolist(), full.tolist()
    tq, tk = q_index.numel(), k_index.numel()
    rows, pairs = [], 0
    for i, (some_row, full_row) in enumerate(zip(some_l, full_l)):
        keys = tuple((j * block_k, min(tk, (j + 1) * block_k), not f)
                     for j, (s, f) in enumerate(zip(some_row, full_row)) if s)
        if keys:
            rows.append((i * block_q, min(tq, (i + 1) * block_q), keys))
            pairs += len(keys)
    return BlockPlan(tuple(rows), pairs, len(some_l) * len(some_l[0]) - pairs)
