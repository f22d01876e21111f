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
    """v(x, t, z). The time and condition embeddings are separate methods so a sampler can embed z
    once per AR step and t once per ODE step (it is the same for every row), not once per row."""
    out_channels: int
    width: int = 1536
    depth: int = 8
    dtype: Dtype = jnp.float32

    def setup(self):
        w, dt = self.width, self.dtype
        self.time_fc1 = dense(w, (None, "embed"), dtype=dt, kernel_init=normal02)
        self.time_fc2 = dense(w, ("mlp", "embed"), dtype=dt, kernel_init=normal02)
        self.cond_embed = dense(w, ("mlp", "embed"), dtype=dt)
        self.input_proj = dense(w, ("latent", "embed"), dtype=dt)
        self.blocks = [AdaLNBlock(dt) for _ in range(self.depth)]
        self.final_adaLN = dense(2 * w, ("embed", "mlp"), dtype=dt, kernel_init=zeros)
        self.final_norm = layer_norm(1e-6, dtype=dt, affine=False)
        self.final = dense(self.out_channels, ("embed", "latent"), dtype=dt, kernel_init=zeros)

    def embed_time(self, t):
        """(M,) times (already x1000) -> (M, W)."""
        return self.time_fc2(nn.silu(self.time_fc1(timestep_features(t)))).astype(jnp.float32)

    def embed_condition(self, z):
        """(M, D_dec) decoder features -> (M, W)."""
        return self.cond_embed(z).astype(jnp.float32)

    def from_embeddings(self, x, time_emb, cond_emb):
        """x (M, C) with time_emb broadcastable to (M, W) and cond_emb (M, W) -> v (M, C) float32."""
        cond = time_emb + cond_emb
        h = self.input_proj(x)
        for block in self.blocks:
            h = block(h, cond)
        shift, scale = jnp.split(self.final_adaLN(nn.silu(cond)), 2, axis=-1)
        h = modulate(self.final_norm(h), shift, scale)
        return self.final(h).astype(jnp.float32)

    def __call__(self, x, t, z):
        """x (B, C), t (B,) (= 1000 * flow time), z (B, D_dec) -> v (B, C) in float32."""
        return self.from_embeddings(x, self.embed_time(t), self.embed_condition(z))
