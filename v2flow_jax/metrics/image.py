"""Pixel metrics (PSNR, SSIM) and the files an evaluation writes (image grids, metrics JSON).

Images in the model's convention are float NHWC in [-1, 1]; the metrics see them as [0, 1].
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import dm_pix
import jax.numpy as jnp
import numpy as np
from PIL import Image

from v2flow_jax import atomic_files


def to_unit_range(x):
    """[-1, 1] -> [0, 1] in float32, clipped: metrics are taken on the displayable image."""
    return jnp.clip((jnp.asarray(x, jnp.float32) + 1.0) * 0.5, 0.0, 1.0)


def psnr(a, b):
    """Per-image PSNR in dB (shape (N,) for NHWC input) of [-1, 1] images, peak value 1 in [0, 1].

    Identical images give +inf. Jit-able.
    """
    return dm_pix.psnr(to_unit_range(a), to_unit_range(b))


def ssim(a, b):
    """Per-image SSIM (Wang et al. 2004: 11x11 gaussian window, sigma 1.5, k1=0.01, k2=0.03).

    Channels are treated independently and averaged; H and W must be at least 11. Jit-able.
    """
    return dm_pix.ssim(to_unit_range(a), to_unit_range(b), max_val=1.0)


# ------------------------------------------------------------------------------------- image files

def to_uint8(images) -> np.ndarray:
    """uint8 RGB from [-1, 1] floats (or uint8), with 3 channels; keeps leading dims."""
    x = np.asarray(images)
    if x.dtype != np.uint8:
        x = np.round((np.clip(x.astype(np.float32), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    if x.shape[-1] not in (1, 3):      # (..., H, W) grayscale without a channel axis
        x = x[..., None]
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x


def image_grid(rows_of_images: Sequence[Any], pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tiles images into one uint8 (H, W, 3) picture, row by row.

    Each entry of `rows_of_images` is one row: a batch (n, h, w, c) or a list of (h, w, c)
    images, in [-1, 1] or uint8. `image_grid([originals, reconstructions])` puts each
    reconstruction under its original; `image_grid(list(zip(originals, recons)))` puts the pairs
    side by side. Rows may differ in length (the rest is `pad_value`); all images share h, w.
    `pad` pixels separate the images and frame the grid.
    """
    rows = [[to_uint8(img) for img in row] for row in rows_of_images]
    if not rows or not any(rows):
        raise ValueError("image_grid needs at least one image.")
    shapes = {img.shape for row in rows for img in row}
    if len(shapes) != 1:
        raise ValueError(f"image_grid: all images must have one shape, got {sorted(shapes)}.")
    (h, w, _), = shapes
    n_cols = max(len(row) for row in rows)
    grid = np.full((len(rows) * (h + pad) + pad, n_cols * (w + pad) + pad, 3), pad_value, np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            grid[y:y + h, x:x + w] = img
    return grid


def save_png(path: str | os.PathLike, image) -> str:
    """Saves a uint8 (H, W, 3) / (H, W) image as PNG (atomically); returns the path."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise TypeError(f"save_png expects uint8 pixels, got {img.dtype}; use to_uint8 first.")
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    return atomic_files.write_with(path, lambda f: Image.fromarray(img).save(f, format="PNG"))


def _jsonable(x):
    """numpy / jax scalars and arrays as plain Python numbers and lists."""
    if hasattr(x, "tolist"):       # np.ndarray, np.generic, jax.Array
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def write_json_metrics(path: str | os.PathLike, metrics: Mapping[str, Any]) -> str:
    """Writes a metrics dict as indented, key-sorted JSON (atomically); returns the path."""
    text = json.dumps(dict(metrics), indent=2, sort_keys=True, default=_jsonable) + "\n"
    return atomic_files.write_bytes(path, text.encode("utf-8"))
