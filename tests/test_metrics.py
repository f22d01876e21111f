"""PSNR/SSIM against independent references, image grids and files, codebook usage."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata
from skimage.metrics import structural_similarity
from skimage.transform import resize

from v2flow_jax.metrics import codebook, image

# Eager dm-pix dispatches op by op (seconds for SSIM); jit once, as an evaluation would.
psnr = jax.jit(image.psnr)
ssim = jax.jit(image.ssim)


def _photo_pair(n=2, size=48, noise=0.1, seed=0):
    """Real photos in [-1, 1] (NHWC) and noisy copies of them."""
    photos = [skdata.astronaut(), skdata.chelsea()][:n]
    clean = np.stack([resize(p, (size, size), anti_aliasing=True) for p in photos]).astype(np.float32)
    clean = clean * 2.0 - 1.0
    rng = np.random.default_rng(seed)
    noisy = np.clip(clean + noise * rng.standard_normal(clean.shape), -1, 1).astype(np.float32)
    return clean, noisy


def test_psnr_matches_numpy_definition():
    a, b = _photo_pair()
    got = np.asarray(psnr(a, b))
    mse = np.mean(((a.astype(np.float64) + 1) / 2 - (b.astype(np.float64) + 1) / 2) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(got, 10 * np.log10(1.0 / mse), rtol=1e-5)
    assert got.shape == (2,)
    # Out-of-range reconstructions are clipped to the displayable range first.
    np.testing.assert_allclose(psnr(a, b * 1.5), psnr(a, np.clip(b * 1.5, -1, 1)), rtol=1e-6)
    assert np.isinf(np.asarray(psnr(a, a))).all()


def test_ssim_matches_skimage():
    a, b = _photo_pair()
    got = np.asarray(ssim(a, b))
    want = [structural_similarity((x + 1) / 2, (y + 1) / 2, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False, data_range=1.0, channel_axis=-1)
            for x, y in zip(a, b)]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got.shape == (2,)
    np.testing.assert_allclose(ssim(a, a), 1.0, atol=1e-5)


def test_image_grid_places_images_row_by_row():
    h, w, pad = 5, 7, 2
    originals = np.stack([np.full((h, w, 3), v, np.uint8) for v in (10, 20, 30)])
    recons = np.full((2, h, w, 1), 1.0, np.float32)       # floats in [-1, 1], grayscale, a short row
    grid = image.image_grid([originals, recons], pad=pad)
    assert grid.dtype == np.uint8
    assert grid.shape == (2 * h + 3 * pad, 3 * w + 4 * pad, 3)
    for c, v in enumerate((10, 20, 30)):
        x = pad + c * (w + pad)
        assert (grid[pad:pad + h, x:x + w] == v).all()
    y = pad + h + pad
    assert (grid[y:y + h, pad:pad + w] == 255).all() and (grid[y:y + h, pad + w + pad:pad + 2 * w + pad] == 255).all()
    assert (grid[:pad] == 255).all() and (grid[:, :pad] == 255).all()        # the frame
    pairs = image.image_grid(list(zip(originals, originals[::-1])), pad=0)
    assert pairs.shape == (3 * h, 2 * w, 3) and (pairs[:h, w:] == 30).all()
    with pytest.raises(ValueError, match="one shape"):
        image.image_grid([originals, np.zeros((1, h + 1, w, 3), np.uint8)])


def test_to_uint8_maps_the_range():
    x = np.array([-1.0, 0.0, 1.0, 3.0], np.float32).reshape(1, 4, 1)
    np.testing.assert_array_equal(image.to_uint8(x)[0, :, 0], [0, 128, 255, 255])


def test_save_png_and_json_metrics_are_written_whole(tmp_path):
    grid = image.image_grid([_photo_pair(n=1, size=16)[0]])
    path = image.save_png(tmp_path / "sub" / "grid.png", grid)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), grid)
    with pytest.raises(TypeError, match="uint8"):
        image.save_png(tmp_path / "bad.png", grid.astype(np.float32))

    metrics = {"psnr": np.float32(25.5), "ssim": jax.numpy.asarray(0.75), "per_image": np.arange(3),
               "step": 100, "name": "demo"}
    out = image.write_json_metrics(tmp_path / "eval" / "metrics.json", metrics)
    assert json.loads(open(out).read()) == {"psnr": 25.5, "ssim": 0.75, "per_image": [0, 1, 2],
                                            "step": 100, "name": "demo"}
    image.write_json_metrics(out, {"psnr": 30.0})            # replaces the old file
    assert json.loads(open(out).read()) == {"psnr": 30.0}
    assert sorted(os.listdir(tmp_path / "eval")) == ["metrics.json"]   # no temporary left behind
    with pytest.raises(TypeError):
        image.write_json_metrics(out, {"bad": object()})
    assert json.loads(open(out).read()) == {"psnr": 30.0}     # a failed write leaves the old file


def test_codebook_usage_matches_numpy():
    rng = np.random.default_rng(0)
    k = 50
    batches = [rng.integers(0, 30, size=(4, 16)), rng.integers(5, 40, size=(2, 16))]
    usage = codebook.CodebookUsage(k)
    assert np.isnan(usage.perplexity) and usage.usage == 0.0 and usage.dead_codes == k
    for b in batches:
        usage.update(jax.numpy.asarray(b))
    allidx = np.concatenate([b.ravel() for b in batches])
    counts = np.bincount(allidx, minlength=k)
    p = counts[counts > 0] / counts.sum()
    assert usage.total == allidx.size
    assert usage.usage == pytest.approx(len(np.unique(allidx)) / k)
    assert usage.dead_codes == k - len(np.unique(allidx))
    assert usage.perplexity == pytest.approx(np.exp(-np.sum(p * np.log(p))))

    other = codebook.CodebookUsage(k).update(np.array([49]))
    usage.merge(other)
    assert usage.counts[49] == 1 and usage.summary()["codebook_dead_codes"] == k - len(np.unique(allidx)) - 1
    assert codebook.CodebookUsage(8).update(np.arange(8)).perplexity == pytest.approx(8.0)
    assert codebook.CodebookUsage(8).update(np.zeros(5, int)).perplexity == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        codebook.CodebookUsage(8).update(np.array([8]))
