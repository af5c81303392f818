"""The planner's last pass: local search over a packed heterogeneous plan.

`packer.pack_groups` levels micro-steps with a water-filling that counts memory per step, not per
group, so work meant for single ranks whose memory is full can pile onto a wide group and make
it the step's slowest. Moving sequences off each step's slowest group into groups with idle time
fixes that; since no step ever gets slower, the plan can only improve (0.1-0.2% on the Wikipedia
cases, about 1 ms per batch).

`b` is the packer's `Batch` (per-degree times and tokens of every sequence); `bins` its groups
as [step, k, start, load, room, seqs].
"""
from __future__ import annotations

import numpy as np


def polish(b, bins, budget: int = 400):
    """Local search after packing: move a sequence off each micro-step's slowest group into a
    group with idle time below its own step's height (in the same step: below the slowest
    group), the longest that fits, best fit. No step ever gets slower, so the plan only
    improves; it repairs the levels the water-filling misjudged (it counts memory per step, not
    per group, so work meant for memory-full single ranks can pile onto a wide group)."""
    bins = [[m, k, st, load, room, list(seqs)] for m, k, st, load, room, seqs in bins]
    step, kk, load, room, count = (np.array(v) for v in zip(*[(e[0], e[1], e[3], e[4], len(e[5]))
                                                               for e in bins]))
    lat = np.asarray(b.lat)
    height = np.zeros(int(step.max()) + 1)
    np.maximum.at(height, step, load)
    members = [np.flatnonzero(step == m) for m in range(len(height))]
    for m in sorted(range(len(height)), key=lambda m: (-height[m], m)):
        while budget > 0 and bins[g := int(members[m][np.argmax(load[members[m]])])][5]:
            idx, kg = np.asarray(bins[g][5]), kk[g]
            out = b.time_np[idx, kg] + (lat[kg] if idx.size == 1 else 0.0)
            t_in = b.time_np[idx][:, kk] + np.where(count == 0, lat[kk], 0.0)[None, :]
            slack = np.where(step == m, load[g] - 1e-9, height[step] + 1e-12) - load - t_in
            ok = (slack >= 0) & (kk >= b.kmin[idx][:, None]) & (room >= b.tok_np[idx][:, kk])
            ok[:, g] = False
            rows = np.flatnonzero(ok.any(axis=1))
            if rows.size == 0:
                break
            r = int(rows[np.lexsort((idx[rows], -out[rows]))[0]])  # longest first, ties by index
            d, i = int(np.argmin(np.where(ok[r], slack[r], np.inf))), int(idx[r])
            bins[g][5].remove(i)
            bins[d][5].append(i)
            load[g], load[d] = load[g] - out[r], load[d] + t_in[r, d]
            room[g], room[d] = room[g] + b.tok_np[i, kg], room[d] - b.tok_np[i, kk[d]]
            count[g], count[d] = count[g] - 1, count[d] + 1
            height[m], budget = load[members[m]].max(), budget - 1
    for e in bins:  # exact sums again, as the packer computes them
        e[3] = sum(b.time[e[1]][i] for i in e[5]) + (b.lat[e[1]] if e[5] else 0.0)
        e[4] = b.capacity - sum(b.tok[e[1]][i] for i in e[5])
    return bins


def widen(b, best, m, kreq, pack, rounds: int = 8):
    """Coordinate descent on the degrees: the sequence that sets a micro-step's height (the
    longest in its slowest group) gets the next wider degree and the batch is packed again
    (`pack(m, kreq)`, the planner's packer, at `m` micro-steps); kept if the plan gets faster.
    The packer sizes degrees from a per-step share of the work, which misjudges a step that one
    sequence holds up; this fixes the few that do, a handful of packs per batch."""
    top = len(b.lat) - 1
    kreq = np.asarray(kreq).copy()
    for _ in range(rounds):
        height: dict = {}
        for e in best.bins:
            if e[5] and e[3] > height.get(e[0], (-1.0,))[0]:
                height[e[0]] = (e[3], e)
        improved = False
        for _, e in sorted(height.values(), key=lambda v: (-v[0], v[1][0])):
            i = max(e[5], key=lambda s: (b.time[e[1]][s], -s))
            if e[1] >= top:
                continue
            trial = kreq.copy()
            trial[i] = e[1] + 1
            c = pack(m, trial)
            if c is not None and (c.time, c.n_steps) < (best.time, best.n_steps):
                best, kreq, improved = c, trial, True
                break
        if not improved:
            break
    return best



