"""The hash-based dropout: its drop rate, independence between elements and keys, scaling, gradient,
and that a sharded array gets the mask of the unsharded one."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from v2flow_jax.models import dropout as dropout_lib

RATE = 0.1
KEYS = jnp.asarray([0x12345678, 0x9ABCDEF0], jnp.uint32)


def mix_np(x):
    """The same mixer in NumPy: a second implementation to check the traced one against."""
    x = x.astype(np.uint64)
    m = np.uint64(0xFFFFFFFF)
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & m
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & m
    x ^= x >> np.uint64(16)
    return x.astype(np.uint32)


def test_bits_match_a_numpy_rederivation():
    shape = (3, 5, 7)
    got = np.asarray(jax.jit(lambda k: dropout_lib.hash_bits(k, shape))(KEYS))
    flat = np.arange(np.prod(shape), dtype=np.uint32).reshape(shape)
    want = mix_np(mix_np(flat ^ np.uint32(0x12345678)) ^ np.uint32(0x9ABCDEF0))
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got)) == got.size          # a bijection of the index: no repeated word


def test_bits_are_uniform():
    bits = np.asarray(dropout_lib.hash_bits(KEYS, (256, 1024))).ravel()
    for shift in (0, 8, 16, 24, 28):                 # low, middle and high bits alike
        counts = np.bincount(((bits >> np.uint32(shift)) & np.uint32(15)).astype(np.int64), minlength=16)
        expected = bits.size / 16
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert chi2 < 50, (shift, chi2)               # 15 dof: p ~ 1e-5 at 50


@pytest.mark.parametrize("shape", [(4, 83, 1024), (4, 4, 128, 128), (1000003,)])
def test_drop_rate(shape):
    keep = np.asarray(dropout_lib.keep_mask(KEYS, RATE, shape))
    n = keep.size
    sigma = np.sqrt(RATE * (1 - RATE) / n)
    assert abs((1 - keep.mean()) - RATE) < 5 * sigma


def test_neighbours_and_keys_are_independent():
    shape = (64, 4096)
    keep = np.asarray(dropout_lib.keep_mask(KEYS, RATE, shape))
    drop = ~keep
    n = drop[:, 1:].size
    tol = 5 * np.sqrt(RATE ** 2 * (1 - RATE ** 2) / n)
    assert abs((drop[:, 1:] & drop[:, :-1]).mean() - RATE ** 2) < tol        # along the row
    assert abs((drop[1:] & drop[:-1]).mean() - RATE ** 2) < tol              # across rows
    other = ~np.asarray(dropout_lib.keep_mask(KEYS + jnp.uint32(1), RATE, shape))
    assert abs((drop & other).mean() - RATE ** 2) < tol                      # nearby keys
    assert (drop != other).mean() > 0.1


def test_inverted_scaling_and_gradient():
    x = jax.random.normal(jax.random.key(0), (32, 256))
    y = dropout_lib.dropout(x, RATE, KEYS)
    keep = np.asarray(dropout_lib.keep_mask(KEYS, RATE, x.shape))
    np.testing.assert_allclose(np.asarray(y)[keep], np.asarray(x)[keep] / (1 - RATE), rtol=1e-6)
    assert np.all(np.asarray(y)[~keep] == 0)
    g = jax.grad(lambda x: jnp.sum(dropout_lib.dropout(x, RATE, KEYS)))(x)
    np.testing.assert_allclose(np.asarray(g), keep / (1 - RATE), rtol=1e-6)
    assert dropout_lib.dropout(x, 0.0, KEYS) is x
    assert float(jnp.abs(dropout_lib.dropout(x, 1.0, KEYS)).max()) == 0.0


def test_module_draws_from_the_dropout_rng():
    layer = dropout_lib.Dropout(RATE)
    x = jnp.ones((16, 512))
    run = lambda seed: np.asarray(layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(seed)}))
    a, b, c = run(0), run(0), run(1)
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.1
    assert abs((a == 0).mean() - RATE) < 0.02
    np.testing.assert_array_equal(np.asarray(layer.apply({}, x, deterministic=True)), np.asarray(x))


def test_large_arrays_do_not_repeat_across_rows():
    """Beyond 2^32 elements the leading index is hashed separately: rows must not get the same words."""
    shape = (3, 2 ** 31)                               # 6.4e9 elements: only the formula is exercised, on a slice
    lead = np.arange(3, dtype=np.uint32)[:, None]
    rest = np.arange(4096, dtype=np.uint32)[None, :]
    words = mix_np(mix_np(lead ^ np.uint32(0x12345678)) ^ mix_np(rest ^ np.uint32(0x9ABCDEF0)))
    assert len(np.unique(words)) == words.size
    # and the traced function takes that branch for such a shape (abstractly: nothing is allocated)
    out = jax.eval_shape(lambda k: dropout_lib.hash_bits(k, shape), KEYS)
    assert out.shape == shape and out.dtype == jnp.uint32


def test_sharded_mask_equals_unsharded():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (virtual) devices")
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    x = jnp.ones((8, 6, 16))
    f = jax.jit(lambda x, k: dropout_lib.dropout(x, RATE, k))
    want = np.asarray(f(x, KEYS))
    x_sharded = jax.device_put(x, NamedSharding(mesh, P("data", None, "model")))
    got = f(x_sharded, KEYS)
    assert not got.sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(got), want)
