"""Streaming Pearson correlation of two activation streams, from mergeable float64 sums.

The sums are n, sum a, sum a^2, sum b, sum b^2 and the cross term sum a b^T, a matrix product
over token chunks: memory is one [d_a, d_b] block whatever the token count, and two halves
merge into exactly one pass over the whole.
"""

from __future__ import annotations

import numpy as np

CHUNK_ROWS = 4096  # token rows per update: 4,096 x 3,072 float64 is 100 MB per stream


class PairCorrelation:
    """Float64 sums of two activation streams [tokens, d_a] and [tokens, d_b]."""

    def __init__(self, d_a: int, d_b: int):
        self.n = 0
        self.sa, self.saa = np.zeros(d_a), np.zeros(d_a)
        self.sb, self.sbb = np.zeros(d_b), np.zeros(d_b)
        self.sab = np.zeros((d_a, d_b))

    def update(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = a.astype(np.float64), b.astype(np.float64)
        self.n += len(a)
        self.sa += a.sum(0)
        self.saa += (a * a).sum(0)
        self.sb += b.sum(0)
        self.sbb += (b * b).sum(0)
        self.sab += a.T @ b

    def merge(self, other: PairCorrelation) -> PairCorrelation:
        out = PairCorrelation(len(self.sa), len(self.sb))
        out.n = self.n + other.n
        for k in ("sa", "saa", "sb", "sbb", "sab"):
            setattr(out, k, getattr(self, k) + getattr(other, k))
        return out

    def correlation(self) -> np.ndarray:
        """[d_a, d_b] Pearson r; 0 where a neuron is constant (it correlates with nothing)."""
        n = self.n
        cov = self.sab - np.outer(self.sa, self.sb) / n
        va = np.maximum(self.saa - self.sa ** 2 / n, 0)
        vb = np.maximum(self.sbb - self.sb ** 2 / n, 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            corr = cov / np.sqrt(np.outer(va, vb))
        return np.nan_to_num(corr, nan=0.0)
