"""Imports a diffusers `AutoencoderDC` checkpoint directory into the Flax DC-AE (no torch needed).

A diffusers checkpoint directory holds `config.json` and `diffusion_pytorch_model.safetensors` (or a
sharded `...safetensors.index.json` with its shards). Our module names mirror the diffusers state-dict
paths, so each of our variables has exactly one source tensor: `encoder/down_blocks_3_1/attn/to_q/kernel`
<- `encoder.down_blocks.3.1.attn.to_q.weight`, with conv kernels OIHW -> HWIO and linear kernels
(out, in) -> (in, out). What the model expects is read off the module itself (`jax.eval_shape`), so
the config decides the structure and the checkpoint is checked against it tensor by tensor.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from v2flow_jax.models.autoencoders.dc_ae import DCAutoencoder

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
INDEX_FILE = WEIGHTS_FILE + ".index.json"
HUB_ID = "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers"
DOWNLOAD_HINT = (f"download the diffusers checkpoint directory on a machine with network access, e.g. "
                 f"`huggingface-cli download {HUB_ID} --local-dir DIR`, copy DIR here and point the config at it")
# BatchNorm2d's step counter: a training-time buffer that inference never reads.
IGNORED_SUFFIXES = (".num_batches_tracked",)
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var"}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be imported; the message names the path and the fix."""


# --------------------------------------------------------------------------------------------------
# Reading the directory


def _require_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise CheckpointError(f"DC-AE checkpoint directory {path!r} does not exist: {DOWNLOAD_HINT}.")


def read_config(path: str) -> dict[str, Any]:
    """The `AutoencoderDC` config of a diffusers checkpoint directory."""
    _require_dir(path)
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        hint = ""
        if os.path.isfile(os.path.join(path, "vae", CONFIG_FILE)):
            hint = f" It looks like a pipeline directory: pass {os.path.join(path, 'vae')!r} instead."
        raise CheckpointError(f"{file!r} is missing: a diffusers AutoencoderDC directory has {CONFIG_FILE} next "
                              f"to {WEIGHTS_FILE}.{hint} Otherwise {DOWNLOAD_HINT}.")
    try:
        with open(file) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file!r} is not valid JSON ({e}); re-download the checkpoint directory.") from e
    cls = config.get("_class_name") if isinstance(config, dict) else None
    if cls != "AutoencoderDC":
        raise CheckpointError(f"{file!r} describes {cls!r}, not 'AutoencoderDC': point the config at a DC-AE "
                              f"checkpoint such as {HUB_ID} (its `vae/` folder inside a Sana pipeline).")
    return config


def autoencoder_from_config(path: str, dtype=jnp.float32, param_dtype=jnp.float32) -> DCAutoencoder:
    """Our DC-AE built from the checkpoint's `config.json` (compute `dtype`, weights stored in `param_dtype`)."""
    config = read_config(path)
    try:
        return DCAutoencoder(config, dtype=dtype, param_dtype=param_dtype)
    except ValueError as e:
        raise CheckpointError(f"{os.path.join(path, CONFIG_FILE)!r}: {e}") from e


