"""The masked encoder/decoder against an independent torch re-derivation (float64, every row computed).

Ours never computes rows it does not need: the encoder sees only a window of the order (padding rows
masked as keys), and the decoder's last block computes queries and its MLP only for the wanted patch
rows (all L in training, the patches being sampled in the sampler). The reference below is the plain
MAR computation: buffer + visible patches through the encoder, scatter into a grid of mask tokens,
every one of the n + L rows through every decoder block, then drop the buffer rows and pick.
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from v2flow_jax.models.mar import MaskedEncoderDecoder

N, L, C, WIDTH, HEADS, DEPTH, B = 6, 9, 5, 32, 4, 2, 3


def build(n=N, l=L, token_skip=False):
    return MaskedEncoderDecoder(num_patches=l, buffer_size=n, enc_width=WIDTH, enc_depth=DEPTH, enc_heads=HEADS,
                                dec_width=WIDTH, dec_depth=DEPTH, dec_heads=HEADS, dropout=0.1, token_skip=token_skip)


def random_params(model, seed=0):
    """Every parameter a well-scaled random draw (layer norms away from the identity too)."""
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *example_inputs(n=model.buffer_size,
                                                                                     l=model.num_patches)))
    flat = flax.traverse_util.flatten_dict(flax.linen.unbox(abstract)["params"])
    out = {}
    for k, s in flat.items():
        if k[-1] == "kernel":
            out[k] = rng.standard_normal(s.shape) / np.sqrt(s.shape[0])
        elif k[-1] == "scale":
            out[k] = 1 + 0.2 * rng.standard_normal(s.shape)
        else:
            out[k] = 0.2 * rng.standard_normal(s.shape)
    return {"params": flax.traverse_util.unflatten_dict({k: v.astype(np.float32) for k, v in out.items()})}


def example_inputs(seed=1, visible=4, n=N, l=L):
    rng = np.random.default_rng(seed)
    buffer = rng.standard_normal((B, n, WIDTH)).astype(np.float32)
    patches = rng.standard_normal((B, l, C)).astype(np.float32)
    orders = np.stack([rng.permutation(l) for _ in range(B)]).astype(np.int32)
    vis_idx = orders[:, l - visible:]
    vis_valid = np.ones((B, visible), bool)
    vis_valid[1, :2] = False                         # sample 1: the first two window rows are padding
    drop = np.array([False, True, False])            # sample 1 gets the dummy buffer
    return buffer, patches, vis_idx, vis_valid, drop


# ----------------------------------------------------------------------------- torch reference


def t(x):
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def ref_block(p, x, key_valid):
    b, s, d = x.shape
    h = F.layer_norm(x, (d,), t(p["norm1"]["scale"]), t(p["norm1"]["bias"]), eps=1e-6)
    qkv = h @ t(p["attn"]["qkv"]["kernel"]) + t(p["attn"]["qkv"]["bias"])
    q, k, v = qkv.reshape(b, s, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) / np.sqrt(d // HEADS)
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, s, d)
    x = x + out @ t(p["attn"]["proj"]["kernel"]) + t(p["attn"]["proj"]["bias"])
    h = F.layer_norm(x, (d,), t(p["norm2"]["scale"]), t(p["norm2"]["bias"]), eps=1e-6)
    h = F.gelu(h @ t(p["fc1"]["kernel"]) + t(p["fc1"]["bias"]))
    return x + h @ t(p["fc2"]["kernel"]) + t(p["fc2"]["bias"])


def ln(p, x):
    return F.layer_norm(x, (x.shape[-1],), t(p["scale"]), t(p["bias"]), eps=1e-6)


def reference(params, buffer, patches, vis_idx, vis_valid, drop, token_of_patch=None):
    """token_of_patch: (L,) token index per patch for the token_skip path (each token's decoder row added
    to the patch rows it covers), or None without it."""
    p = params["params"]
    N, L = buffer.shape[1], patches.shape[1]
    vis_idx_t, valid_t = torch.as_tensor(vis_idx, dtype=torch.long), torch.as_tensor(vis_valid)
    buf = torch.where(torch.as_tensor(drop)[:, None, None], t(p["fake_latent"]), t(buffer))
    seen = torch.stack([t(patches)[i, vis_idx_t[i]] for i in range(B)])
    enc_pos = t(p["encoder_pos_embed"])
    x_patch = seen @ t(p["z_proj"]["kernel"]) + t(p["z_proj"]["bias"]) + enc_pos[N:][vis_idx_t]
    x = ln(p["z_proj_ln"], torch.cat([buf + enc_pos[:N], x_patch], 1))
    key_valid = torch.cat([torch.ones(B, N, dtype=torch.bool), valid_t], 1)
    for i in range(DEPTH):
        x = ref_block(p[f"encoder_blocks_{i}"], x, key_valid)
    x = ln(p["encoder_norm"], x)
    y = x @ t(p["decoder_embed"]["kernel"]) + t(p["decoder_embed"]["bias"])
    grid = t(p["mask_token"]).expand(B, L, WIDTH).clone()
    for i in range(B):
        for j in range(vis_idx.shape[1]):
            if vis_valid[i, j]:
                grid[i, vis_idx[i, j]] = y[i, N + j]
    if token_of_patch is not None:
        grid = grid + y[:, torch.as_tensor(token_of_patch, dtype=torch.long)]
    x = torch.cat([y[:, :N], grid], 1) + t(p["decoder_pos_embed"])
    for i in range(DEPTH):
        x = ref_block(p[f"decoder_blocks_{i}"], x, None)
    return (ln(p["decoder_norm"], x)[:, N:] + t(p["diffusion_pos_embed"])).numpy()


@pytest.fixture(scope="module")
def setup():
    model = build()
    params = random_params(model)
    inputs = example_inputs()
    return model, params, inputs, reference(params, *inputs)


def test_training_path_matches_reference(setup):
    model, params, inputs, want = setup
    got = jax.jit(lambda p, *a: model.apply(p, *a))(params, *inputs)
    assert got.shape == (B, L, WIDTH)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=2e-4)


def test_output_rows_match_reference_rows(setup):
    """The sampler's path: z only at M patches per sample (a different set per sample)."""
    model, params, inputs, want = setup
    out_idx = np.array([[0, 4, 8], [7, 1, 2], [3, 3, 5]], np.int32)
    got = jax.jit(lambda p, *a: model.apply(p, *a))(params, *inputs, out_idx)
    assert got.shape == (B, 3, WIDTH)
    np.testing.assert_allclose(np.asarray(got), np.take_along_axis(want, out_idx[..., None], 1), atol=2e-4,
                               rtol=2e-4)


