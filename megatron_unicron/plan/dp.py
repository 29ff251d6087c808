"""Knapsack dynamic programming over jobs × whole nodes, vectorised with numpy.

Maximise Σ_i G_i(k_i) subject to Σ_i k_i <= n, and among optimal allocations prefer the fewest moved
nodes Σ_i |k_i − c_i| (c_i: the nodes job i holds now), then the fewest nodes used. The three keys are
folded into one exact integer per (job, k): rewards are quantised to `bits` bits relative to the largest
|G| (ties within that resolution count as equal), then

    key = W · round(G / q) − (|k − c| · (n + 1) + k),   W = (2n + 1)(n + 1) > any Σ of the second part

so ordinary `max` on the summed keys is the lexicographic order (reward, −moves, −nodes), and sums stay
below 2^53 where float64 is exact. Each job is one (n+1)×(K+1) max over a sliding window of the previous
row: O(m·n²) time overall, O(m·n) memory for the choices.

`solve_naive` is the same recurrence in plain Python loops (the benchmark's baseline) and
`solve_brute_force` enumerates every allocation (the tests' oracle).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["encode_keys", "solve", "solve_naive", "solve_brute_force"]

_BLOCK = 64


def encode_keys(rewards: Sequence[np.ndarray], current: Sequence[int], n: int) -> list[np.ndarray]:
    """Per job, the exact lexicographic key of giving it k = 0..len-1 nodes (see module docstring)."""
    m = max(len(rewards), 1)
    w = (2 * n + 1) * (n + 1)
    bits = min(40, math.floor(52 - math.log2(w) - math.log2(m + 1)))
    if bits < 12:
        raise ValueError(f"dp: {m} jobs x {n} nodes is too large for exact keys")
    finite = [np.abs(r[np.isfinite(r)]) for r in (np.asarray(x, dtype=np.float64) for x in rewards)]
    peak = max((float(f.max()) for f in finite if f.size), default=0.0)
    q = peak / 2.0**bits if peak > 0 else 1.0
    keys = []
    for r, c in zip(rewards, current):
        k = np.arange(len(r), dtype=np.float64)
        keys.append(np.round(np.asarray(r, dtype=np.float64) / q) * w - (np.abs(k - c) * (n + 1) + k))
    return keys


def solve(keys: Sequence[np.ndarray], n: int) -> tuple[list[int], float]:
    """Maximising allocation (k_i per job, Σ k_i <= n) of the summed keys, and that sum."""
    m = len(keys)
    if m == 0:
        return [], 0.0
    prev = np.zeros(n + 1)
    choices = np.zeros((m, n + 1), dtype=np.int32)
    for i, key in enumerate(keys):
        kmax = min(len(key) - 1, n)
        v_rev = key[: kmax + 1][::-1]
        padded = np.concatenate([np.full(kmax, -np.inf), prev])
        window = sliding_window_view(padded, kmax + 1)  # row j: prev[j-kmax .. j]
        rows = range(n, n + 1) if i == m - 1 else range(n + 1)  # the last job only needs j = n
        best = np.full(n + 1, -np.inf)
        # row blocks keep the (rows x k) temporary in cache instead of one (n+1)^2 array
        for start in range(rows.start, rows.stop, _BLOCK):
            stop = min(start + _BLOCK, rows.stop)
            total = window[start:stop] + v_rev
            col = np.argmax(total, axis=1)
            best[start:stop] = np.take_along_axis(total, col[:, None], axis=1)[:, 0]
            choices[i, start:stop] = kmax - col
        prev = best
    alloc = [0] * m
    j = n
    for i in range(m - 1, -1, -1):
        alloc[i] = int(choices[i, j])
        j -= alloc[i]
    return alloc, float(prev[n])


def solve_naive(keys: Sequence[np.ndarray], n: int) -> tuple[list[int], float]:
    """`solve` with plain Python loops (same recurrence, same result)."""
    m = len(keys)
    vals = [[float(x) for x in key] for key in keys]
    prev = [0.0] * (n + 1)
    choices = [[0] * (n + 1) for _ in range(m)]
    for i in range(m):
        cur = [-math.inf] * (n + 1)
        v = vals[i]
        kmax = min(len(v) - 1, n)
        for j in range(n + 1):
            best, arg = -math.inf, 0
            for k in range(min(j, kmax) + 1):
                t = prev[j - k] + v[k]
                if t > best:
                    best, arg = t, k
            cur[j], choices[i][j] = best, arg
        prev = cur
    alloc = [0] * m
    j = n
    for i in range(m - 1, -1, -1):
        alloc[i] = choices[i][j]
        j -= alloc[i]
    return alloc, prev[n] if m else 0.0


def solve_brute_force(keys: Sequence[np.ndarray], n: int) -> tuple[list[int], float]:
    """Every allocation with Σ k_i <= n; exponential, for small instances only."""
    best: tuple[float, list[int]] = (-math.inf, [])
    ranges = [range(min(len(k) - 1, n) + 1) for k in keys]
    for alloc in itertools.product(*ranges):
        if sum(alloc) > n:
            continue
        total = sum(float(keys[i][k]) for i, k in enumerate(alloc))
        if total > best[0]:
            best = (total, list(alloc))
    return best[1], best[0] if keys else 0.0
