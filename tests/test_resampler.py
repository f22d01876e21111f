"""The visual vocabulary resampler against plain-numpy (and torch) re-derivations of RegNet / STC / G.

Every oracle here is written from REFERENCE.md section 3 alone and fed with the module's own
parameter tree (structure from `init` via eval_shape), filled with random values, LayerNorm scales
and biases included, so that every term matters; the same dict goes to flax and to the oracle.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from v2flow_jax.models import resampler as rs

# XLA's CPU backend spends most of these tests compiling; LLVM at -O0 halves that and leaves the
# HLO (hence every numerical result up to float rounding) as it is.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

LN_EPS = 1e-5


# ----------------------------------------------------------------------------- numpy oracle


def np_silu(x):
    return x / (1.0 + np.exp(-x))


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def np_ln(x, p):
    """LayerNorm2d in NHWC: over channels at every position, biased variance, eps 1e-5, affine."""
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + LN_EPS) * p["scale"] + p["bias"]


def np_conv1x1(x, p, bias=False):
    k = np.asarray(p["kernel"], np.float64)
    assert k.shape[:2] == (1, 1)
    y = x @ k[0, 0]
    if bias:
        y = y + p["bias"]
    else:
        assert "bias" not in p
    return y


def np_depthwise3x3(x, p):
    """Cross-correlation, zero padding 1 ('SAME'), one 3x3 filter per channel, no bias."""
    k = np.asarray(p["kernel"], np.float64)  # (3, 3, 1, C)
    assert k.shape == (3, 3, 1, x.shape[-1]) and "bias" not in p
    b, h, w, c = x.shape
    xp = np.zeros((b, h + 2, w + 2, c))
    xp[:, 1:-1, 1:-1] = x
    out = np.zeros_like(x)
    for di in range(3):
        for dj in range(3):
            out += xp[:, di:di + h, dj:dj + w, :] * k[di, dj, 0]
    return out


def np_bottleneck(x, p):
    c_in = x.shape[-1]
    y = np_silu(np_ln(np_conv1x1(x, p["conv1"]), p["norm1"]))
    y = np_silu(np_ln(np_depthwise3x3(y, p["conv2"]), p["norm2"]))
    # squeeze-excitation: global mean, 1x1 (bias) -> SiLU -> 1x1 (bias) -> sigmoid gate
    s = y.mean(axis=(1, 2), keepdims=True)
    s = np_silu(np_conv1x1(s, p["se"]["fc1"], bias=True))
    s = np_conv1x1(s, p["se"]["fc2"], bias=True)
    y = y * np_sigmoid(s)
    y = np_ln(np_conv1x1(y, p["conv3"]), p["norm3"])
    c_out = y.shape[-1]
    if c_in != c_out:
        sc = np_ln(np_conv1x1(x, p["shortcut"]), p["shortcut_norm"])
    else:
        assert "shortcut" not in p
        sc = x
    return np_silu(y + sc)


def np_stage(x, p, depth):
    for i in range(depth):
        x = np_bottleneck(x, p[f"block{i}"])
    return x


def np_avg_pool(x, k):
    b, h, w, c = x.shape
    return x.reshape(b, h // k, k, w // k, k, c).mean(axis=(2, 4))


def np_stc(x, p, depth, pool):
    x = np_stage(x, p["stage1"], depth)
    if pool > 1:
        x = np_avg_pool(x, pool)
    x = np_silu(x)
    x = np_stage(x, p["stage2"], depth)
    b, h, w, c = x.shape
    out = np.zeros((b, h * w, c))
    for i in range(h):           # raster order: row by row, left to right
        for j in range(w):
            out[:, i * w + j] = x[:, i, j]
    return out


def np_dense(x, p):
    y = x @ np.asarray(p["kernel"], np.float64)
    return y + p["bias"] if "bias" in p else y


def np_generator(x, p, rank):
    h = np_gelu(np_dense(x, p["fc1"]))
    if rank:
        assert "bias" not in p["fc2_down"]
        return np_dense(np_dense(h, p["fc2_down"]), p["fc2_up"])
    return np_dense(h, p["fc2"])


# ----------------------------------------------------------------------------- helpers


def random_params(abstract, seed=0):
    """Random parameters of the module's own (eval_shape'd) structure: kernels ~ N(0, 1/fan_in),
    LayerNorm scales 1 + 0.5 N and biases 0.5 N, other biases 0.3 N, so every term matters.

    Building them from the abstract tree keeps XLA compiles down to one jitted apply per module.
    """
    rng = np.random.default_rng(seed)
    flat, treedef = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract))
    leaves = []
    for path, leaf in flat:
        keys = [getattr(k, "key", None) for k in path]
        shape = leaf.shape
        if keys[-1] == "kernel":
            value = rng.standard_normal(shape) / math.sqrt(math.prod(shape[:-1]))
        elif keys[-1] == "scale":
            value = 1.0 + 0.5 * rng.standard_normal(shape)
        elif keys[-1] == "bias":
            value = (0.5 if any(isinstance(k, str) and "norm" in k for k in keys) else 0.3) * rng.standard_normal(shape)
        else:
            raise AssertionError(f"unexpected parameter {keys}")
        leaves.append(value.astype(np.float32))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def to_np64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def init_params(module, x, seed=0, **kw):
    return random_params(jax.eval_shape(functools.partial(module.init, **kw), jax.random.key(0), x), seed)["params"]


def japply(module, params, *args, rngs=None, **kw):
    """One jitted apply (static keyword arguments), instead of op-by-op eager dispatch."""
    fn = jit(lambda p, r, *a: module.apply({"params": p}, *a, rngs=r, **kw))
    return fn(params, rngs, *args)


def rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ----------------------------------------------------------------------------- RegBottleneck


@pytest.mark.parametrize("c_in,c_out,scale", [(8, 16, 1.0), (16, 16, 1.0), (12, 20, 1.0), (8, 16, 0.003)])
def test_bottleneck_matches_numpy(c_in, c_out, scale):
    # scale 0.003: the first LN sees a variance ~1e-5, so its eps (1e-5) visibly matters
    x = rand((2, 5, 6, c_in), seed=c_in) * np.float32(scale)
    block = rs.RegBottleneck(c_out)
    params = init_params(block, x, seed=c_out)
    # structure: SE width = round(0.25 * block INPUT channels); shortcut only when channels change
    assert params["se"]["fc1"]["kernel"].shape == (1, 1, c_out, int(round(0.25 * c_in)))
    assert params["se"]["fc2"]["kernel"].shape == (1, 1, int(round(0.25 * c_in)), c_out)
    assert params["conv2"]["kernel"].shape == (3, 3, 1, c_out)
    assert ("shortcut" in params) == (c_in != c_out)
    got = np.asarray(japply(block, params, x))
    want = np_bottleneck(x.astype(np.float64), to_np64(params))
    assert got.shape == (2, 5, 6, c_out)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_bottleneck_matches_torch():
    """Second oracle: torch conv2d (NCHW, groups=C for the depthwise conv) and F.layer_norm."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    c_in, c_out = 8, 12
    x = rand((2, 4, 5, c_in), seed=3)
    block = rs.RegBottleneck(c_out)
    p = init_params(block, x, seed=4)
    got = np.asarray(japply(block, p, x))

    t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float64)
    w = lambda k: t(k).permute(3, 2, 0, 1)  # HWIO -> OIHW

    def ln2d(y, q):
        return F.layer_norm(y.permute(0, 2, 3, 1), (y.shape[1],), t(q["scale"]), t(q["bias"]),
                            eps=LN_EPS).permute(0, 3, 1, 2)

    xt = t(x).permute(0, 3, 1, 2)
    y = F.silu(ln2d(F.conv2d(xt, w(p["conv1"]["kernel"])), p["norm1"]))
    y = F.silu(ln2d(F.conv2d(y, w(p["conv2"]["kernel"]), padding=1, groups=c_out), p["norm2"]))
    s = y.mean((2, 3), keepdim=True)
    s = F.silu(F.conv2d(s, w(p["se"]["fc1"]["kernel"]), t(p["se"]["fc1"]["bias"])))
    s = F.conv2d(s, w(p["se"]["fc2"]["kernel"]), t(p["se"]["fc2"]["bias"]))
    y = y * torch.sigmoid(s)
    y = ln2d(F.conv2d(y, w(p["conv3"]["kernel"])), p["norm3"])
    sc = ln2d(F.conv2d(xt, w(p["shortcut"]["kernel"])), p["shortcut_norm"])
    want = F.silu(y + sc).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_depthwise_conv_is_cross_correlation_not_convolution():
    """An asymmetric kernel distinguishes cross-correlation (torch/flax) from true convolution."""
    conv = rs.DepthwiseConv3x3()
    x = rand((1, 5, 5, 3), seed=9)
    p = init_params(conv, x)
    got = np.asarray(japply(conv, p, x))
    np.testing.assert_allclose(got, np_depthwise3x3(x.astype(np.float64), to_np64(p)), atol=1e-6)


