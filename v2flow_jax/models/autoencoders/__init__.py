"""Frozen latent spaces behind one interface.

Every autoencoder has `stride` (pixels per latent pixel), `channels` (latent channels), `scale` (multiply
latents by it before use, divide before decoding), `init_params(rng)`, and the pure functions
`encode(params, images)` (NHWC floats in [-1, 1] -> unscaled latents, NHWC) and `decode(params, latents)`.
"""
from __future__ import annotations

from typing import Any

from v2flow_jax.models.autoencoders.dc_ae import DCAutoencoder, sana_f32c32_config
from v2flow_jax.models.autoencoders.pixels import PixelAutoencoder

AUTOENCODERS = ("pixels", "dc_ae_f32c32", "dc_ae")


def build_autoencoder(name: str, **kwargs: Any):
    """'pixels' (patch_size=, image_channels=), 'dc_ae_f32c32' (dtype=), 'dc_ae' (config=<AutoencoderDC dict>, dtype=).

    Weights for the DC-AE variants come from `v2flow_jax.convert.dc_ae.load_params`.
    """
    if name == "pixels":
        return PixelAutoencoder(**kwargs)
    if name == "dc_ae_f32c32":
        return DCAutoencoder(sana_f32c32_config(), **kwargs)
    if name == "dc_ae":
        if "config" not in kwargs:
            raise ValueError("build_autoencoder('dc_ae') needs config=<AutoencoderDC config dict>, e.g. the "
                             "checkpoint's config.json (v2flow_jax.convert.dc_ae.read_config).")
        return DCAutoencoder(**kwargs)
    raise ValueError(f"unknown autoencoder {name!r}; use one of {AUTOENCODERS}.")
