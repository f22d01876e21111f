"""Trivial reconstructions: what a tokenizer must beat before its PSNR means anything.

Each takes images (B, H, W, C) in [-1, 1] and returns a "reconstruction" of the same shape that
carries (almost) no information: a flat grey image, each image's mean colour, and each p x p patch
replaced by its mean colour (p = the pixels one token covers: a tokenizer with fewer bits a patch
than three colours' worth is beaten by it).
"""
from __future__ import annotations

import numpy as np


def flat_grey(images):
    return np.zeros_like(np.asarray(images, np.float32))


def mean_colour(images):
    x = np.asarray(images, np.float32)
    return np.broadcast_to(x.mean(axis=(1, 2), keepdims=True), x.shape).copy()


def patch_mean(images, patch: int):
    x = np.asarray(images, np.float32)
    b, h, w, c = x.shape
    if h % patch or w % patch:
        raise ValueError(f"patch_mean: image size {h}x{w} is not a multiple of the patch {patch}.")
    means = x.reshape(b, h // patch, patch, w // patch, patch, c).mean(axis=(2, 4), keepdims=True)
    return np.broadcast_to(means, (b, h // patch, patch, w // patch, patch, c)).reshape(x.shape).copy()


def all_floors(images, patch: int) -> dict[str, np.ndarray]:
    """name -> trivial reconstruction of `images`, in the order they are reported."""
    return {"grey": flat_grey(images), "mean_colour": mean_colour(images), "patch_mean": patch_mean(images, patch)}
