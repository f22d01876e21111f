"""The masked autoregressive rectified-flow sampler: ONE jitted program, `lax.scan` over the AR steps.

Step k of K (REFERENCE section 5): the still-masked count falls from mask_len_{k-1} to mask_len_k
(MAR's cosine schedule); the patches at positions [mask_len_k, mask_len_{k-1}) of each sample's
random order leave the mask. The encoder/decoder runs on the buffer plus the patches known so far,
then an ODE solve turns noise into the leaving patches, guided by classifier-free guidance
(paper Eq. 7: v = v_u + w (v_c - v_u), the unconditional pass replacing the buffer with the dummy
token D).

Fixed shapes: each step's counts are static but differ between steps, and a scan body needs one
shape. So every step uses the same two static windows over the order:
  * known patches: the last `max_known` order positions (as in training), padding rows masked;
  * leaving patches: `max_leaving` consecutive order positions ending at mask_len_{k-1}; rows
    outside [mask_len_k, mask_len_{k-1}) are solved too but never written back.
The padding costs some FLOPs (the ODE solve always runs on `max_leaving` rows a sample) and buys a
single compiled loop whose size does not grow with K.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from v2flow_jax import flow
from v2flow_jax.configuration import ConfigSection
from v2flow_jax.models import masking

CFG_SCHEDULES = ("linear", "constant")


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

    def validate(self):
        need = self.require
        need(self.num_ar_steps >= 1, "num_ar_steps", "must be >= 1")
        need(self.solver in flow.METHODS, "solver", f"must be one of {flow.METHODS}")
        need(self.solver_steps >= 1, "solver_steps", "must be >= 1")
        need(self.cfg_scale >= 0, "cfg_scale", "must be >= 0 (1.0 = no guidance)")
        need(self.cfg_schedule in CFG_SCHEDULES, "cfg_schedule", f"must be one of {CFG_SCHEDULES}")
        need(self.temperature > 0, "temperature", "must be > 0")

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0


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


def sample_latent_patches(model, variables, buffer, rng, cfg: SamplerConfig):
    """buffer (B, n, D_enc) -> latent patches (B, L, C). Pure; jit it (cfg static)."""
    mc = model.config
    L, C = mc.num_patches, mc.latent_channels
    b = buffer.shape[0]
    plan = make_plan(L, cfg)
    order_rng, noise_rng = jax.random.split(rng)
    orders = masking.random_orders(order_rng, b, L)
    rows = jnp.arange(b)[:, None]

    guided = cfg.guided
    drop = jnp.concatenate([jnp.zeros((b,), bool), jnp.ones((b,), bool)]) if guided else jnp.zeros((b,), bool)
    buffers = jnp.concatenate([buffer, buffer]) if guided else buffer
    twice = (lambda x: jnp.concatenate([x, x])) if guided else (lambda x: x)

    def ar_step(patches, xs):
        mask_before, mask_after, w, key = xs
        vis_idx, vis_valid = masking.visible_window(orders, mask_before, plan.max_known)
        z = model.apply(variables, buffers, twice(patches), twice(vis_idx), twice(vis_valid), drop,
                        method=model.decoder_features)
        out_idx, out_valid = leaving_window(orders, mask_before, mask_after, plan.max_leaving)
        z_out = jnp.take_along_axis(z, twice(out_idx)[..., None], axis=1)          # (B or 2B, M, D)
        # z is fixed during the ODE solve and t is shared by all rows: embed each once.
        cond_emb = model.apply(variables, z_out.reshape(-1, z_out.shape[-1]), method=model.velocity_condition)

        def velocity(x, t):
            v = model.apply(variables, twice(x), t[:1], cond_emb, method=model.velocity_from_condition)
            if not guided:
                return v
            v_cond, v_uncond = jnp.split(v, 2)
            return v_uncond + w * (v_cond - v_uncond)

        x1 = cfg.temperature * jax.random.normal(key, (b * plan.max_leaving, C), jnp.float32)
        x0 = flow.solve(velocity, x1, cfg.solver_steps, cfg.solver, cfg.time_shift).reshape(b, -1, C)
        current = jnp.take_along_axis(patches, out_idx[..., None], axis=1)
        patches = patches.at[rows, out_idx].set(jnp.where(out_valid[..., None], x0, current))
        return patches, None

    xs = (jnp.asarray(plan.mask_before, jnp.int32), jnp.asarray(plan.mask_after, jnp.int32),
          jnp.asarray(plan.guidance, jnp.float32), jax.random.split(noise_rng, cfg.num_ar_steps))
    patches, _ = jax.lax.scan(ar_step, jnp.zeros((b, L, C), jnp.float32), xs)
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
            "velocity_nfe": cfg.num_ar_steps * flow.nfe(cfg.solver, cfg.solver_steps) * passes}
