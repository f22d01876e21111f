"""The identity "autoencoder": pixel space, cut into p x p patches.

It lets the tokenizer run without a pretrained latent space (demos, tests, pixel-space ablations) behind
the same interface as `dc_ae.DCAutoencoder`: a latent pixel is one p x p x C patch, flattened in
(row, column, channel) order.
"""
from __future__ import annotations

import einops
import jax.numpy as jnp


def patchify(images, p: int):
    """(B, H, W, C) -> (B, H/p, W/p, p*p*C)."""
    b, h, w, c = images.shape
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}.")
    return einops.rearrange(images, "b (h p) (w q) c -> b h w (p q c)", p=p, q=p)


def unpatchify(latents, p: int, channels: int):
    """(B, h, w, p*p*C) -> (B, h*p, w*p, C), the inverse of `patchify`."""
    return einops.rearrange(latents, "b h w (p q c) -> b (h p) (w q) c", p=p, q=p, c=channels)


class PixelAutoencoder:
    """Patchified pixels as the latent: stride p, channels C*p*p, scale 1, no parameters."""

    def __init__(self, patch_size: int = 1, image_channels: int = 3):
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}.")
        self.patch_size = int(patch_size)
        self.image_channels = int(image_channels)
        self.stride = self.patch_size
        self.channels = self.image_channels * self.patch_size ** 2
        self.scale = 1.0

    def init_params(self, rng=None):
        del rng
        return {}

    def encode(self, params, images):
        del params
        return patchify(jnp.asarray(images), self.patch_size)

    def decode(self, params, latents):
        del params
        return unpatchify(jnp.asarray(latents), self.patch_size, self.image_channels)


class IdentityLatents:
    """No autoencoder: the data already are latents (B, h, w, C), e.g. cached ones, fed as they are."""
    outputs_pixels = False

    def __init__(self, channels: int):
        self.stride, self.channels, self.scale = 1, int(channels), 1.0

    def init_params(self, rng=None):
        del rng
        return {}

    def encode(self, params, latents):
        del params
        return jnp.asarray(latents)

    def decode(self, params, latents):
        del params
        return jnp.asarray(latents)