def test_exact_window_without_key_mask(setup):
    """visible_valid=None (the unrolled sampler's exact windows) equals an all-True mask."""
    model, params, inputs, _ = setup
    buffer, patches, vis_idx, _, drop = inputs
    ones = np.ones(vis_idx.shape, bool)
    want = reference(params, buffer, patches, vis_idx, ones, drop)
    got = jax.jit(lambda p, *a: model.apply(p, *a))(params, buffer, patches, vis_idx, None, drop)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=2e-4)
    empty = np.zeros((B, 0), np.int32)                  # the first AR step: nothing known yet
    want = reference(params, buffer, patches, empty, empty.astype(bool), drop)
    got = jax.jit(lambda p, *a: model.apply(p, *a))(params, buffer, patches, empty, None, drop)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=2e-4)


def test_dropout_is_live_in_training_and_off_otherwise(setup):
    model, params, inputs, want = setup
    rngs = lambda s: {"dropout": jax.random.key(s)}
    train = jax.jit(lambda p, s, *a: model.apply(p, *a, train=True, rngs=rngs(s)))
    a, b, c = (np.asarray(train(params, s, *inputs)) for s in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-2 and np.abs(a - want).max() > 1e-2


# ------------------------------------------------------------------------------------ token_skip


def test_patch_to_token_known_maps_and_errors():
    from v2flow_jax.models.mar import patch_to_token
    # 4x4 patches under 2x2 tokens: each token covers a 2x2 block, raster order on both grids
    np.testing.assert_array_equal(patch_to_token(16, 4), [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3])
    np.testing.assert_array_equal(patch_to_token(9, 9), np.arange(9))       # one token per patch
    np.testing.assert_array_equal(patch_to_token(4, 1), [0, 0, 0, 0])
    for patches, tokens in ((16, 6), (12, 4), (36, 16)):                      # not square / not dividing
        with pytest.raises(ValueError, match="token_skip"):
            patch_to_token(patches, tokens)


@pytest.mark.parametrize("n, l", [(4, 16), (9, 9)])
def test_token_skip_matches_reference(n, l):
    """With token_skip each token's decoder row is added to the rows of the patches it covers, before the
    decoder blocks; checked against the torch reference with that one extra line."""
    from v2flow_jax.models.mar import patch_to_token
    model = build(n, l, token_skip=True)
    params = random_params(model, seed=3)
    inputs = example_inputs(seed=4, n=n, l=l)
    got = np.asarray(jax.jit(lambda p, *a: model.apply(p, *a))(params, *inputs))
    np.testing.assert_allclose(got, reference(params, *inputs, token_of_patch=patch_to_token(l, n)),
                               atol=2e-4, rtol=2e-4)
    plain = np.asarray(jax.jit(lambda p, *a: build(n, l).apply(p, *a))(params, *inputs))
    assert np.abs(got - plain).max() > 0.1       # the path is live
