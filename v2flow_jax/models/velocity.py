"""AdaLN velocity MLP (MAR's "SimpleMLPAdaLN" shape) for rectified flow (REFERENCE section 4).

v(x_t, t, z): x_t a noisy patch (C), t the flow time already scaled by 1000, z the per-patch
conditioning from the decoder. Modulation and output layers start at zero, so an untrained model
predicts v = 0 and every residual block starts as the identity.
"""
from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from v2flow_jax.models.layers import dense, layer_norm, zeros

Dtype = Any
FREQUENCIES = 256
MAX_PERIOD = 10_000.0
normal02 = nn.initializers.normal(0.02)


def timestep_features(t, dim: int = FREQUENCIES, max_period: float = MAX_PERIOD):
    """Sinusoidal features [cos, sin] of a (B,) time array, geometric frequencies down to 1/max_period."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class AdaLNBlock(nn.Module):
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cond):
        w = x.shape[-1]
        mod = dense(3 * w, ("embed", "mlp"), dtype=self.dtype, kernel_init=zeros, name="adaLN_modulation")(nn.silu(cond))
        shift, scale, gate = jnp.split(mod, 3, axis=-1)
        h = modulate(layer_norm(1e-6, dtype=self.dtype, name="in_ln")(x), shift, scale)
        h = dense(w, ("embed", "mlp"), dtype=self.dtype, name="fc1")(h)
        h = dense(w, ("mlp", "embed"), dtype=self.dtype, name="fc2")(nn.silu(h))
        return x + gate * h


class VelocityMLP(nn.Module):
    out_channels: int
    width: int = 1536
    depth: int = 8
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, t, z):
        """x (B, C), t (B,) (= 1000 * flow time), z (B, D_dec) -> v (B, C) in float32."""
        temb = timestep_features(t)
        temb = dense(self.width, (None, "embed"), dtype=self.dtype, kernel_init=normal02, name="time_fc1")(temb)
        temb = dense(self.width, ("mlp", "embed"), dtype=self.dtype, kernel_init=normal02, name="time_fc2")(nn.silu(temb))
        cond = temb + dense(self.width, ("mlp", "embed"), dtype=self.dtype, name="cond_embed")(z)
        h = dense(self.width, ("latent", "embed"), dtype=self.dtype, name="input_proj")(x)
        for i in range(self.depth):
            h = AdaLNBlock(self.dtype, name=f"block{i}")(h, cond)
        shift, scale = jnp.split(dense(2 * self.width, ("embed", "mlp"), dtype=self.dtype, kernel_init=zeros,
                                       name="final_adaLN")(nn.silu(cond)), 2, axis=-1)
        h = modulate(layer_norm(1e-6, dtype=self.dtype, affine=False, name="final_norm")(h), shift, scale)
        out = dense(self.out_channels, ("embed", "latent"), dtype=self.dtype, kernel_init=zeros, name="final")(h)
        return out.astype(jnp.float32)