def test_regstage_matches_numpy():
    x = rand((2, 4, 4, 6), seed=1)
    stage = rs.RegStage(depth=3, features=16)
    p = init_params(stage, x, seed=2)
    assert sorted(p) == ["block0", "block1", "block2"]
    assert "shortcut" in p["block0"] and "shortcut" not in p["block1"]
    np.testing.assert_allclose(np.asarray(japply(stage, p, x)),
                               np_stage(x.astype(np.float64), to_np64(p), 3), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- STC connector


@pytest.mark.parametrize("pool", [1, 2])
def test_stc_connector_matches_numpy(pool):
    b, h, w, c, width = 2, 4, 6, 5, 16
    x = rand((b, h, w, c), seed=5)
    stc = rs.STCConnector(width=width, depth=2, pool=pool)
    p = init_params(stc, x, seed=6)
    got = np.asarray(japply(stc, p, x))
    assert got.shape == (b, (h // pool) * (w // pool), width)
    want = np_stc(x.astype(np.float64), to_np64(p), 2, pool)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_stc_raster_order_follows_the_grid():
    """Row i*w' + j of the output is pooled grid cell (i, j): checked against the oracle's explicit
    (i, j) loop on a non-square grid, and a column-major flatten of the same grid must disagree."""
    b, h, w, c = 1, 4, 8, 4
    stc = rs.STCConnector(width=8, depth=1, pool=2)
    x = rand((b, h, w, c), seed=18)
    x[0, 0:2, 2:4] += 3.0  # a bump in pooled cell (0, 1)
    p = init_params(stc, x, seed=7)
    got = np.asarray(japply(stc, p, x))
    want = np_stc(x.astype(np.float64), to_np64(p), 1, 2)
    assert got.shape == (b, 2 * 4, 8)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    grid = want.reshape(b, 2, 4, -1)
    column_major = grid.transpose(0, 2, 1, 3).reshape(b, 8, -1)
    assert np.abs(column_major - got).max() > 1e-3


# ----------------------------------------------------------------------------- Gumbel-softmax / G


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_gumbel_softmax_deterministic_is_tempered_softmax(tau):
    logits = rand((3, 7, 11), seed=8) * 2
    got = np.asarray(jit(lambda l: rs.gumbel_softmax(None, l, tau, noisy=False))(logits))
    np.testing.assert_allclose(got, np_softmax(logits.astype(np.float64) / tau), atol=1e-6)


def test_gumbel_softmax_noisy_differs_and_sums_to_one():
    logits = jnp.asarray(rand((4, 9, 13), seed=10))
    noisy = jit(lambda key: rs.gumbel_softmax(key, logits, 1.0, noisy=True))
    a, b = np.asarray(noisy(jax.random.key(1))), np.asarray(noisy(jax.random.key(2)))
    det = np_softmax(np.asarray(logits, np.float64))
    np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-5)
    assert (a >= 0).all()
    assert np.abs(a - det).max() > 1e-2 and np.abs(a - b).max() > 1e-2
    # same key -> same draw
    np.testing.assert_array_equal(a, np.asarray(noisy(jax.random.key(1))))


@pytest.mark.parametrize("rank", [0, 4])
def test_generator_shapes_and_values(rank):
    d, vocab = 8, 24
    x = rand((2, 3, d), seed=11)
    gen = rs.Generator(vocab, rank)
    p = init_params(gen, x, seed=12)
    shapes = jax.tree.map(lambda a: a.shape, p)
    if rank:
        assert shapes == {"fc1": {"kernel": (d, vocab), "bias": (vocab,)},
                          "fc2_down": {"kernel": (vocab, rank)},
                          "fc2_up": {"kernel": (rank, vocab), "bias": (vocab,)}}
    else:
        assert shapes == {"fc1": {"kernel": (d, vocab), "bias": (vocab,)},
                          "fc2": {"kernel": (vocab, vocab), "bias": (vocab,)}}
    got = np.asarray(japply(gen, p, x))
    np.testing.assert_allclose(got, np_generator(x.astype(np.float64), to_np64(p), rank), atol=1e-5, rtol=1e-5)


def test_resampler_vocabulary_mode_matches_numpy(rank=4):
    """Deterministic encode: softmax(G(STC(x)) / tau) @ L; the noisy one differs per 'sample' rng."""
    b, h, c, width, vocab, dim, tau = 2, 4, 3, 8, 16, 6, 0.7
    x = rand((b, h, h, c), seed=13)
    table = rand((vocab, dim), seed=14)
    mod = rs.Resampler(width=width, depth=1, pool=1, vocab_size=vocab, generator_rank=rank, tau=tau)
    p = init_params(mod, x, seed=15, table=table)
    vecs, aux = japply(mod, p, x, table, noisy=False)
    p64 = to_np64(p)
    feats = np_stc(x.astype(np.float64), p64["connector"], 1, 1)
    logits = np_generator(feats, p64["generator"], rank)
    alpha = np_softmax(logits / tau)
    np.testing.assert_allclose(np.asarray(vecs), alpha @ table.astype(np.float64), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(aux["vocab_argmax"]), logits.argmax(-1))
    entropy = -(alpha * np.log(alpha)).sum(-1).mean()
    np.testing.assert_allclose(float(aux["vocab_entropy"]), entropy, rtol=1e-4)
    mean = alpha.reshape(-1, vocab).mean(0)
    batch_entropy = -(mean * np.log(mean)).sum()
    np.testing.assert_allclose(float(aux["vocab_perplexity"]), np.exp(batch_entropy), rtol=1e-4)
    np.testing.assert_allclose(float(aux["vocab_information"]), batch_entropy - entropy, rtol=1e-4, atol=1e-6)

    noisy = jit(lambda r: mod.apply({"params": p}, x, table, noisy=True, rngs={"sample": r})[0])
    n1, n2 = noisy(jax.random.key(1)), noisy(jax.random.key(2))
    assert np.abs(np.asarray(n1) - np.asarray(n2)).max() > 1e-3
    assert np.abs(np.asarray(n1) - np.asarray(vecs)).max() > 1e-3


def test_resampler_readout_mode_matches_numpy():
    x = rand((2, 4, 4, 3), seed=16)
    mod = rs.Resampler(width=8, depth=1, pool=2, token_dim=10)
    p = init_params(mod, x, seed=17)
    vecs, aux = japply(mod, p, x)
    assert aux == {} and vecs.shape == (2, 4, 10)
    p64 = to_np64(p)
    want = np_dense(np_stc(x.astype(np.float64), p64["connector"], 1, 2), p64["readout"])
    np.testing.assert_allclose(np.asarray(vecs), want, atol=1e-5, rtol=1e-5)
