"""Frozen latent spaces behind one interface.

Every autoencoder has `stride` (pixels per latent pixel), `channels` (latent channels), `scale` (multiply
latents by it before use, divide before decoding), `init_params(rng)`, and the pure functions
`encode(params, images)` (NHWC floats in [-1, 1] -> unscaled latents, NHWC) and `decode(params, latents)`.
`images_to_latents` / `latents_to_images` are the two ends the tokenizer sees (scaled latents); callers
pass the parameters in as jit arguments (`build.Run.constants`), so they are never baked into a program.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

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


def images_to_latents(ae, params, images):
    """Pixels in [-1, 1] -> latents times the autoencoder's scale (what the tokenizer reads); no gradient."""
    latents = ae.encode(params, images)
    return jax.lax.stop_gradient(latents.astype(jnp.float32) * ae.scale)


def latents_to_images(ae, params, latents):
    """Scaled latents -> pixels clipped to [-1, 1] (for `IdentityLatents`: the unscaled latents, unclipped)."""
    out = ae.decode(params, latents / ae.scale).astype(jnp.float32)
    return jnp.clip(out, -1.0, 1.0) if getattr(ae, "outputs_pixels", True) else out