def descend(b, best, m, kreq, pack, top: int = 16, budget: int = 48):
    """Coordinate descent on the degrees of the `top` longest sequences, both ways: one of them
    one or two degrees narrower or wider, packed again (`pack(m, kreq)`) at `m`, `m` + 1 and
    `m` - 1 micro-steps; the first change that makes the plan faster is kept and the scan starts
    over, until none does or `budget` packs were spent. `widen` only widens the sequence that
    holds a step up; when memory forces two or three steps, the best plan can also narrow a long
    sequence (a wide group spends more rank-seconds on its all-to-alls) or let it move to
    another step, which the packer's per-step share of the work does not see. Returns (plan, m,
    degrees)."""
    n_deg = len(b.lat)
    kreq = np.asarray(kreq).copy()
    spent = 0
    while spent < budget:
        found = None
        for i in b.order[:top]:
            for dk in (-1, 1, -2, 2):
                k = int(kreq[i]) + dk
                if not b.kmin[i] <= k < n_deg:
                    continue
                trial = kreq.copy()
                trial[i] = k
                for mm in (m, m + 1, m - 1):
                    if mm < 1 or spent >= budget:
                        continue
                    spent += 1
                    c = pack(mm, trial)
                    if c is not None and (c.time, c.n_steps) < (best.time, best.n_steps):
                        found = (c, mm, trial)
                        break
                if found:
                    break
            if found or spent >= budget:
                break
        if found is None:
            break
        best, m, kreq = found
    return best, m, kreq

SWAP_SEQS = 8  # groups of at most this many sequences take part in swaps (the long ones' groups)


def swap(b, bins, budget: int = 200):
    """Local search within micro-steps: exchange a sequence of a step's slowest group with one
    of another group of the same step when both end below the slowest's load (and in memory).
    `polish` only moves sequences into idle time; a step of few long sequences paired badly
    (the longest two together) needs exchanges. No step ever gets slower."""
    bins = [[m, k, st, load, room, list(seqs)] for m, k, st, load, room, seqs in bins]
    steps: dict = {}
    for bi, e in enumerate(bins):
        if e[5]:
            steps.setdefault(e[0], []).append(bi)
    time, tok, kmin = b.time, b.tok, b.kmin
    for members in steps.values():
        while budget > 0:
            g = max(members, key=lambda bi: (bins[bi][3], -bi))
            _, kg, _, load_g, room_g, seq_g = bins[g]
            if len(seq_g) > SWAP_SEQS:
                break
            best = None
            for h in members:
                _, kh, _, load_h, room_h, seq_h = bins[h]
                if h == g or len(seq_h) > SWAP_SEQS:
                    continue
                for i in seq_g:
                    if kmin[i] > kh:
                        continue
                    for j in seq_h:
                        if kmin[j] > kg or room_g + tok[kg][i] < tok[kg][j] or room_h + tok[kh][j] < tok[kh][i]:
                            continue
                        val = max(load_g - time[kg][i] + time[kg][j], load_h - time[kh][j] + time[kh][i])
                        if val < load_g - 1e-9 and (best is None or (val, i, j) < best[:3]):
                            best = (val, i, j, h)
            if best is None:
                break
            _, i, j, h = best
            kh = bins[h][1]
            bins[g][5].remove(i)
            bins[g][5].append(j)
            bins[h][5].remove(j)
            bins[h][5].append(i)
            for e in (bins[g], bins[h]):  # exact sums, as the packer computes them
                e[3] = sum(time[e[1]][s] for s in e[5]) + b.lat[e[1]]
                e[4] = b.capacity - sum(tok[e[1]][s] for s in e[5])
            budget -= 1
    return bins