def _read_safetensors(file: str) -> dict[str, np.ndarray]:
    # safetensors >= 0.8 returns bfloat16 tensors as ml_dtypes.bfloat16 arrays (fp16 / fp32 as themselves).
    from safetensors.numpy import load_file
    return load_file(file)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """All tensors of the checkpoint directory (single file or sharded index), as numpy arrays."""
    _require_dir(path)
    single, index = os.path.join(path, WEIGHTS_FILE), os.path.join(path, INDEX_FILE)
    if os.path.isfile(single):
        return _read_safetensors(single)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            file = os.path.join(path, shard)
            if not os.path.isfile(file):
                raise CheckpointError(f"{index!r} lists the shard {shard!r}, which is missing from {path!r}: "
                                      f"re-download the checkpoint directory.")
            state.update(_read_safetensors(file))
        return state
    present = sorted(os.listdir(path))
    pickled = [f for f in present if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    hint = (f" Found {pickled}: pickled torch weights are not read; re-save them with "
            f"`AutoencoderDC.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`." if pickled else "")
    raise CheckpointError(f"{path!r} has no {WEIGHTS_FILE} (nor {INDEX_FILE}); it holds {present}.{hint} "
                          f"Otherwise {DOWNLOAD_HINT}.")


# --------------------------------------------------------------------------------------------------
# Mapping our variables onto diffusers' tensors


def torch_key(path: tuple[str, ...]) -> str:
    """('encoder', 'down_blocks_3_1', 'attn', 'to_q', 'kernel') -> 'encoder.down_blocks.3.1.attn.to_q.weight'."""
    modules = [re.sub(r"_(\d+)", r".\1", part) for part in path[:-1]]
    return ".".join(modules + [_LEAF_NAMES[path[-1]]])


def torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The diffusers shape of one of our variables: HWIO -> OIHW, (in, out) -> (out, in)."""
    if len(shape) == 4:
        h, w, i, o = shape
        return (o, i, h, w)
    if len(shape) == 2:
        return shape[::-1]
    return tuple(shape)


def from_torch(array: np.ndarray) -> np.ndarray:
    """Inverse of `torch_shape` on the data."""
    if array.ndim == 4:
        return np.transpose(array, (2, 3, 1, 0))
    if array.ndim == 2:
        return array.T
    return array


def expected_tensors(autoencoder: DCAutoencoder) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """Our variables, flattened to (collection, module..., leaf) -> abstract array; nothing is allocated."""
    abstract = jax.eval_shape(autoencoder.init_params, jax.random.key(0))
    return traverse_util.flatten_dict(abstract)


def _listing(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def convert_state_dict(state_dict: Mapping[str, Any], autoencoder: DCAutoencoder,
                       source: str = "the state dict") -> dict[str, Any]:
    """diffusers AutoencoderDC tensors -> our variables dict (numpy, in the module's param dtype), checked."""
    expected = expected_tensors(autoencoder)
    wanted = {torch_key(path[1:]): path for path in expected}
    present = {k for k in state_dict if not k.endswith(IGNORED_SUFFIXES)}
    missing = set(wanted) - present
    unexpected = present - set(wanted)
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors the model needs are missing ({_listing(missing)}): the file is "
                        f"truncated or comes from another model; re-download the checkpoint directory")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors are not used by the model ({_listing(unexpected)}): the weights "
                        f"do not match config.json; keep the config.json that was saved with them")
    mismatched = []
    for key in sorted(set(wanted) & present):
        want, got = torch_shape(expected[wanted[key]].shape), tuple(np.shape(state_dict[key]))
        if want != got:
            mismatched.append(f"{key}: checkpoint {got}, model {want}")
    if mismatched:
        problems.append(f"{len(mismatched)} tensors have the wrong shape ({'; '.join(mismatched[:8])}"
                        f"{' ...' if len(mismatched) > 8 else ''}): config.json describes another width or "
                        f"head size than the weights; use the config.json that was saved with them")
    if problems:
        raise CheckpointError(f"cannot import the DC-AE weights of {source}: " + ". ".join(problems) + ".")
    flat = {path: from_torch(np.asarray(state_dict[key])).astype(expected[path].dtype)
            for key, path in wanted.items()}
    return traverse_util.unflatten_dict(flat)


def load_params(path: str, autoencoder: DCAutoencoder | None = None, shardings=None):
    """The variables of the checkpoint in `path`, as jax arrays (placed by `shardings` when given).

    `autoencoder` defaults to the one `config.json` describes; `shardings` is a tree of `jax.sharding`
    objects matching the variables (e.g. from `sharding.logical_shardings` of `autoencoder.init_boxed`).
    """
    autoencoder = autoencoder or autoencoder_from_config(path)
    state = read_state_dict(path)
    single = os.path.join(path, WEIGHTS_FILE)
    source = repr(single if os.path.isfile(single) else os.path.join(path, INDEX_FILE))
    variables = convert_state_dict(state, autoencoder, source=source)
    if shardings is not None:
        return jax.device_put(variables, shardings)
    return jax.tree.map(jnp.asarray, variables)


def load_autoencoder(path: str, dtype=jnp.float32, param_dtype=jnp.float32):
    """(autoencoder, variables) from a diffusers AutoencoderDC checkpoint directory."""
    autoencoder = autoencoder_from_config(path, dtype=dtype, param_dtype=param_dtype)
    return autoencoder, load_params(path, autoencoder)
