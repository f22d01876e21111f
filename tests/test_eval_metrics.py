"""The evaluation's trivial floors and vocabulary-alignment measures, against plain numpy / closed forms."""
import numpy as np
import pytest
import scipy.linalg

from v2flow_jax import evaluate
from v2flow_jax.metrics import alignment, floors


def test_floors_are_the_means_they_claim():
    x = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(floors.flat_grey(x), 0.0)
    np.testing.assert_allclose(floors.mean_colour(x)[1, 5, 2], x[1].mean(axis=(0, 1)), rtol=1e-6)
    pm = floors.patch_mean(x, 4)
    np.testing.assert_allclose(pm[0, 6, 1], x[0, 4:8, 0:4].mean(axis=(0, 1)), rtol=1e-5)
    np.testing.assert_allclose(floors.patch_mean(x, 1), x)
    with pytest.raises(ValueError, match="multiple"):
        floors.patch_mean(x, 3)


def test_frechet_distance_closed_form_and_identity():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((4000, 3))
    b = rng.standard_normal((4000, 3)) * np.array([1.0, 2.0, 0.5]) + np.array([1.0, 0.0, -2.0])
    # for diagonal covariances: |dmu|^2 + sum (s_a - s_b)^2 over standard deviations
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    want = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca + cb - 2 * np.real(scipy.linalg.sqrtm(ca @ cb)))
    got = alignment.frechet_distance(a, b)
    np.testing.assert_allclose(got, want, rtol=1e-8)
    np.testing.assert_allclose(got, 5.0 + 0.0 + 1.0 + 0.25, atol=0.4)   # population value
    assert abs(alignment.frechet_distance(a, a)) < 1e-6
    # fewer points than dimensions: singular covariances, still finite
    assert np.isfinite(alignment.frechet_distance(rng.standard_normal((5, 16)), rng.standard_normal((300, 16))))
    assert np.isnan(alignment.frechet_distance(a[:1], b))


def test_nearest_rows_and_alignment_reference_points():
    rng = np.random.default_rng(2)
    table = rng.standard_normal((300, 16)) * 2.0
    idx, cos = alignment.nearest_rows(table[[7, 42]] * 0.1, table, chunk=1)
    np.testing.assert_array_equal(idx, [7, 42])
    np.testing.assert_allclose(cos, 1.0, atol=1e-6)
    on_rows = alignment.alignment_report(table[:50], table)
    off_rows = alignment.alignment_report(rng.standard_normal((50, 16)), table)
    assert on_rows["align_nearest_cos"] > 0.999 > off_rows["align_nearest_cos"]
    assert on_rows["align_frechet"] < off_rows["align_frechet"]
    words = [f"w{i}" for i in range(310)]
    assert alignment.nearest_words(table[[3]], table, words, first_row=10) == ["w13"]


def test_swap_ids_rolls_only_the_real_rows():
    ids = np.arange(8).reshape(4, 2)
    out = evaluate.swap_ids(ids, 3)
    np.testing.assert_array_equal(out[:3], ids[[1, 2, 0]])
    np.testing.assert_array_equal(out[3], ids[3])


def test_alignment_report_leaves_out_frechet_for_one_code():
    """One code in use (a collapsed codebook) has no covariance: no Frechet entry rather than NaN in JSON."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((50, 8))
    one = alignment.alignment_report(table[:1], table)
    assert "align_frechet" not in one and one["align_nearest_cos"] > 0.999
    assert np.isfinite(alignment.alignment_report(table[:5], table)["align_frechet"])
