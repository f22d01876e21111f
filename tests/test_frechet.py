"""The Frechet distance against a direct scipy computation, its failure cases, and the streaming statistics."""
import logging

import numpy as np
import pytest
import scipy.linalg

from v2flow_jax.metrics import frechet


def _features(seed=0, n=500, d=64):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, d))
    # A second distribution with another mean and a correlated covariance.
    mix = np.eye(d) + 0.3 * rng.standard_normal((d, d)) / np.sqrt(d)
    b = 1.2 * rng.standard_normal((n, d)) @ mix + 0.25
    return a, b


def _direct(a, b):
    """The formula written out, nothing shared with the module under test."""
    m1, m2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = np.real(scipy.linalg.sqrtm(s1 @ s2))
    return float(np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * root))


def test_matches_direct_scipy_and_eigenvalue_forms():
    a, b = _features()
    got = frechet.frechet_distance_from_features(a, b)
    want = _direct(a, b)
    assert got > 1.0
    assert abs(got - want) <= 1e-6 * abs(want)
    # A third form: the eigenvalues of S1 S2 are real and >= 0, tr sqrt = sum of their roots.
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.clip(np.real(np.linalg.eigvals(s1 @ s2)), 0, None)
    alt = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig).sum()
    assert abs(got - alt) <= 1e-6 * abs(alt)


def test_statistics_are_float64_unbiased():
    a, _ = _features()
    mu, sigma = frechet.feature_statistics(a.astype(np.float32))
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, np.cov(a.astype(np.float32).astype(np.float64), rowvar=False), rtol=1e-12)


def test_identical_sets_give_zero():
    a, _ = _features()
    mu, sigma = frechet.feature_statistics(a)
    assert abs(frechet.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_fewer_samples_than_dims_is_finite(caplog):
    a, b = _features(seed=1, n=20, d=64)
    with caplog.at_level(logging.WARNING):
        value = frechet.frechet_distance_from_features(a, b)
    assert np.isfinite(value) and value > 0
    assert "rank-deficient" in caplog.text


def test_non_finite_sqrtm_retries_with_eps(monkeypatch, caplog):
    """The eps * I retry: sqrtm of a (numerically) singular product coming back inf / NaN."""
    a, b = _features(seed=2, n=200, d=16)
    (m1, s1), (m2, s2) = frechet.feature_statistics(a), frechet.feature_statistics(b)
    calls = []
    real_sqrtm = scipy.linalg.sqrtm

    def flaky(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.inf) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(scipy.linalg, "sqrtm", flaky)
    with caplog.at_level(logging.WARNING):
        value = frechet.frechet_distance(m1, s1, m2, s2, eps=1e-6)
    assert len(calls) == 2 and "not finite" in caplog.text and "1e-06 * I" in caplog.text
    offset = 1e-6 * np.eye(16)
    np.testing.assert_allclose(calls[1], (s1 + offset) @ (s2 + offset))
    assert abs(value - _direct(a, b)) < 1e-4


def test_large_imaginary_part_is_reported():
    # A "covariance" with a negative eigenvalue: the square root is genuinely complex.
    s1 = np.diag([1.0, -4.0])
    with pytest.raises(ValueError, match=r"imaginary component of 2"):
        frechet.frechet_distance(np.zeros(2), s1, np.zeros(2), np.eye(2))


def test_mismatched_statistics_are_refused():
    with pytest.raises(ValueError, match="do not match"):
        frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_streaming_over_three_hosts_equals_all_at_once():
    a, _ = _features(n=501)
    want_mu, want_sigma = frechet.feature_statistics(a)
    hosts = []
    for part in np.array_split(a, 3):
        acc = frechet.StreamingStatistics(a.shape[1])
        for batch in np.array_split(part, 4):          # several uneven batches per host
            acc.update(batch)
        hosts.append(acc)
    # As across hosts: each sends its arrays, the receiver sums them.
    gathered = [frechet.StreamingStatistics.from_arrays(*h.as_arrays()) for h in hosts]
    total = frechet.StreamingStatistics.combine(gathered)
    assert total.count == len(a)
    mu, sigma = total.statistics()
    np.testing.assert_allclose(mu, want_mu, rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma, want_sigma, rtol=0, atol=1e-12)
    assert np.array_equal(sigma, sigma.T)
    # Merging is a sum: order does not matter.
    _, sigma2 = (hosts[2] + hosts[0] + hosts[1]).statistics()
    np.testing.assert_allclose(sigma2, sigma, rtol=0, atol=1e-12)


def test_streaming_refuses_wrong_dimension():
    acc = frechet.StreamingStatistics(4)
    with pytest.raises(ValueError, match="dimension 5"):
        acc.update(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        acc.update(np.zeros((1, 4))).statistics()
