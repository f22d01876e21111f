"""The Python API: a trained tokenizer as an object with jitted encode / decode / reconstruct.

    from v2flow_jax.api import Tokenizer
    tok = Tokenizer.from_workdir("runs/demo")                  # config + latest checkpoint
    ids = tok.encode(images)                                   # uint8 or [-1, 1] NHWC -> int32 (B, n)
    images = tok.decode(ids, jax.random.key(0))                # token ids -> [-1, 1] NHWC
    recon = tok.reconstruct(images, jax.random.key(0))

Each method is compiled once per input shape and batch-sharded over the config's mesh (the batch is
padded to a multiple of the data-parallel size and cropped back). Images pass through the configured
autoencoder; `encode_latents` / `decode_to_latents` skip it.
"""
from __future__ import annotations

import functools

import jax
import ml_collections
import numpy as np

from v2flow_jax import build, checkpointing, sampling, sharding, train_state
from v2flow_jax.models import autoencoders
from v2flow_jax.models import tokenizer as tokenizer_lib


VALUE_RANGES = {(-1, 1), (0, 1), (0, 255)}


def as_model_images(images, image_size: int, value_range=(-1, 1)) -> np.ndarray:
    """The input contract of encode / reconstruct: float32 (B, S, S, 3) in [-1, 1], or an error saying why not.

    Accepted: uint8 (0..255), or floats in `value_range` ((-1, 1) by default; (0, 1) and (0, 255) are
    rescaled), with S = the config's image_size. Other integer dtypes, values outside the range, NaN or
    inf pixels, grayscale or RGBA arrays and other sizes are refused with the fix in the message (resize
    and centre-crop with `v2flow_jax.data.decoding.adm_center_crop` on a PIL image). An empty batch (B = 0) is allowed.
    """
    x = np.asarray(images)
    expected = f"(B, {image_size}, {image_size}, 3)"
    if x.ndim != 4 or x.shape[-1] != 3:
        hint = (" (grayscale: repeat it to 3 channels)" if x.ndim in (3, 4) and x.shape[-1] in (1, image_size)
                else " (RGBA: drop or composite the alpha channel)" if x.ndim == 4 and x.shape[-1] == 4 else "")
        raise ValueError(f"images must be {expected} RGB arrays, got shape {x.shape}{hint}.")
    if x.shape[1:3] != (image_size, image_size):
        raise ValueError(f"images are {x.shape[1]}x{x.shape[2]} but this tokenizer works at {image_size}x{image_size} "
                         "(config.image_size): resize them first, e.g. with "
                         f"v2flow_jax.data.decoding.adm_center_crop(PIL.Image.open(path), {image_size}).")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 127.5 - 1.0
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"images must be uint8 (0..255) or floating point, got {x.dtype}: convert with "
                         f"np.clip(x, 0, 255).astype(np.uint8) if they are 8-bit values.")
    if tuple(value_range) not in VALUE_RANGES:
        raise ValueError(f"value_range must be one of {sorted(VALUE_RANGES)}, got {value_range}.")
    x = x.astype(np.float32)
    if x.size == 0:
        return x
    bad = ~np.isfinite(x)
    if bad.any():
        which = sorted(set(np.nonzero(bad)[0].tolist()))[:8]
        raise ValueError(f"images {which} contain NaN or inf pixels ({int(bad.sum())} values): every pixel must be "
                         "finite.")
    lo, hi = value_range
    tol = 1e-3 * (hi - lo)
    if x.min() < lo - tol or x.max() > hi + tol:
        guess = " (they look like 0..255 values: pass value_range=(0, 255) or uint8)" if x.max() > 2 else ""
        raise ValueError(f"float images must lie in [{lo}, {hi}] (value_range), got [{x.min():.4g}, "
                         f"{x.max():.4g}]{guess}.")
    x = np.clip(x, lo, hi)
    return (x - lo) * (2.0 / (hi - lo)) - 1.0


