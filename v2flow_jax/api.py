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
from flax import linen as nn

from v2flow_jax import build, checkpointing, sampling, sharding, train
from v2flow_jax.models import tokenizer as tokenizer_lib


def _as_model_images(images):
    x = np.asarray(images)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 127.5 - 1.0
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be (B, H, W, 3) uint8 or floats in [-1, 1], got shape {x.shape}.")
    return x.astype(np.float32)


class Tokenizer:
    """A V2Flow tokenizer with its variables placed on a mesh."""

    def __init__(self, config, variables=None, *, devices=None, run: build.Run | None = None):
        self.config = config
        self.run = run or build.build_run(config, devices)
        self.variables = variables if variables is not None else _init_variables(self.run)
        self.sampler = self.run.sampler
        self._dp = sharding.data_parallel_size(self.run.mesh)
        run = self.run
        self._encode = jax.jit(lambda v, x: run.model.apply(v, build.encode_images(run, x), method=run.model.encode)["indices"])
        self._encode_latents = jax.jit(lambda v, z: run.model.apply(v, z * run.autoencoder.scale,
                                                                    method=run.model.encode)["indices"])
        self._decode = jax.jit(self._decode_fn, static_argnames=("cfg", "to_pixels"))
        self._reconstruct = jax.jit(self._reconstruct_fn, static_argnames=("cfg",))

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
        tx = train.make_optimizer(config)
        state_shapes, _ = jax.eval_shape(lambda: train.init_state_tree(run, tx, train.init_rngs(config.seed)))
        with sharding.use_mesh(run.mesh, run.rules):
            shardings = sharding.logical_shardings(state_shapes, run.mesh, run.rules)
        abstract = train.abstract_state(nn.unbox(state_shapes), nn.unbox(shardings))
        state, _, _ = ckpt.restore(step, abstract_state=abstract, restore_data=False)
        params = train.state_params(state, config) if use_ema else state.params
        # Only the frozen table is initialised here; params and codebook come from the checkpoint.
        variables = {**_init_variables(run, frozen_only=True), "params": params, "vq": state.vq}
        tok = cls(config, variables, run=run)
        tok.step = int(state.step)
        return tok

    # ---------------------------------------------------------------------------------- pieces
    def _decode_fn(self, variables, indices, rng, cfg, to_pixels=True):
        latents = sampling.decode_indices(self.run.model, variables, indices, rng, cfg)
        return build.decode_latents(self.run, latents) if to_pixels else latents

    def _reconstruct_fn(self, variables, images, rng, cfg):
        latents = build.encode_images(self.run, images)
        recon, _ = sampling.reconstruct_latents(self.run.model, variables, latents, rng, cfg)
        return build.decode_latents(self.run, recon)

    def _sharded(self, fn, x, *args):
        n = x.shape[0]
        rows = -(-n // self._dp) * self._dp
        if rows != n:
            x = np.concatenate([x, np.repeat(x[-1:], rows - n, axis=0)])
        with sharding.use_mesh(self.run.mesh, self.run.rules):
            out = fn(self.variables, sharding.put_batch(x, self.run.mesh), *args)
        return np.asarray(out)[:n]

    def _sampler_cfg(self, overrides):
        return sampling.SamplerConfig.from_config({**vars(self.sampler), **overrides}) if overrides else self.sampler

    # ------------------------------------------------------------------------------------ API
    def encode(self, images) -> np.ndarray:
        """Images (B, H, W, 3) -> token ids int32 (B, n). Deterministic unless model.noisy_encode."""
        return self._sharded(self._encode, _as_model_images(images))

    def encode_latents(self, latents) -> np.ndarray:
        """Unscaled autoencoder latents (B, h, w, C) -> token ids (B, n)."""
        return self._sharded(self._encode_latents, np.asarray(latents, np.float32))

    def _check_ids(self, indices) -> np.ndarray:
        ids = np.asarray(indices)
        n, k = self.run.model.config.num_tokens, self.run.model.config.codebook_size
        if ids.ndim != 2 or ids.shape[1] != n or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"indices must be integer token ids of shape (B, {n}), got {ids.dtype} {ids.shape}.")
        if ids.min() < 0 or ids.max() >= k:
            raise ValueError(f"token ids must lie in [0, {k}), got [{ids.min()}, {ids.max()}].")
        return ids.astype(np.int32)

    def decode(self, indices, rng, **sampler_overrides) -> np.ndarray:
        """Token ids (B, n) (e.g. from an LLM) -> images in [-1, 1] (B, H, W, 3)."""
        fn = functools.partial(self._decode, cfg=self._sampler_cfg(sampler_overrides))
        return self._sharded(fn, self._check_ids(indices), rng)

    def decode_to_latents(self, indices, rng, **sampler_overrides) -> np.ndarray:
        """Token ids -> scaled latents (B, h, w, C), without the autoencoder's decoder."""
        fn = functools.partial(self._decode, cfg=self._sampler_cfg(sampler_overrides), to_pixels=False)
        return self._sharded(fn, self._check_ids(indices), rng)

    def reconstruct(self, images, rng, **sampler_overrides) -> np.ndarray:
        """Images -> tokens -> images, in [-1, 1]."""
        fn = functools.partial(self._reconstruct, cfg=self._sampler_cfg(sampler_overrides))
        return self._sharded(fn, _as_model_images(images), rng)


def _init_variables(run: build.Run, frozen_only: bool = False):
    """Variables created in their shardings (never whole on one device) with the vocabulary installed.

    `frozen_only` keeps just the 'frozen' collection; XLA drops the unused parameter initialisers.
    """
    init_rng = train.init_rngs(run.config.seed)[0]

    def init(r):
        variables = tokenizer_lib.init_variables(run.model, r)
        return {"frozen": variables.get("frozen", {})} if frozen_only else variables
    variables, _ = sharding.sharded_init(init, run.mesh, run.rules, init_rng)
    return build.install_vocabulary(run, variables)


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
    return evaluate.Evaluator(tok.run, workdir).run(v["params"], v["vq"], v.get("frozen", {}), step=tok.step)
