"""The velocity MLP against a plain NumPy re-derivation of MAR's SimpleMLPAdaLN, on random weights.

Same layout as MAR: one modulation layer per residual block and one for the final layer.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from v2flow_jax.models.velocity import VelocityMLP

WIDTH, DEPTH, CHANNELS, COND = 16, 3, 5, 12


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _layer_norm(x, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)


def _reference(p, x, t, z):
    """MAR's SimpleMLPAdaLN forward in float64: TimestepEmbedder, cond Linear, ResBlocks, FinalLayer."""
    lin = lambda q, h: h @ q["kernel"] + q["bias"]
    half = 128
    freqs = np.exp(-math.log(10_000.0) * np.arange(half) / half)
    args = t[:, None] * freqs[None]
    t_emb = lin(p["time_fc2"], _silu(lin(p["time_fc1"], np.concatenate([np.cos(args), np.sin(args)], -1))))
    y = _silu(t_emb + lin(p["cond_embed"], z))
    h = lin(p["input_proj"], x)
    for i in range(DEPTH):
        blk = p[f"blocks_{i}"]
        shift, scale, gate = np.split(lin(blk["adaLN_modulation"], y), 3, axis=-1)
        u = _layer_norm(h) * blk["in_ln"]["scale"] + blk["in_ln"]["bias"]
        u = u * (1 + scale) + shift
        h = h + gate * lin(blk["fc2"], _silu(lin(blk["fc1"], u)))
    shift, scale = np.split(lin(p["final_adaLN"], y), 2, axis=-1)
    return lin(p["final"], _layer_norm(h) * (1 + scale) + shift)


def test_velocity_mlp_matches_numpy_simple_mlp_adaln():
    model = VelocityMLP(CHANNELS, WIDTH, DEPTH)
    rng = np.random.RandomState(0)
    x = rng.normal(size=(7, CHANNELS)).astype(np.float32)
    t = rng.uniform(0, 1000, size=(7,)).astype(np.float32)
    z = rng.normal(size=(7, COND)).astype(np.float32)
    params = nn.unbox(model.init(jax.random.key(0), x, t, z)["params"])
    # Zero-initialised modulation and output layers would hide most of the network: use random weights.
    leaves, tree = jax.tree.flatten(params)
    params = jax.tree.unflatten(tree, [0.3 * rng.normal(size=l.shape).astype(np.float32) for l in leaves])
    assert sorted(params) == sorted(["time_fc1", "time_fc2", "cond_embed", "input_proj", "final_adaLN", "final"]
                                    + [f"blocks_{i}" for i in range(DEPTH)])

    out = model.apply({"params": params}, x, t, z)
    ref = _reference(jax.tree.map(lambda a: np.asarray(a, np.float64), params), x.astype(np.float64),
                     t.astype(np.float64), z.astype(np.float64))
    assert out.shape == (7, CHANNELS) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-4, atol=2e-4 * np.abs(ref).max())

    # The sampler's path: condition embedded once, one time shared by every row.
    cond = model.apply({"params": params}, z, method=model.embed_condition)
    t_emb = model.apply({"params": params}, jnp.full((1,), t[0]), method=model.embed_time)
    shared = model.apply({"params": params}, x, t_emb, cond, method=model.from_embeddings)
    ref_shared = _reference(jax.tree.map(lambda a: np.asarray(a, np.float64), params), x.astype(np.float64),
                            np.full(7, t[0], np.float64), z.astype(np.float64))
    np.testing.assert_allclose(np.asarray(shared), ref_shared, rtol=2e-4, atol=2e-4 * np.abs(ref_shared).max())
