"""The Frechet distance between Gaussians fit to two feature sets (FID when the features are Inception pool3).

    d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

Everything here runs in numpy / scipy float64 on the host: the statistics are small (2048 x 2048 for
Inception) and the matrix square root needs a Schur decomposition that accelerators do not offer.

Evaluation over several hosts gathers features host by host with `StreamingStatistics`: each host keeps
a running count, sum and sum of outer products (float64), the hosts' accumulators are summed (`merge`),
and only then are the mean and covariance formed. Nothing but D + D^2 numbers per host ever moves.
"""
from __future__ import annotations

import warnings
from typing import Iterable

import numpy as np
import scipy.linalg
from absl import logging

# pytorch-fid's rule for "the imaginary part is only rounding": at most this on the diagonal of the
# square root (only the trace enters the distance). Kept so our values agree with theirs.
IMAG_TOLERANCE = 1e-3


def _as_features(features) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be a (num_samples, dim) matrix, got shape {x.shape}.")
    return x


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), sigma (D, D)) of `features` (N, D), float64; sigma is unbiased, like np.cov(rowvar=False).

    N <= D gives a rank-deficient sigma: the FID is then still defined but biased upwards and strongly
    dependent on N (see `frechet_distance`), so a warning is logged.
    """
    x = _as_features(features)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {n}.")
    if n <= d:
        logging.warning("Frechet statistics from %d samples of dimension %d: the covariance is rank-deficient "
                        "and the distance biased; use many more samples than dimensions (FID: >= 10k).", n, d)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    # scipy warns on singular input; we judge the result ourselves (finite? small imaginary part?).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        return scipy.linalg.sqrtm(matrix)


def _max_diag_imag(root: np.ndarray) -> float:
    return float(np.abs(np.imag(np.diagonal(root))).max()) if np.iscomplexobj(root) else 0.0


def _check_statistics(mu1, sigma1, mu2, sigma2):
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"Frechet statistics do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, "
                         f"sigma2 {sigma2.shape}; expected (D,) means and (D, D) covariances of one D.")
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} has non-finite entries: the features contain NaN or inf.")
    return mu1, sigma1, mu2, sigma2


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """The squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    The square root of sigma1 @ sigma2 is taken with scipy.linalg.sqrtm. When it comes out non-finite
    (a near-singular product), or with an imaginary part larger than rounding, eps * I is added to both
    covariances and it is taken again, with a logged warning; if the imaginary part is still large a
    ValueError names it. A negligible imaginary part (|Im| <= 1e-3 on the diagonal, pytorch-fid's rule)
    is dropped. Where the first attempt succeeds the value equals pytorch-fid's `calculate_frechet_distance`.

    Known failure cases:
      * Fewer samples than dimensions (N <= D, e.g. < 2048 images for Inception): the covariances are
        rank-deficient, the product singular, and the square root ill-conditioned. The result is finite
        (after the eps retry) but biased upwards and strongly dependent on N; FIDs are comparable only
        at equal N, and the usual practice is N = 50k (10k at the least).
      * float32 accumulation: sums of outer products of ~1e5 features carry ~1e-7 relative rounding per
        addition, and the one-pass covariance subtracts large, nearly equal numbers; in float32 that
        visibly moves the FID. Accumulate in float64 (`StreamingStatistics` and this function do).
      * Complex parts: sqrtm of a non-symmetric product of PSD matrices returns complex values when
        rounding makes eigenvalues slightly negative; a large imaginary part means the statistics are
        not covariances (wrong shapes, NaN-contaminated features, or non-PSD input).
    """
    mu1, sigma1, mu2, sigma2 = _check_statistics(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    root = _sqrtm(sigma1 @ sigma2)
    finite, imag = bool(np.isfinite(root).all()), _max_diag_imag(root)
    if not finite or imag > IMAG_TOLERANCE:
        logging.warning("Frechet distance: sqrtm(sigma1 @ sigma2) is %s; adding %g * I to both covariances "
                        "(too few samples for the dimension gives singular covariances).",
                        "not finite" if not finite else f"complex (max |Im| on the diagonal {imag:.3g})", eps)
        offset = eps * np.eye(sigma1.shape[0])
        root = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(root).all():
            raise ValueError("Frechet distance: sqrtm(sigma1 @ sigma2) is not finite even with eps * I added "
                             f"(eps={eps}); the covariances are degenerate, use more samples or a larger eps.")
        imag = _max_diag_imag(root)
        if imag > IMAG_TOLERANCE:
            raise ValueError(f"Frechet distance: sqrtm(sigma1 @ sigma2) has an imaginary component of {imag:.6g} "
                             f"on its diagonal (tolerance {IMAG_TOLERANCE}): the statistics are not valid "
                             f"covariances (NaN features, non-PSD input, or far too few samples).")
    root = np.real(root)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(root))


def frechet_distance_from_features(features1, features2, eps: float = 1e-6) -> float:
    """`frechet_distance` of the statistics of two (N, D) feature sets."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2), eps=eps)


class StreamingStatistics:
    """Running count, sum and sum of outer products of feature rows, in float64.

    `update(batch)` adds a (B, D) batch; `merge(other)` (or `+`) adds another accumulator, which is how
    hosts combine theirs (each host's `as_arrays()` can be all-gathered and summed); `statistics()` gives
    (mu, sigma) equal to `feature_statistics` of all rows seen. The one-pass covariance
    (sum_outer - n mu mu^T) / (n - 1) loses about log10(|mu|^2 / var) digits to cancellation: nothing
    in float64 for Inception features (means and spreads of similar size), ruinous in float32.
    """

    def __init__(self, dim: int):
        self.dim = int(dim)
        self.count = 0
        self.total = np.zeros((self.dim,), np.float64)
        self.outer = np.zeros((self.dim, self.dim), np.float64)

    def update(self, batch) -> "StreamingStatistics":
        x = _as_features(batch)
        if x.shape[1] != self.dim:
            raise ValueError(f"batch has dimension {x.shape[1]}, the accumulator {self.dim}.")
        self.count += x.shape[0]
        self.total += x.sum(axis=0)
        self.outer += x.T @ x
        return self

    def merge(self, other: "StreamingStatistics") -> "StreamingStatistics":
        """A new accumulator holding both: all three fields are sums, so merging is order-free."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge accumulators of dimensions {self.dim} and {other.dim}.")
        return StreamingStatistics.from_arrays(self.count + other.count, self.total + other.total,
                                               self.outer + other.outer)

    __add__ = merge

    @classmethod
    def combine(cls, parts: Iterable["StreamingStatistics"]) -> "StreamingStatistics":
        parts = list(parts)
        if not parts:
            raise ValueError("combine needs at least one accumulator.")
        result = parts[0]
        for part in parts[1:]:
            result = result.merge(part)
        return result

    def as_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(count (), sum (D,), sum of outer products (D, D)): what a host sends to be summed."""
        return np.asarray(self.count, np.int64), self.total.copy(), self.outer.copy()

    @classmethod
    def from_arrays(cls, count, total, outer) -> "StreamingStatistics":
        total, outer = np.asarray(total, np.float64), np.asarray(outer, np.float64)
        acc = cls(total.shape[0])
        if outer.shape != (acc.dim, acc.dim):
            raise ValueError(f"outer-product sum has shape {outer.shape}, expected {(acc.dim, acc.dim)}.")
        acc.count, acc.total, acc.outer = int(count), total.copy(), outer.copy()
        return acc

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) of everything accumulated, sigma unbiased (as `feature_statistics`)."""
        n = self.count
        if n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, the accumulator has {n}.")
        if n <= self.dim:
            logging.warning("Frechet statistics from %d samples of dimension %d: the covariance is rank-deficient "
                            "and the distance biased.", n, self.dim)
        mu = self.total / n
        sigma = (self.outer - n * np.outer(mu, mu)) / (n - 1)
        return mu, (sigma + sigma.T) * 0.5   # exact symmetry, lost to rounding in the subtraction
