"""How close visual-token embeddings sit to an LLM's own embedding rows (the release's users' issue #4).

V2Flow's claim is that its codes live in the LLM's embedding space, so that extending the LLM with them
is natural. Two measures, on directions (codes are unit vectors; rows are l2-normalised too):
  * nearest-row cosine: for each code, the cosine to its most similar vocabulary row;
  * the Frechet distance between Gaussians fit to the two sets (the FID formula).
Each is reported beside its reference: the same measure for random unit vectors (what "unrelated to
the vocabulary" scores) and, for the cosine, the rows' own nearest other row (what a real word scores).
"""
from __future__ import annotations

import numpy as np

from v2flow_jax.metrics import frechet


def unit_rows(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def nearest_rows(vectors, table, chunk: int = 1024):
    """(index (N,), cosine (N,)) of each vector's most cosine-similar row of table (in row chunks:
    a 16384-code codebook against LLaMA's 32000 rows never holds the whole similarity matrix)."""
    v, t = unit_rows(vectors).astype(np.float32), unit_rows(table).astype(np.float32)
    idx, cos = [], []
    for i in range(0, len(v), chunk):
        sim = v[i:i + chunk] @ t.T
        j = np.argmax(sim, axis=1)
        idx.append(j)
        cos.append(sim[np.arange(len(j)), j])
    if not idx:
        return np.zeros((0,), np.int64), np.zeros((0,), np.float32)
    return np.concatenate(idx), np.concatenate(cos).astype(np.float64)


def frechet_distance(a, b, eps: float = 1e-6) -> float:
    """The Frechet distance of Gaussians fit to the rows of a and b (metrics/frechet.py, the FID's), or
    nan when a set has fewer than two rows (no covariance)."""
    if min(len(a), len(b)) < 2:
        return float("nan")
    return frechet.frechet_distance_from_features(a, b, eps=eps)


def alignment_report(codes, table, seed: int = 0) -> dict[str, float]:
    """Both measures for `codes` (N, d) against `table` (V, d), with their references. The Frechet
    distance is left out with fewer than 2 codes (no covariance; JSON has no NaN)."""
    codes, table = unit_rows(codes), unit_rows(table)
    rng = np.random.default_rng(seed)
    random = unit_rows(rng.standard_normal(codes.shape))
    rows = table[rng.choice(table.shape[0], min(table.shape[0], 1024), replace=False)]
    row_sim = rows.astype(np.float32) @ table.astype(np.float32).T
    row_sim[np.arange(rows.shape[0]), np.argmax(row_sim, axis=1)] = -np.inf   # the row itself
    report = {
        "align_nearest_cos": float(nearest_rows(codes, table)[1].mean()),
        "align_nearest_cos_random": float(nearest_rows(random, table)[1].mean()),
        "align_nearest_cos_rows": float(row_sim.max(axis=1).mean()),
    }
    if len(codes) >= 2:
        report.update(align_frechet=frechet_distance(codes, table), align_frechet_random=frechet_distance(random, table))
    return report


def nearest_words(codes, table, words, first_row: int = 0) -> list[str]:
    """The vocabulary word nearest to each code (rows of `table` are words[first_row:])."""
    idx, _ = nearest_rows(codes, table)
    return [words[first_row + int(i)] if words and first_row + int(i) < len(words) else f"<row {int(i)}>"
            for i in idx]