class Tokenizer:
    """A V2Flow tokenizer with its variables placed on a mesh."""

    def __init__(self, config, variables=None, *, devices=None, run: build.Run | None = None):
        self.config = config
        self.run = run or build.build_run(config, devices)
        self.variables = variables if variables is not None else _init_variables(self.run)
        self.sampler = self.run.sampler
        self._dp = sharding.data_parallel_size(self.run.mesh)
        model, ae = self.run.model, self.run.autoencoder
        self._encode = jax.jit(lambda v, a, x: model.apply(v, autoencoders.images_to_latents(ae, a, x),
                                                           method=model.encode)["indices"])
        self._encode_latents = jax.jit(lambda v, a, z: model.apply(v, z * ae.scale, method=model.encode)["indices"])
        self._decode = jax.jit(self._decode_fn, static_argnames=("cfg", "to_pixels"))
        self._reconstruct = jax.jit(functools.partial(reconstruct_images, self.run), static_argnames=("cfg",))

    # --------------------------------------------------------------------------------- loading
    @classmethod
    def from_workdir(cls, workdir: str, step: int | None = None, *, config=None, use_ema: bool = True,
                     devices=None) -> "Tokenizer":
        """Loads a training run's checkpoint (latest by default); the config saved with it unless given."""
        ckpt = checkpointing.Checkpointer(workdir, read_only=True)
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint under {workdir}/checkpoints: train first "
                                    f"(python -m v2flow_jax.main --workdir={workdir}).")
        if config is None:
            config = ml_collections.ConfigDict(_read_config(ckpt, step))
        run = build.build_run(config, devices)
        build.check_vocabulary(run)
        abstract = train_state.abstract_inference_variables(run)
        key = train_state.inference_params_key(config, use_ema)
        restored = ckpt.restore_subtree(step, {key: abstract["params"], "vq": abstract["vq"]})
        # Params and codebook come from the checkpoint, the frozen table from its own file (run.frozen).
        tok = cls(config, run.variables(restored[key], restored["vq"]), run=run)
        tok.step = int(step)
        return tok

    # ---------------------------------------------------------------------------------- pieces
    def _decode_fn(self, variables, ae_params, indices, rng, cfg, to_pixels=True):
        latents = sampling.decode_indices(self.run.model, variables, indices, rng, cfg)
        return autoencoders.latents_to_images(self.run.autoencoder, ae_params, latents) if to_pixels else latents

    @property
    def num_tokens(self) -> int:
        return self.run.model.config.num_tokens

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.config.image_size, self.config.image_size, 3)

    def _sharded(self, fn, x, *args, out_tail=None, out_dtype=np.float32):
        n = x.shape[0]
        if n == 0:   # an empty batch gives an empty result of the right trailing shape, with no compilation
            return np.zeros((0, *out_tail), out_dtype)
        rows = -(-n // self._dp) * self._dp
        if rows != n:
            x = np.concatenate([x, np.repeat(x[-1:], rows - n, axis=0)])
        with sharding.use_mesh(self.run.mesh, self.run.rules):
            out = fn(self.variables, self.run.ae_params, sharding.put_batch(x, self.run.mesh), *args)
        return np.asarray(out)[:n]

    def _sampler_cfg(self, overrides):
        return sampling.SamplerConfig.from_config({**vars(self.sampler), **overrides}) if overrides else self.sampler

    # ------------------------------------------------------------------------------------ API
    def _images(self, images, value_range):
        return as_model_images(images, self.config.image_size, value_range)

    def encode(self, images, value_range=(-1, 1)) -> np.ndarray:
        """Images (B, S, S, 3) -> token ids int32 (B, n); the input contract is `as_model_images`.
        Deterministic unless model.noisy_encode."""
        return self._sharded(self._encode, self._images(images, value_range), out_tail=(self.num_tokens,),
                             out_dtype=np.int32)

    def encode_latents(self, latents) -> np.ndarray:
        """Unscaled autoencoder latents (B, h, w, C) -> token ids (B, n)."""
        return self._sharded(self._encode_latents, np.asarray(latents, np.float32), out_tail=(self.num_tokens,),
                             out_dtype=np.int32)

    def _check_ids(self, indices) -> np.ndarray:
        ids = np.asarray(indices)
        n, k = self.run.model.config.num_tokens, self.run.model.config.codebook_size
        if ids.ndim != 2 or ids.shape[1] != n or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"indices must be integer token ids of shape (B, {n}), got {ids.dtype} {ids.shape}.")
        if ids.size and (ids.min() < 0 or ids.max() >= k):
            raise ValueError(f"token ids must lie in [0, {k}), got [{ids.min()}, {ids.max()}].")
        return ids.astype(np.int32)

    def decode(self, indices, rng, **sampler_overrides) -> np.ndarray:
        """Token ids (B, n) (e.g. from an LLM) -> images in [-1, 1] (B, H, W, 3)."""
        fn = functools.partial(self._decode, cfg=self._sampler_cfg(sampler_overrides))
        return self._sharded(fn, self._check_ids(indices), rng, out_tail=self.image_shape)

    def decode_to_latents(self, indices, rng, **sampler_overrides) -> np.ndarray:
        """Token ids -> scaled latents (B, h, w, C), without the autoencoder's decoder."""
        fn = functools.partial(self._decode, cfg=self._sampler_cfg(sampler_overrides), to_pixels=False)
        mc = self.run.model.config
        return self._sharded(fn, self._check_ids(indices), rng,
                             out_tail=(mc.latent_size, mc.latent_size, mc.latent_channels))

    def reconstruct(self, images, rng, value_range=(-1, 1), **sampler_overrides) -> np.ndarray:
        """Images (the contract of `as_model_images`) -> tokens -> images in [-1, 1]."""
        fn = functools.partial(self._reconstruct, cfg=self._sampler_cfg(sampler_overrides))
        return self._sharded(fn, self._images(images, value_range), rng, out_tail=self.image_shape)


def reconstruct_images(run: build.Run, variables, ae_params, images, rng, cfg):
    """Pixels in [-1, 1] -> tokens -> pixels (encode, AR rectified-flow decode). Pure; jit it with cfg static."""
    ae = run.autoencoder
    latents = autoencoders.images_to_latents(ae, ae_params, images)
    recon, _ = sampling.reconstruct_latents(run.model, variables, latents, rng, cfg)
    return autoencoders.latents_to_images(ae, ae_params, recon)


def _init_variables(run: build.Run):
    """Fresh variables created in their shardings (never whole on one device), the vocabulary from run.frozen."""
    def init(rng):
        v = tokenizer_lib.init_variables(run.model, rng)
        return {"params": v["params"], "vq": v["vq"]}
    variables, _ = sharding.sharded_init(init, run.mesh, run.rules, build.init_rngs(run.config.seed)[0])
    return run.variables(variables["params"], variables["vq"])


def _read_config(ckpt: checkpointing.Checkpointer, step: int) -> dict:
    import json
    path = ckpt.step_dir(step) / checkpointing.CONFIG / checkpointing.CONFIG_FILENAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: pass config= explicitly.")
    return json.loads(path.read_text())


def evaluate_checkpoint(config, workdir: str) -> dict:
    """config.mode == 'evaluate': reconstruction metrics of the latest checkpoint in workdir."""
    from v2flow_jax import evaluate
    tok = Tokenizer.from_workdir(workdir, config=config, use_ema=config.eval.use_ema)
    v = tok.variables
    return evaluate.Evaluator(tok.run, workdir).run(v["params"], v["vq"], step=tok.step)
