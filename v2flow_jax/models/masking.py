"""Random orders, mask ratios and fixed-shape windows over them (training and sampling share these).

Static shapes under jit: how many patches are visible depends on a random mask ratio, so the
encoder never gets a variable-length sequence. Instead it gets a static window of
`max_visible` positions taken from the END of each sample's random order. The visible patches of a
sample are `order[num_masked:]`, which always lies inside that window; window rows before
`num_masked` are padding and are switched off by a key mask. The encoder thus processes
`n + max_visible` rows, never the masked patches.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def random_orders(rng, batch: int, num_patches: int):
    """One uniformly random permutation of the patch indices per sample, (B, L) int32."""
    return jnp.argsort(jax.random.uniform(rng, (batch, num_patches)), axis=-1).astype(jnp.int32)


def sample_mask_ratio(rng, min_ratio=0.7, mean=1.0, std=0.25):
    """One ratio per batch from normal(mean, std) truncated to [min_ratio, 1]."""
    lower, upper = (min_ratio - mean) / std, (1.0 - mean) / std
    return mean + std * jax.random.truncated_normal(rng, lower, upper, (), jnp.float32)


def max_visible(num_patches: int, min_ratio: float) -> int:
    """Largest number of unmasked patches a training batch can have (static)."""
    return num_patches - math.ceil(num_patches * min_ratio - 1e-6)


def num_masked_for(ratio, num_patches: int, max_vis: int):
    """ceil(L * ratio), kept within [L - max_vis, L] so the visible set fits the static window."""
    n = jnp.ceil(ratio * num_patches - 1e-6).astype(jnp.int32)
    return jnp.clip(n, num_patches - max_vis, num_patches)


def mask_from_order(orders, num_masked):
    """(B, L) bool: True where the patch is masked, i.e. among the first `num_masked` of its order.

    `num_masked` is a scalar or per-sample (B,) integer.
    """
    ranks = jnp.argsort(orders, axis=-1)  # position of each patch in its sample's order
    return ranks < jnp.reshape(num_masked, (-1, 1))


def visible_window(orders, num_masked, max_vis: int):
    """Static window of the last `max_vis` order entries and which of them are visible.

    Returns (indices (B, max_vis) int32, valid (B, max_vis) bool).
    """
    num_patches = orders.shape[-1]
    positions = jnp.arange(num_patches - max_vis, num_patches)
    valid = positions[None, :] >= jnp.reshape(num_masked, (-1, 1))
    return orders[:, num_patches - max_vis:], jnp.broadcast_to(valid, (orders.shape[0], max_vis))


def cosine_schedule(num_patches: int, num_steps: int) -> list[int]:
    """Still-masked counts after each AR step (MAR's cosine schedule); the last entry is 0."""
    remaining = num_patches
    counts = []
    for step in range(num_steps):
        if step == num_steps - 1:
            mask_len = 0
        else:
            mask_len = int(np.floor(num_patches * np.cos(np.pi / 2.0 * (step + 1) / num_steps)))
            mask_len = max(1, min(remaining - 1, mask_len))
        counts.append(mask_len)
        remaining = mask_len
    return counts


def tokens_per_step(num_patches: int, num_steps: int) -> list[int]:
    """How many patches leave the mask at each step (5/14/21/24 for L = 64, K = 4)."""
    before = [num_patches] + cosine_schedule(num_patches, num_steps)[:-1]
    return [b - a for b, a in zip(before, cosine_schedule(num_patches, num_steps))]
