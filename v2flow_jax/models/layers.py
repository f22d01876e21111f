"""Small building blocks shared by the modules: named dense/conv layers, attention, init helpers."""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from v2flow_jax.models.dropout import Dropout

Dtype = Any

xavier_uniform = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros
ones = nn.initializers.ones
MASKED_LOGIT = -1e30   # added to masked keys' logits: exp underflows to exactly 0 in float32


def accumulating_dot(dtype):
    """Low-precision matmul inputs with float32 accumulation and output (None for float32 layers).

    bf16 x bf16 -> f32 is the fast path on TPUs, GPUs and AVX512-BF16 CPUs (4x the f32 rate on the
    development machine) and keeps every activation outside the matmul in float32.
    """
    if jnp.dtype(dtype) == jnp.float32:
        return None
    return functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32)


def accumulating_conv(dtype):
    if jnp.dtype(dtype) == jnp.float32:
        return None
    return functools.partial(jax.lax.conv_general_dilated, preferred_element_type=jnp.float32)


def named(init, names: Sequence[str | None]):
    """An initializer whose parameter carries logical axis names (sharded by the mesh rules)."""
    return nn.with_logical_partitioning(init, tuple(names))


def dense(features: int, names: tuple[str | None, str | None], *, dtype=jnp.float32, use_bias=True,
          kernel_init=xavier_uniform, bias_init=zeros, name=None) -> nn.Dense:
    """nn.Dense with logical names on kernel (in, out) and bias (out)."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=named(kernel_init, names), bias_init=named(bias_init, names[1:]),
                    dot_general=accumulating_dot(dtype), name=name)


def layer_norm(eps: float, *, dtype=jnp.float32, axis_name="embed", affine=True, name=None) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, use_bias=affine, use_scale=affine,
                        scale_init=named(ones, (axis_name,)), bias_init=named(zeros, (axis_name,)), name=name)


def gelu(x):
    return nn.gelu(x, approximate=False)  # torch's nn.GELU default: exact erf


def select_rows(x, rows):
    """x[:, rows]: `rows` a static slice, or (B, M) int indices (one set per sample)."""
    if rows is None:
        return x
    if isinstance(rows, slice):
        return x[:, rows]
    return jnp.take_along_axis(x, rows.reshape(rows.shape + (1,) * (x.ndim - 2)), axis=1)


class Attention(nn.Module):
    """Multi-head self-attention with qkv bias; `valid` masks out padded keys.

    `query_rows` (see `select_rows`) restricts the output to those rows: every row is still a key and
    value, but queries, the output projection and everything after run on the selected rows only.
    """
    num_heads: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, valid=None, *, query_rows=None, train: bool = False):
        b, s, d = x.shape
        head_dim = d // self.num_heads
        qkv = dense(3 * d, ("embed", "mlp"), dtype=self.dtype, name="qkv")(x)
        qkv = qkv.reshape(b, s, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = select_rows(q, query_rows) * (1.0 / math.sqrt(head_dim))   # scale q: M*d multiplies, not M*s
        # Heads-major (b, h, seq, d) operands and an additive key mask: on XLA:CPU the attention core runs
        # ~1.8x faster (1.3x with its gradient) than (b, seq, h, d) einsums with a `where` on the logits.
        q, k, v = (a.astype(self.dtype).transpose(0, 2, 1, 3) for a in (q, k, v))
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
        if valid is not None:
            logits = logits + jnp.where(valid, 0.0, MASKED_LOGIT)[:, None, None, :]
        weights = jax.nn.softmax(logits, axis=-1)
        weights = Dropout(self.dropout)(weights, deterministic=not train)
        out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(self.dtype), v, preferred_element_type=jnp.float32)
        out = out.transpose(0, 2, 1, 3).reshape(b, q.shape[2], d)
        out = dense(d, ("mlp", "embed"), dtype=self.dtype, name="proj")(out)
        out = nn.with_logical_constraint(out, ("batch", "seq", "embed"))
        return Dropout(self.dropout)(out, deterministic=not train)


class TransformerBlock(nn.Module):
    """Pre-LN ViT block (MAR / timm style): attention and a GELU MLP of ratio 4, both with dropout.

    With `query_rows` the block returns only those rows (all rows still serve as keys and values):
    the last block of a stack whose other outputs are thrown away need not compute them.
    """
    num_heads: int
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, valid=None, *, query_rows=None, train: bool = False):
        d = x.shape[-1]
        h = layer_norm(self.eps, dtype=self.dtype, name="norm1")(x)
        attn = Attention(self.num_heads, self.dropout, self.dtype, name="attn")
        # Pin the selected rows' layout: left to propagation, jax 0.10.2 partitioned the output projection
        # of a query subset wrongly on a data x fsdp x tensor mesh (wrong rows on 2 of 4 batch shards).
        x = nn.with_logical_constraint(select_rows(x, query_rows), ("batch", "seq", "embed"))
        x = x + attn(h, valid, query_rows=query_rows, train=train)
        h = layer_norm(self.eps, dtype=self.dtype, name="norm2")(x)
        h = gelu(dense(int(d * self.mlp_ratio), ("embed", "mlp"), dtype=self.dtype, name="fc1")(h))
        h = Dropout(self.dropout)(h, deterministic=not train)
        h = dense(d, ("mlp", "embed"), dtype=self.dtype, name="fc2")(h)
        h = Dropout(self.dropout)(h, deterministic=not train)
        x = x + h
        return nn.with_logical_constraint(x, ("batch", "seq", "embed"))
