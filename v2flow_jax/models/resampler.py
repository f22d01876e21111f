"""Visual vocabulary resampler: latent grid -> n token rows -> (optionally) logits over an LLM vocabulary.

Architecture (REFERENCE.md section 3): an STC connector in the style of VideoLLaMA2, i.e.
RegStage -> average pool (factor 1 = identity, as released) + SiLU -> RegStage -> raster flatten,
followed either by a linear readout (vocabulary off) or by the generator G whose output is a
categorical distribution over the frozen LLM vocabulary (vocabulary on).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from v2flow_jax.models.layers import accumulating_conv, dense, gelu, named, zeros

Dtype = Any
LN_EPS = 1e-5
# torch's Conv2d default init is kaiming-uniform with a=sqrt(5), i.e. variance 1/(3 fan_in).
conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


# The resampler's convolutions are small (5 M parameters at the release size): replicate them rather
# than split channels that the batch-sharded activations do not split.
def _conv(features, kernel, *, use_bias=False, dtype=jnp.float32, name=None):
    return nn.Conv(features, (kernel, kernel), padding="SAME", use_bias=use_bias,
                   dtype=dtype, param_dtype=jnp.float32,
                   kernel_init=named(conv_init, (None, None, None, None)),
                   conv_general_dilated=accumulating_conv(dtype),
                   bias_init=named(zeros, (None,)), name=name)


class DepthwiseConv3x3(nn.Module):
    """3x3 depthwise conv (no bias, 'SAME'), kernel (3, 3, 1, C) as nn.Conv would hold it.

    Written as nine shifted multiply-adds: XLA's grouped convolution is ~10x slower on CPU, and
    its kernel gradient comes out scaled by the unsplit mesh axes under some shardings (seen with
    the batch over data x fsdp and tensor = 2 in jax 0.10.2).
    """
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        kernel = self.param("kernel", named(conv_init, (None, None, None, None)), (3, 3, 1, c), jnp.float32)
        h, w = x.shape[1:3]
        xp = jnp.pad(x.astype(self.dtype), ((0, 0), (1, 1), (1, 1), (0, 0)))
        k = kernel.astype(self.dtype)
        out = sum(xp[:, i:i + h, j:j + w, :].astype(jnp.float32) * k[i, j, 0].astype(jnp.float32)
                  for i in range(3) for j in range(3))
        return out


def _ln2d(dtype, name):
    # LayerNorm2d normalises over channels at every position: in NHWC that is a plain last-axis LN.
    return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, param_dtype=jnp.float32,
                        scale_init=named(nn.initializers.ones, ("channels",)),
                        bias_init=named(zeros, ("channels",)), name=name)


class SqueezeExcite(nn.Module):
    reduced: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = nn.silu(_conv(self.reduced, 1, use_bias=True, dtype=self.dtype, name="fc1")(s))
        s = _conv(x.shape[-1], 1, use_bias=True, dtype=self.dtype, name="fc2")(s)
        return x * jax.nn.sigmoid(s)


class RegBottleneck(nn.Module):
    """RegNet bottleneck, stride 1, bottleneck ratio 1, depthwise 3x3, SE at 0.25 of the input width."""
    features: int
    se_ratio: float = 0.25
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        in_features = x.shape[-1]
        y = nn.silu(_ln2d(self.dtype, "norm1")(_conv(self.features, 1, dtype=self.dtype, name="conv1")(x)))
        y = DepthwiseConv3x3(self.dtype, name="conv2")(y)
        y = nn.silu(_ln2d(self.dtype, "norm2")(y))
        y = SqueezeExcite(int(round(in_features * self.se_ratio)), self.dtype, name="se")(y)
        y = _ln2d(self.dtype, "norm3")(_conv(self.features, 1, dtype=self.dtype, name="conv3")(y))
        if in_features != self.features:
            x = _ln2d(self.dtype, "shortcut_norm")(_conv(self.features, 1, dtype=self.dtype, name="shortcut")(x))
        return nn.silu(y + x)


class RegStage(nn.Module):
    depth: int
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.depth):
            x = RegBottleneck(self.features, dtype=self.dtype, name=f"block{i}")(x)
        return x


class STCConnector(nn.Module):
    """(B, h, w, C) latents -> (B, (h/pool)*(w/pool), width) token features, raster order."""
    width: int = 512
    depth: int = 4
    pool: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, latents):
        x = RegStage(self.depth, self.width, self.dtype, name="stage1")(latents)
        if self.pool > 1:
            x = nn.avg_pool(x, (self.pool, self.pool), strides=(self.pool, self.pool))
        x = nn.silu(x)
        x = RegStage(self.depth, self.width, self.dtype, name="stage2")(x)
        b, h, w, c = x.shape
        return x.reshape(b, h * w, c)


class Generator(nn.Module):
    """G: token features -> logits over the LLM vocabulary.

    rank = 0 is the release's Linear(d -> N), GELU, Linear(N -> N) (N^2 weights: 1 B for LLaMA-2);
    rank > 0 factors the second layer through a rank-r bottleneck, which makes small configs practical.
    """
    vocab_size: int
    rank: int = 0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = gelu(dense(self.vocab_size, ("embed", "vocab"), dtype=self.dtype, name="fc1")(x))
        if self.rank:
            h = dense(self.rank, ("vocab", None), dtype=self.dtype, use_bias=False, name="fc2_down")(h)
            return dense(self.vocab_size, (None, "vocab"), dtype=self.dtype, name="fc2_up")(h)
        # Rows on fsdp, columns on tensor: the N x N matrix (1 B weights for LLaMA-2) is split over both;
        # ('mlp', 'vocab') put both on tensor, which left it whole on every chip of an fsdp-only mesh.
        return dense(self.vocab_size, ("embed", "vocab"), dtype=self.dtype, name="fc2")(h)


def gumbel_softmax(rng, logits, tau: float, noisy: bool):
    """Soft Gumbel-softmax; `noisy=False` is the deterministic encode (plain tempered softmax)."""
    logits = logits.astype(jnp.float32)
    if noisy:
        logits = logits + jax.random.gumbel(rng, logits.shape, jnp.float32)
    return jax.nn.softmax(logits / tau, axis=-1)


def entropy(p, axis=-1):
    return -jnp.sum(p * jnp.log(p + 1e-12), axis=axis)


def vocabulary_statistics(logits, tau: float):
    """How much the vocabulary choice says about the input, from the noise-free p = softmax(logits/tau).

    token entropy     mean_i H(p_i): near 0 when every token commits to a few rows;
    batch entropy     H(mean_i p_i) over all tokens of the (global) batch; exp of it is the vocabulary
                      perplexity, the effective number of rows in use;
    information       batch - token entropy: the mutual information between a token and the row it
                      picks. 0 both for the uniform softmax of a fresh generator (Gumbel noise alone picks
                      the row) and for one row winning everywhere (the collapse); log(#tokens) at most.

    The per-image means (`vocab_image_probs` (B, N_l), `vocab_image_entropy` (B,)) let an evaluation
    pool these over many batches; a training step never reads them, so XLA drops them there.
    """
    p = jax.nn.softmax(logits.astype(jnp.float32) / tau, axis=-1)
    per_token = entropy(p)
    token = jnp.mean(per_token)
    batch = entropy(jnp.mean(p.reshape(-1, p.shape[-1]), axis=0))
    return {"vocab_entropy": token, "vocab_perplexity": jnp.exp(batch), "vocab_information": batch - token,
            "vocab_image_probs": jnp.mean(p, axis=1), "vocab_image_entropy": jnp.mean(per_token, axis=1)}


class Resampler(nn.Module):
    """Latents -> token vectors: alpha @ L in the LLM space (vocabulary on) or a linear readout (off).

    Call with `table` (the frozen (N_l, d_l) vocabulary) in vocabulary mode; `noisy` selects
    Gumbel noise (training, or the release's noisy encode) and draws from the 'sample' rng stream.
    """
    width: int = 512
    depth: int = 4
    pool: int = 1
    token_dim: int = 1024            # readout width when the vocabulary is off
    vocab_size: int = 0              # 0 = vocabulary off
    generator_rank: int = 0
    tau: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, latents, table=None, *, noisy: bool = False):
        feats = STCConnector(self.width, self.depth, self.pool, self.dtype, name="connector")(latents)
        if not self.vocab_size:
            return dense(self.token_dim, ("embed", "mlp"), dtype=self.dtype, name="readout")(feats), {}
        logits = Generator(self.vocab_size, self.generator_rank, self.dtype, name="generator")(feats)
        logits = nn.with_logical_constraint(logits, ("batch", "seq", "vocab"))
        rng = self.make_rng("sample") if noisy else None
        alpha = gumbel_softmax(rng, logits, self.tau, noisy)
        vectors = jnp.einsum("bnv,vd->bnd", alpha.astype(self.dtype), table.astype(self.dtype),
                             preferred_element_type=jnp.float32)
        return vectors, {**vocabulary_statistics(logits, self.tau), "vocab_argmax": jnp.argmax(logits, axis=-1)}
