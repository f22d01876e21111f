"""Cosine-similarity EMA codebook with the rotation-trick gradient (REFERENCE.md section 3).

The codebook and its EMA statistics live in the mutable 'vq' collection, not in 'params': they are
updated by the EMA rule, never by the optimizer. All sums run over the whole (global) batch; under
jit with a batch-sharded input XLA inserts the cross-replica reduction, so the statistics are
summed over every data-parallel shard without any explicit psum.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from v2flow_jax.models.layers import named

NORM_EPS = 1e-6


def l2_normalize(x, eps=NORM_EPS):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def kaiming_uniform_unit_codes(rng, shape, dtype=jnp.float32):
    """Kaiming-uniform noise (bound sqrt(6 / dim)), each code then put on the unit sphere."""
    bound = jnp.sqrt(6.0 / shape[-1])
    return l2_normalize(jax.random.uniform(rng, shape, dtype, -bound, bound))


def rotate_to(x, q):
    """Rotation trick (arXiv 2410.06424): returns q in the forward pass; the gradient reaching x is
    the one at q carried back by the (constant) rotation-and-rescale that maps x onto q."""
    u = jax.lax.stop_gradient(l2_normalize(x))
    q_hat = jax.lax.stop_gradient(l2_normalize(q))
    w = jax.lax.stop_gradient(l2_normalize(u + q_hat))
    scale = jax.lax.stop_gradient(jnp.linalg.norm(q, axis=-1, keepdims=True)
                                  / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), NORM_EPS))
    dot = lambda a, b: jnp.sum(a * b, axis=-1, keepdims=True)
    return scale * (x - 2.0 * dot(x, w) * w + 2.0 * dot(x, u) * q_hat)


def ema_update(codebook_state, unit_inputs, indices, decay, eps):
    """One EMA step of (cluster_size, embed_sum) and the new unit codebook (vector-quantize style).

    Per-code sums by segment_sum: O(N d) instead of the one-hot matmul's O(N K d).
    """
    k = codebook_state["cluster_size"].shape[0]
    counts = jax.ops.segment_sum(jnp.ones_like(indices, jnp.float32), indices, num_segments=k)
    sums = jax.ops.segment_sum(unit_inputs, indices, num_segments=k)
    cluster_size = decay * codebook_state["cluster_size"] + (1 - decay) * counts
    embed_sum = decay * codebook_state["embed_sum"] + (1 - decay) * sums
    total = cluster_size.sum()
    smoothed = (cluster_size + eps) / (total + cluster_size.shape[0] * eps) * total  # Laplace smoothing
    codebook = l2_normalize(embed_sum / smoothed[:, None])
    return {"codebook": codebook, "cluster_size": cluster_size, "embed_sum": embed_sum}


def restart_dead_codes(rng, state, unit_inputs, threshold, noise):
    """Codes whose EMA cluster size fell below `threshold` are moved onto live inputs of the batch.

    Three choices keep a restart from undoing itself:
      * inputs are drawn without replacement (a random permutation, wrapped when the batch has fewer
        rows than the codebook has codes), so restarted codes start apart;
      * each fresh code is its input plus gaussian noise of norm ~`noise` on the unit sphere, so even
        identical inputs (a collapsed encoder) give distinct codes that can pull the encoder apart;
      * a restarted code gets the codebook's mean cluster size, not the threshold: with the EMA decay
        the threshold alone is lost after one step without hits, and the same codes restarted at every
        step (232 of 256 in the demo before this rule).
    """
    dead = state["cluster_size"] < threshold
    k, d = state["codebook"].shape
    perm_rng, noise_rng = jax.random.split(rng)
    n = unit_inputs.shape[0]
    picks = jax.random.permutation(perm_rng, n)[jnp.arange(k) % n]
    jitter = noise / jnp.sqrt(d) * jax.random.normal(noise_rng, (k, d), jnp.float32)
    fresh = l2_normalize(unit_inputs[picks] + jitter)
    grace = jnp.maximum(jnp.mean(state["cluster_size"]), threshold)
    return {
        "codebook": jnp.where(dead[:, None], fresh, state["codebook"]),
        "embed_sum": jnp.where(dead[:, None], fresh * grace, state["embed_sum"]),
        "cluster_size": jnp.where(dead, grace, state["cluster_size"]),
    }, dead.sum()


def usage_stats(indices, codebook_size: int):
    """Fraction of codes hit by this batch and the perplexity of their empirical distribution."""
    counts = jax.ops.segment_sum(jnp.ones_like(indices, jnp.float32), indices, num_segments=codebook_size)
    probs = counts / indices.size
    perplexity = jnp.exp(-jnp.sum(probs * jnp.log(probs + 1e-10)))
    return {"codebook_usage": jnp.mean(probs > 0), "codebook_perplexity": perplexity}


def soft_assignment_information(sim, temperature: float):
    """Mutual information between an input and its code under the soft assignment softmax(sim / T).

    H(mean_i q_i) - mean_i H(q_i) over all inputs of the (global) batch: 0 when every input sits
    equally near the same codes (the collapse), log(min(#inputs, K)) when each input is near one code
    and the codes are used evenly. Unlike usage counts of the argmax it has a gradient, so a loss term
    -w * information pushes the encoder's outputs apart onto distinct codes (the entropy penalty of
    MAGVIT-v2 / LFQ, on cosine similarities here).
    """
    q = jax.nn.softmax(sim.reshape(-1, sim.shape[-1]) / temperature, axis=-1)
    token = -jnp.mean(jnp.sum(q * jnp.log(q + 1e-12), axis=-1))
    mean = jnp.mean(q, axis=0)
    return -jnp.sum(mean * jnp.log(mean + 1e-12)) - token


class CosineQuantizer(nn.Module):
    """K codes in R^d. `__call__(x, update=...)` returns (quantized, indices, aux).

    The EMA update runs only when `update=True` and the 'vq' collection is mutable (training).
    """
    codebook_size: int
    dim: int
    decay: float = 0.8
    eps: float = 1e-5
    dead_code_threshold: float = 0.0   # 0 = no restart (the release)
    restart_noise: float = 0.1          # norm of the jitter added to a restarted code (unit-sphere units)
    info_temperature: float = 0.0       # > 0: aux['code_information'] from softmax(similarity / this)

    def setup(self):
        init = named(kaiming_uniform_unit_codes, ("codes", "llm_embed"))
        self.codebook = self.variable("vq", "codebook", lambda: init(self.make_rng("params"),
                                                                     (self.codebook_size, self.dim)))
        unboxed = nn.unbox(self.codebook.value)
        self.embed_sum = self.variable("vq", "embed_sum", lambda: nn.LogicallyPartitioned(
            unboxed, names=("codes", "llm_embed")))
        self.cluster_size = self.variable("vq", "cluster_size", lambda: nn.LogicallyPartitioned(
            jnp.zeros((self.codebook_size,), jnp.float32), names=("codes",)))

    def _codes(self):
        return nn.unbox(self.codebook.value)

    def lookup(self, indices):
        """Token ids (any shape) -> unit code vectors (..., d)."""
        return jnp.take(self._codes(), indices, axis=0)

    def similarities(self, x):
        """(cosine similarity to every code (..., K), the normalised inputs)."""
        unit = l2_normalize(x.astype(jnp.float32))
        return jnp.einsum("...d,kd->...k", unit, self._codes()), unit

    def nearest(self, x):
        """Indices of the most cosine-similar codes, and the normalised inputs."""
        sim, unit = self.similarities(x)
        return jnp.argmax(sim, axis=-1), unit

    def __call__(self, x, *, update: bool = False):
        x = x.astype(jnp.float32)
        sim, unit = self.similarities(x)
        indices = jnp.argmax(sim, axis=-1)
        codes = self.lookup(indices)
        commit = jnp.mean((jax.lax.stop_gradient(codes) - unit) ** 2)
        quantized = rotate_to(x, codes)
        flat_unit = unit.reshape(-1, self.dim)
        flat_idx = indices.reshape(-1)
        aux = {"commit_loss": commit, **usage_stats(flat_idx, self.codebook_size)}
        if self.info_temperature > 0:
            aux["code_information"] = soft_assignment_information(sim, self.info_temperature)
        if update and self.is_mutable_collection("vq"):
            state = {"codebook": self._codes(), "cluster_size": nn.unbox(self.cluster_size.value),
                     "embed_sum": nn.unbox(self.embed_sum.value)}
            state = ema_update(state, jax.lax.stop_gradient(flat_unit), flat_idx, self.decay, self.eps)
            if self.dead_code_threshold > 0:
                state, n_dead = restart_dead_codes(self.make_rng("sample"), state,
                                                   jax.lax.stop_gradient(flat_unit), self.dead_code_threshold,
                                                   self.restart_noise)
                aux["restarted_codes"] = n_dead
            for name, var in (("codebook", self.codebook), ("cluster_size", self.cluster_size),
                              ("embed_sum", self.embed_sum)):
                boxed = isinstance(var.value, nn.meta.AxisMetadata)
                var.value = var.value.replace_boxed(state[name]) if boxed else state[name]
        return quantized, indices, aux
