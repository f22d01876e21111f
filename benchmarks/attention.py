"""The attention core of `models/layers.Attention` against `jax.nn.dot_product_attention`, on CPU.

Times softmax(q k^T / sqrt(d) + key mask) v alone (forward, and forward + gradient) at the shapes the
sampler and the train step run: the demo's tiny MAR (64 wide, 2 heads, 64 tokens + 64 patches) and the
release-size comparison of benchmarks/sampler.py (256 wide, 4 heads, n = L = 64, batch 4 doubled by
guidance). Prints a markdown table with both medians, their ratio and the largest output difference:

    python benchmarks/attention.py [--repeats 50]

Ours keeps heads-major (b, h, seq, d) operands and an additive key mask; dot_product_attention takes
(b, seq, h, d) and a boolean mask (implementation 'xla', the only one on CPU).
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from v2flow_jax import host_memory
from v2flow_jax.models.layers import MASKED_LOGIT

host_memory.apply_default()   # as main does: before the first computation

SHAPES = {   # name: (batch, seq, heads, head_dim)
    "demo tiny (train, batch 8)": (8, 128, 2, 32),
    "release sampler (4 images x cfg 2)": (8, 128, 4, 64),
    "release train (batch 32)": (32, 128, 4, 64),
}


def ours(q, k, v, valid):
    """The core as models/layers.Attention computes it (q already scaled), from (b, seq, h, d) inputs."""
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits + jnp.where(valid, 0.0, MASKED_LOGIT)[:, None, None, :]
    out = jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(logits, axis=-1), v, preferred_element_type=jnp.float32)
    return out.transpose(0, 2, 1, 3)


def library(q, k, v, valid):
    return jax.nn.dot_product_attention(q, k, v, mask=valid[:, None, None, :], scale=1.0)


def _median_seconds(fn, args, repeats):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args()
    print(f"JAX {jax.__version__}, {jax.devices()[0].device_kind}; median of {args.repeats} calls\n")
    print("| shape (b, seq, h, d) | pass | ours ms | dot_product_attention ms | library / ours | max |diff| |")
    print("|---|---|---:|---:|---:|---:|")
    for name, (b, s, h, d) in SHAPES.items():
        rng = np.random.default_rng(0)
        q, k, v = (jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.float32) for _ in range(3))
        q = q / np.sqrt(d)
        valid = jnp.asarray(rng.random((b, s)) < 0.8).at[:, 0].set(True)
        for label, make in (("forward", lambda f: f),
                            ("forward + grad", lambda f: jax.grad(lambda q, k, v, m: jnp.sum(f(q, k, v, m) ** 2),
                                                                  argnums=(0, 1, 2)))):
            fa, fb = jax.jit(make(ours)), jax.jit(make(library))
            diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(fa(q, k, v, valid)),
                                                                       jax.tree.leaves(fb(q, k, v, valid))))
            ta = _median_seconds(fa, (q, k, v, valid), args.repeats)
            tb = _median_seconds(fb, (q, k, v, valid), args.repeats)
            print(f"| {name} {(b, s, h, d)} | {label} | {1e3 * ta:.3f} | {1e3 * tb:.3f} | {tb / ta:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
