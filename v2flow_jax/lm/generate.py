"""Prompt -> exactly n visual tokens, in one jitted decode loop over the KV cache.

The response of an extended LLM is `<boi> v_1 ... v_n <eoi>`: the markers are forced, and each v_i is
drawn from the logits of the visual rows only (sliced out, so nothing else can come out), with
classifier-free guidance against the empty prompt on logits, `uncond + w (cond - uncond)`, then
temperature, top-k and top-p. Shapes are fixed (prompt width, n, top_k static), so one compile serves
every call of a shape; prompts of different lengths share a batch right-padded (`llama.prefill`).
The loop is `lax.scan` over the n - 1 decode steps between the first and the last draw: the last
token is never fed back, since nothing after it is sampled.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from v2flow_jax.lm import llama
from v2flow_jax.lm.visual_vocab import VisualVocab


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How each visual token is drawn. greedy ignores temperature, top_k and top_p."""
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0           # 0: off; else keep the k most likely codes (static: it sets a shape)
    top_p: float = 1.0       # nucleus: keep the fewest codes whose probability reaches top_p
    cfg_scale: float = 1.0   # w; guidance runs only when an unconditional prompt is given

    def __post_init__(self):
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 (or greedy=True).")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 turns it off).")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1].")


def guide(cond, uncond, scale):
    """Classifier-free guidance on logits."""
    return uncond + scale * (cond - uncond)


def filter_logits(logits, top_k: int, top_p):
    """-inf outside the top-k and outside the nucleus of mass top_p (the most likely code always stays)."""
    neg = jnp.finfo(logits.dtype).min
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The smallest logit still inside the nucleus; everything below it goes.
    inside = mass_before < top_p
    threshold = jnp.min(jnp.where(inside, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, neg, logits)


def draw(logits, key, sampling: Sampling):
    """(B, N_v) float logits -> (B,) int32 codes."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _visual_logits(logits, vocab: VisualVocab, batch: int, guided: bool, cfg_scale):
    visual = logits[:, vocab.first_visual:vocab.boi].astype(jnp.float32)
    if guided:
        return guide(visual[:batch], visual[batch:], cfg_scale)
    return visual


@functools.partial(jax.jit, static_argnames=("model", "vocab", "num_tokens", "sampling"))
def generate_codes(model: llama.Llama, params, prompts, lengths, rng, *, vocab: VisualVocab, num_tokens: int,
                   sampling: Sampling, uncond_prompts=None, uncond_lengths=None, cfg_scale=None):
    """prompts (B, T) int32 right-padded, lengths (B,) -> codes (B, num_tokens) int32 in [0, N_v).

    Each prompt must end where the response begins (the chat template's assistant header). With
    `uncond_prompts` (B, T) (the empty caption in the same template, padded to the same width) the
    logits are guided with `cfg_scale` (a traced value: changing it does not recompile; default
    sampling.cfg_scale). Token i is drawn with key fold_in(rng, i), so a seed gives the same tokens.
    """
    batch, width = prompts.shape
    guided = uncond_prompts is not None
    scale = sampling.cfg_scale if cfg_scale is None else cfg_scale
    if guided:
        prompts = jnp.concatenate([prompts, uncond_prompts])
        lengths = jnp.concatenate([lengths, uncond_lengths])
    lengths = lengths.astype(jnp.int32)
    rows = prompts.shape[0]
    cache = llama.init_cache(model.config, rows, width + num_tokens)
    _, cache = llama.prefill(model, params, cache, prompts, lengths)
    boi = jnp.full((rows,), vocab.boi, jnp.int32)
    logits, cache = llama.decode_step(model, params, cache, boi, lengths)

    def sample(logits, i):
        return draw(_visual_logits(logits, vocab, batch, guided, scale), jax.random.fold_in(rng, i), sampling)

    def step(carry, i):
        cache, logits = carry
        code = sample(logits, i)
        token = vocab.to_ids(jnp.concatenate([code, code]) if guided else code)
        logits, cache = llama.decode_step(model, params, cache, token, lengths + 1 + i)
        return (cache, logits), code

    (_, logits), codes = jax.lax.scan(step, (cache, logits), jnp.arange(num_tokens - 1))
    last = sample(logits, num_tokens - 1)
    return jnp.concatenate([codes.T, last[:, None]], axis=1)


def response_ids(codes, vocab: VisualVocab):
    """codes (B, n) -> the full response (B, n + 2): <boi>, the visual ids, <eoi>."""
    b = codes.shape[0]
    return jnp.concatenate([jnp.full((b, 1), vocab.boi, jnp.int32), vocab.to_ids(codes).astype(jnp.int32),
                            jnp.full((b, 1), vocab.eoi, jnp.int32)], axis=1)
