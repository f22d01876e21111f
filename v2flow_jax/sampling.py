"""The masked autoregressive rectified-flow sampler: ONE jitted program, `lax.scan` over the AR steps.

Step k of K (REFERENCE section 5): the still-masked count falls from mask_len_{k-1} to mask_len_k
(MAR's cosine schedule); the patches at positions [mask_len_k, mask_len_{k-1}) of each sample's
random order leave the mask. The encoder/decoder runs on the buffer plus the patches known so far,
then an ODE solve turns noise into the leaving patches, guided by classifier-free guidance
(paper Eq. 7: v = v_u + w (v_c - v_u), the unconditional pass replacing the buffer with the dummy
token D).

Fixed shapes: each step's counts are static (they follow from L and K alone), so every shape is
known at trace time. Two loops over the AR steps, one result (same rng, same output up to float
rounding; `ar_loop` picks):
  * "unrolled": a Python loop inside the one jitted program, each step with its exact sizes: the
    encoder sees the buffer plus exactly the patches known so far, the decoder's last block and the
    ODE solve run on exactly the patches leaving the mask (5/14/21/24 rows a sample for L = 64,
    K = 4). At step 0 nothing is known, so the unconditional pass is the same for every sample and
    runs once, on a batch of one. Least work; the program grows with K.
  * "scan": `lax.scan` over the steps, whose body needs one shape for all of them. Every step uses
    the same two static windows over the order: the known patches are the last `max_known` order
    positions (as in training), padding rows masked as keys; the leaving patches are `max_leaving`
    consecutive order positions ending at mask_len_{k-1}, rows outside [mask_len_k, mask_len_{k-1})
    solved too but never written back. The padding costs FLOPs (the ODE always runs on
    `max_leaving` rows a sample) and buys a compiled loop whose size does not grow with K.
  "auto" (default) unrolls up to UNROLL_MAX_STEPS steps and scans beyond.
The noise of step k is one draw of (B * max_leaving, C) from that step's key in both loops (the
unrolled loop keeps the rows of its exact window), which is what makes the two agree.

The sampler takes the model as closures (`Decoder`: features, condition, velocity), never by method
name; `tokenizer_decoder(model, variables)` binds the tokenizer's.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from v2flow_jax import flow
from v2flow_jax.configuration import ConfigSection
from v2flow_jax.models import masking

CFG_SCHEDULES = ("linear", "constant")
DECODES = ("sample", "mean")
AR_LOOPS = ("auto", "unrolled", "scan")
UNROLL_MAX_STEPS = 8   # "auto": beyond this many AR steps the unrolled program's compile time outweighs its saving


@dataclasses.dataclass(frozen=True)
class SamplerConfig(ConfigSection):
    SECTION = "sampler"

    num_ar_steps: int = 4                  # K
    solver: str = "dpm_solver_pp_2m"       # euler | heun | dpm_solver_pp_2m
    solver_steps: int = 20
    time_shift: float = 3.0
    cfg_scale: float = 2.9                 # w; 1.0 skips the unconditional pass entirely
    cfg_schedule: str = "linear"           # Muse-style ramp w_k = 1 + (w - 1)(L - mask_len_k)/L, or constant
    temperature: float = 1.0               # scales the initial noise
    ar_loop: str = "auto"                  # unrolled (exact shapes) | scan (padded windows) | auto
    # sample: solve the ODE from noise (a sample of the patch given the tokens);
    # mean: the model's one-step prediction x_0 = x_1 - v(x_1, t=1) from the same noise x_1, which for
    # a trained model is E[x_0 | tokens, known patches] (v targets eps - x_0, and x_0 is independent
    # of eps): one velocity evaluation per AR step, blurrier, higher PSNR. (x_1 = 0 would make it
    # noise-free but is far from any input seen in training: |eps| ~ sqrt(C).) Same K AR steps.
    decode: str = "sample"

    def validate(self):
        need = self.require
        need(self.num_ar_steps >= 1, "num_ar_steps", "must be >= 1")
        need(self.solver in flow.METHODS, "solver", f"must be one of {flow.METHODS}")
        need(self.solver_steps >= 1, "solver_steps", "must be >= 1")
        need(self.cfg_scale >= 0, "cfg_scale", "must be >= 0 (1.0 = no guidance)")
        need(self.cfg_schedule in CFG_SCHEDULES, "cfg_schedule", f"must be one of {CFG_SCHEDULES}")
        need(self.temperature > 0, "temperature", "must be > 0")
        need(self.ar_loop in AR_LOOPS, "ar_loop", f"must be one of {AR_LOOPS}")
        need(self.decode in DECODES, "decode", f"must be one of {DECODES}")

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0

    @property
    def ode(self) -> tuple[int, str]:
        """(steps, method) of each AR step's solve: the mean decode is one Euler step from t = 1."""
        return (1, "euler") if self.decode == "mean" else (self.solver_steps, self.solver)

    @property
    def unrolled(self) -> bool:
        return self.ar_loop == "unrolled" or (self.ar_loop == "auto" and self.num_ar_steps <= UNROLL_MAX_STEPS)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static schedule of one sampler run (all Python numbers)."""
    mask_before: tuple[int, ...]   # still-masked count entering each step (mask_len_{k-1})
    mask_after: tuple[int, ...]    # after each step (mask_len_k); the last is 0
    guidance: tuple[float, ...]    # w_k per step
    max_known: int
    max_leaving: int

    @property
    def leaving(self) -> tuple[int, ...]:
        return tuple(b - a for b, a in zip(self.mask_before, self.mask_after))


def make_plan(num_patches: int, cfg: SamplerConfig) -> Plan:
    after = masking.cosine_schedule(num_patches, cfg.num_ar_steps)
    before = [num_patches] + after[:-1]
    if cfg.cfg_schedule == "linear":
        guidance = [1.0 + (cfg.cfg_scale - 1.0) * (num_patches - a) / num_patches for a in after]
    else:
        guidance = [cfg.cfg_scale] * len(after)
    return Plan(tuple(before), tuple(after), tuple(guidance),
                max_known=max(1, max(num_patches - b for b in before)),
                max_leaving=max(b - a for b, a in zip(before, after)))


def leaving_window(orders, mask_before, mask_after, max_leaving: int):
    """Order positions [mask_before - max_leaving, mask_before) (clamped at 0) and which of them leave now."""
    start = jnp.maximum(mask_before - max_leaving, 0)
    positions = start + jnp.arange(max_leaving)
    valid = (positions >= mask_after) & (positions < mask_before)
    idx = jnp.take(orders, positions, axis=1)
    return idx, jnp.broadcast_to(valid, idx.shape)


class Decoder(NamedTuple):
    """What the sampler needs from a model, as closures (maskgit's `decode(tokens_to_logits, ...)` shape):
    the sampler never names a model method, so other decoders can share it.

    features(buffer, patches, vis_idx, vis_valid, drop, out_idx) -> z (B, M, D): the encoder/decoder pass
        (out_idx None: all L patches; drop: per-sample dummy buffer, for guidance);
    condition(z (R, D)) -> the velocity MLP's conditioning of those rows (fixed during an ODE solve);
    velocity(x (R, C), t (1,), condition) -> v (R, C).
    """
    features: Callable
    condition: Callable
    velocity: Callable
    num_patches: int
    channels: int


def tokenizer_decoder(model, variables) -> Decoder:
    """The V2Flow tokenizer's decoder pieces with its variables bound."""
    mc = model.config
    return Decoder(
        features=lambda *args: model.apply(variables, *args, method=model.decoder_features),
        condition=lambda z: model.apply(variables, z, method=model.velocity_condition),
        velocity=lambda x, t, cond: model.apply(variables, x, t, cond, method=model.velocity_from_condition),
        num_patches=mc.num_patches, channels=mc.latent_channels)


def sample_latent_patches(model, variables, buffer, rng, cfg: SamplerConfig):
    """buffer (B, n, D_enc) -> latent patches (B, L, C) of the tokenizer `model`. Pure; jit it (cfg static)."""
    return sample_patches(tokenizer_decoder(model, variables), buffer, rng, cfg)


def sample_patches(decoder: Decoder, buffer, rng, cfg: SamplerConfig):
    """buffer (B, n, D_enc) -> latent patches (B, L, C) by masked AR rectified flow. Pure; jit it (cfg static)."""
    L, C = decoder.num_patches, decoder.channels
    decoder_features = decoder.features
    b = buffer.shape[0]
    plan = make_plan(L, cfg)
    order_rng, noise_rng = jax.random.split(rng)
    orders = masking.random_orders(order_rng, b, L)
    rows = jnp.arange(b)[:, None]
    keys = jax.random.split(noise_rng, cfg.num_ar_steps)

    guided = cfg.guided
    drop = jnp.concatenate([jnp.zeros((b,), bool), jnp.ones((b,), bool)]) if guided else jnp.zeros((b,), bool)
    buffers = jnp.concatenate([buffer, buffer]) if guided else buffer
    twice = (lambda x: x if x is None else jnp.concatenate([x, x])) if guided else (lambda x: x)

    def noise(key):
        """Step noise, (B, max_leaving, C): the same draw whichever loop runs."""
        return cfg.temperature * jax.random.normal(key, (b * plan.max_leaving, C), jnp.float32).reshape(b, -1, C)

    def ar_step(patches, vis_idx, vis_valid, out_idx, out_valid, x1, w, first=False):
        """One AR step: encoder/decoder pass, then the guided ODE solve for the rows `out_idx`."""
        if guided and first:
            # Nothing is known yet, so the unconditional pass (dummy buffer, every patch masked) is the
            # same for every sample: run it once, for all L patches, and give each sample its rows.
            z_cond = decoder_features(buffer, patches, vis_idx, vis_valid, drop[:b], out_idx)
            z_all = decoder_features(buffer[:1], patches[:1], vis_idx[:1], None, drop[b:b + 1], None)  # (1, L, D)
            z_out = jnp.concatenate([z_cond, jnp.take(z_all[0], out_idx, axis=0)])
        else:
            z_out = decoder_features(buffers, twice(patches), twice(vis_idx), twice(vis_valid), drop,
                                     twice(out_idx))                                          # (B or 2B, M, D)
        # z is fixed during the ODE solve and t is shared by all rows: embed each once.
        cond_emb = decoder.condition(z_out.reshape(-1, z_out.shape[-1]))

        def velocity(x, t):
            v = decoder.velocity(twice(x), t[:1], cond_emb)
            if not guided:
                return v
            v_cond, v_uncond = jnp.split(v, 2)
            return v_uncond + w * (v_cond - v_uncond)

        x0 = flow.solve(velocity, x1.reshape(-1, C), *cfg.ode, cfg.time_shift).reshape(b, -1, C)
        if out_valid is not None:
            x0 = jnp.where(out_valid[..., None], x0, jnp.take_along_axis(patches, out_idx[..., None], axis=1))
        return patches.at[rows, out_idx].set(x0)

    patches = jnp.zeros((b, L, C), jnp.float32)
    if cfg.unrolled:
        for k, (before, after, w) in enumerate(zip(plan.mask_before, plan.mask_after, plan.guidance)):
            if before == after:                                  # K > L: a step with nothing to sample
                continue
            start = max(before - plan.max_leaving, 0)            # the scan's window, for the same noise rows
            x1 = noise(keys[k])[:, after - start:before - start]
            patches = ar_step(patches, orders[:, before:], None, orders[:, after:before], None, x1, w,
                              first=before == L)
        return patches

    def scan_step(patches, xs):
        mask_before, mask_after, w, key = xs
        vis_idx, vis_valid = masking.visible_window(orders, mask_before, plan.max_known)
        out_idx, out_valid = leaving_window(orders, mask_before, mask_after, plan.max_leaving)
        return ar_step(patches, vis_idx, vis_valid, out_idx, out_valid, noise(key), w), None

    xs = (jnp.asarray(plan.mask_before, jnp.int32), jnp.asarray(plan.mask_after, jnp.int32),
          jnp.asarray(plan.guidance, jnp.float32), keys)
    patches, _ = jax.lax.scan(scan_step, patches, xs)
    return patches


def patches_to_latents(patches, latent_size: int):
    b, _, c = patches.shape
    return patches.reshape(b, latent_size, latent_size, c)


def decode_codes(model, variables, codes, rng, cfg: SamplerConfig):
    """Quantised token vectors (B, n, d) -> latents (B, h, w, C) (scaled latent space)."""
    buffer = model.apply(variables, codes, method=model.buffer_from_codes)
    return patches_to_latents(sample_latent_patches(model, variables, buffer, rng, cfg), model.config.latent_size)


def decode_indices(model, variables, indices, rng, cfg: SamplerConfig):
    """Token ids (B, n) -> latents (B, h, w, C); the path the LLM stage uses."""
    buffer = model.apply(variables, indices, method=model.buffer_from_indices)
    return patches_to_latents(sample_latent_patches(model, variables, buffer, rng, cfg), model.config.latent_size)


def reconstruct_latents(model, variables, latents, rng, cfg: SamplerConfig, *, noisy_encode: bool | None = None):
    """Latents -> tokens -> latents. Returns (reconstruction, indices)."""
    enc_rng, dec_rng = jax.random.split(rng)
    enc = model.apply(variables, latents, noisy=noisy_encode, method=model.encode, rngs={"sample": enc_rng})
    return decode_codes(model, variables, enc["codes"], dec_rng, cfg), enc["indices"]


def model_evaluations(num_patches: int, cfg: SamplerConfig) -> dict[str, int]:
    """Network passes of one reconstruction: encoder/decoder passes and velocity-MLP evaluations."""
    passes = 2 if cfg.guided else 1
    return {"mar_passes": cfg.num_ar_steps * passes,
            "velocity_nfe": cfg.num_ar_steps * flow.nfe(cfg.ode[1], cfg.ode[0]) * passes}
