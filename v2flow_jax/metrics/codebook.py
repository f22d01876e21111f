"""Codebook usage over an evaluation: how many codes are used, and how evenly."""
from __future__ import annotations

import numpy as np


class CodebookUsage:
    """Accumulates a histogram of code indices (host-side numpy).

    `update` takes any integer array of indices (e.g. (B, n) from the quantizer). With several
    processes, feed each its local indices and combine with `merge` (or sum `counts` across hosts).
    """

    def __init__(self, codebook_size: int):
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {codebook_size}.")
        self.codebook_size = int(codebook_size)
        self.counts = np.zeros(self.codebook_size, np.int64)

    def update(self, indices) -> "CodebookUsage":
        idx = np.asarray(indices).reshape(-1)
        if idx.size == 0:
            return self
        if not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"code indices must be integers, got {idx.dtype}.")
        lo, hi = idx.min(), idx.max()
        if lo < 0 or hi >= self.codebook_size:
            raise ValueError(f"code indices must lie in [0, {self.codebook_size}), got [{lo}, {hi}].")
        self.counts += np.bincount(idx, minlength=self.codebook_size)
        return self

    def merge(self, other: "CodebookUsage") -> "CodebookUsage":
        if other.codebook_size != self.codebook_size:
            raise ValueError(f"cannot merge codebook sizes {self.codebook_size} and {other.codebook_size}.")
        self.counts += other.counts
        return self

    def reset(self) -> None:
        self.counts[:] = 0

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def usage(self) -> float:
        """Fraction of the codebook used at least once."""
        return float(np.count_nonzero(self.counts)) / self.codebook_size

    @property
    def dead_codes(self) -> int:
        """Number of codes never used."""
        return int(self.codebook_size - np.count_nonzero(self.counts))

    @property
    def perplexity(self) -> float:
        """exp(entropy) of the empirical code distribution: the effective number of codes used.

        Ranges from 1 (one code) to codebook_size (uniform); NaN before any update.
        """
        total = self.counts.sum()
        if total == 0:
            return float("nan")
        p = self.counts[self.counts > 0] / total
        return float(np.exp(-(p * np.log(p)).sum()))

    def summary(self) -> dict:
        """The statistics as a flat dict for the metrics JSON."""
        return {"codebook_usage": self.usage, "codebook_perplexity": self.perplexity,
                "codebook_dead_codes": self.dead_codes, "codebook_size": self.codebook_size,
                "codebook_tokens": self.total}
