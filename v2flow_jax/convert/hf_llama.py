"""Hugging Face LLaMA checkpoints <-> the parameters of `v2flow_jax.lm.llama.Llama`.

Reads a checkpoint directory as `save_pretrained` writes it (`config.json` with `model.safetensors`,
or `model.safetensors.index.json` and its shards; float32, float16 or bfloat16 on disk) with
`hf_checkpoint.py`'s readers; problems raise `hf_checkpoint.CheckpointError` naming the file and the
tensor. Tensors are read one at a time, converted on the host (transposed to (in, out), heads split
out, cast to the parameter dtype, stacked over layers for a scanned model) and placed on the mesh in
their sharding before the next one is read: the host holds one parameter at a time, never the model.

`save_hf_llama` writes the other way: our parameters -> a directory transformers'
`LlamaForCausalLM.from_pretrained` loads (one file, or shards of at most `max_shard_size`).

The tensor table (`tensor_mappings`) is shared with the GGUF reader (`gguf_llama.py`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Callable, Iterator

import jax
import numpy as np

from v2flow_jax import sharding as shd
from v2flow_jax.convert import hf_checkpoint
from v2flow_jax.lm.llama import LlamaConfig, UnsupportedArchitectureError, param_shardings

DISK_DTYPES = ("float32", "float16", "bfloat16")
# In older checkpoints, recomputed from the config (RoPE buffers): present or not, never read.
IGNORED_TENSORS = re.compile(r".*\.rotary_emb\.inv_freq$")


# ----------------------------------------------------------------------------------------------
# The tensor table


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    """One HF tensor <-> one of our parameters ("{layer}" in hf_name: once per layer)."""
    hf_name: str                  # e.g. "model.layers.{layer}.self_attn.q_proj.weight"
    path: tuple[str, ...]         # our parameter, relative to the layer for per-layer tensors
    hf_shape: tuple[int, ...]     # torch layout: Linear weights are (out, in)
    shape: tuple[int, ...]        # ours (one layer)
    linear: bool                  # a Linear weight: ours = weight.T, reshaped

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.hf_name

    def name(self, layer: int | None) -> str:
        return self.hf_name.format(layer=layer)

    def to_ours(self, w: np.ndarray) -> np.ndarray:
        return w.T.reshape(self.shape) if self.linear else w.reshape(self.shape)

    def to_hf(self, p: np.ndarray) -> np.ndarray:
        return p.reshape(self.hf_shape[1], self.hf_shape[0]).T if self.linear else p.reshape(self.hf_shape)


def tensor_mappings(config: LlamaConfig) -> list[TensorMapping]:
    """Every HF tensor of a LlamaForCausalLM with this config, in the order HF lists them."""
    d, f, v, hd = config.hidden_size, config.intermediate_size, config.vocab_size, config.head_dim
    h, kv = config.num_heads, config.num_kv_heads
    layer = "model.layers.{layer}."

    def linear(hf, path, out_shape, in_shape):
        # nn.DenseGeneral kernels are (in..., out...); torch Linear weights (prod(out), prod(in)).
        return TensorMapping(hf, path, (int(np.prod(out_shape)), int(np.prod(in_shape))), (*in_shape, *out_shape),
                             True)

    def vector(hf, path, n):
        return TensorMapping(hf, path, (n,), (n,), False)

    maps = [TensorMapping("model.embed_tokens.weight", ("embed_tokens", "embedding"), (v, d), (v, d), False)]
    maps += [
        vector(layer + "input_layernorm.weight", ("input_layernorm", "scale"), d),
        linear(layer + "self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), (h, hd), (d,)),
        linear(layer + "self_attn.k_proj.weight", ("self_attn", "k_proj", "kernel"), (kv, hd), (d,)),
        linear(layer + "self_attn.v_proj.weight", ("self_attn", "v_proj", "kernel"), (kv, hd), (d,)),
        linear(layer + "self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), (d,), (h, hd)),
        vector(layer + "post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), d),
        linear(layer + "mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), (f,), (d,)),
        linear(layer + "mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), (f,), (d,)),
        linear(layer + "mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), (d,), (f,)),
    ]
    maps.append(vector("model.norm.weight", ("norm", "scale"), d))
    if not config.tie_word_embeddings:
        maps.append(linear("lm_head.weight", ("lm_head", "kernel"), (v,), (d,)))
    return maps


def param_path(config: LlamaConfig, mapping: TensorMapping, layer: int | None = None) -> tuple[str, ...]:
    """Where the mapping's parameter sits in our tree (for a scanned model: the stacked leaf)."""
    if not mapping.per_layer:
        return mapping.path
    return ("layers", *mapping.path) if config.scan_layers else (f"layers_{layer}", *mapping.path)


def hf_tensors(config: LlamaConfig) -> Iterator[tuple[TensorMapping, int | None]]:
    """(mapping, layer) for every HF tensor, layer None for the global ones."""
    for m in tensor_mappings(config):
        for layer in (range(config.num_layers) if m.per_layer else [None]):
            yield m, layer


# ----------------------------------------------------------------------------------------------
# Assembling the parameter tree from any reader (HF safetensors here, GGUF in gguf_llama.py)


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def place(host: np.ndarray, sharding) -> jax.Array:
    """A host array on the devices in `sharding` (None: the default device); each device gets its block."""
    if sharding is None:
        return jax.device_put(host)
    # make_array_from_callback rather than device_put: it also works when the mesh spans several hosts.
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def assemble_params(config: LlamaConfig, read: Callable[[TensorMapping, int | None], np.ndarray], *,
                    mesh=None, rules=shd.DEFAULT_RULES) -> dict:
    """Our parameter tree from `read(mapping, layer)` (a float HF-layout numpy array of mapping.hf_shape).

    One parameter at a time is built on the host (for a scanned model: its layers stacked) and placed
    in its sharding before the next is read.
    """
    shardings = param_shardings(config, mesh, rules) if mesh is not None else None
    dtype = np.dtype(config.param_dtype)
    params: dict = {}
    for m in tensor_mappings(config):
        if m.per_layer and config.scan_layers:
            host = np.empty((config.num_layers, *m.shape), dtype)
            for layer in range(config.num_layers):
                host[layer] = m.to_ours(read(m, layer))
            leaves = [(param_path(config, m), host)]
        else:
            layers = range(config.num_layers) if m.per_layer else [None]
            leaves = ((param_path(config, m, layer), m.to_ours(read(m, layer)).astype(dtype)) for layer in layers)
        for path, host in leaves:
            _set(params, path, place(host, _get(shardings, path) if shardings is not None else None))
            del host
    return params


# ----------------------------------------------------------------------------------------------
# Reading a Hugging Face checkpoint


def read_hf_llama_config(checkpoint_dir, **overrides) -> LlamaConfig:
    """The LlamaConfig of a checkpoint directory's config.json; overrides set dtype, scan_layers, ...

    Raises hf_checkpoint.CheckpointError naming config.json and the field for an architecture we do not compute.
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    config = hf_checkpoint.read_config(checkpoint_dir)
    path = os.path.join(checkpoint_dir, hf_checkpoint.CONFIG_NAME)
    try:
        return LlamaConfig.from_hf_dict(config, **overrides)
    except UnsupportedArchitectureError as e:
        raise hf_checkpoint.CheckpointError(f"{path!r}: {e}") from e


def _weight_files(checkpoint_dir: str) -> tuple[str, dict[str, str]]:
    """(the file that lists the tensors, {tensor name: safetensors file}) for either layout."""
    single = os.path.join(checkpoint_dir, hf_checkpoint.SAFETENSORS_NAME)
    if os.path.isfile(single):
        return single, {name: single for name in hf_checkpoint.safetensors_keys(single)}
    index = os.path.join(checkpoint_dir, hf_checkpoint.SAFETENSORS_INDEX_NAME)
    if os.path.isfile(index):
        weight_map = hf_checkpoint.read_index(index)
        files = {f: hf_checkpoint.shard_file(index, f) for f in sorted(set(weight_map.values()))}
        return index, {name: files[f] for name, f in weight_map.items()}
    found = sorted(os.listdir(checkpoint_dir))
    raise hf_checkpoint.CheckpointFileNotFoundError(
        f"no weights in {checkpoint_dir!r}: expected {hf_checkpoint.SAFETENSORS_NAME} or {hf_checkpoint.SAFETENSORS_INDEX_NAME} "
        f"(found {found[:10]}). Pickled .bin weights are not read: re-save with save_pretrained.")


def _resolve(listing: str, files: dict[str, str], mapping: TensorMapping, layer) -> str:
    for name in hf_checkpoint.name_candidates(mapping.name(layer)):   # also a base LlamaModel ("model." dropped)
        if name in files:
            return name
    raise hf_checkpoint.CheckpointError(
        f"tensor {mapping.name(layer)!r} is missing from {listing!r}: a LLaMA with this config.json needs it, "
        f"shape {mapping.hf_shape}. The checkpoint lists {len(files)} tensors.")


def _check_unexpected(listing: str, files: dict[str, str], config: LlamaConfig):
    used = {name for m, layer in hf_tensors(config) for name in hf_checkpoint.name_candidates(m.name(layer))}
    if config.tie_word_embeddings:
        used.add("lm_head.weight")   # a tied head some tools still write: redundant, not read
    unexpected = sorted(n for n in files if n not in used and not IGNORED_TENSORS.match(n))
    if unexpected:
        shown = ", ".join(repr(n) for n in unexpected[:6])
        raise hf_checkpoint.CheckpointError(
            f"{listing!r} holds {len(unexpected)} tensors a LLaMA with its config.json does not have: {shown}"
            f"{' ...' if len(unexpected) > 6 else ''}. Is this another architecture (biases, q/k norms, ...)?")


def load_hf_llama(checkpoint_dir, *, mesh=None, rules=shd.DEFAULT_RULES, **config_overrides):
    """(params, config) of a Hugging Face LLaMA checkpoint directory.

    Args:
      checkpoint_dir: `config.json` + `model.safetensors` or `model.safetensors.index.json` + shards.
      mesh: place each parameter in its sharding on this mesh (see `llama.param_shardings`); None:
        the default device.
      rules: logical-axis rules (sharding.DEFAULT_RULES).
      config_overrides: LlamaConfig fields HF has not got (dtype=, param_dtype=, scan_layers=, remat_policy=).
    Raises hf_checkpoint.CheckpointError naming the file and the tensor on a missing tensor, a wrong shape or dtype,
    tensors of another architecture, or an unsupported config.
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    config = read_hf_llama_config(checkpoint_dir, **config_overrides)
    listing, files = _weight_files(checkpoint_dir)
    _check_unexpected(listing, files, config)
    # Every name, shape and dtype is checked from the headers before the first tensor is read.
    sources = {}
    for m, layer in hf_tensors(config):
        name = _resolve(listing, files, m, layer)
        source = hf_checkpoint.safetensors_source(files[name], name)
        _check_source(source, m, checkpoint_dir)
        sources[m.name(layer)] = source

    def read(m: TensorMapping, layer) -> np.ndarray:
        source = sources[m.name(layer)]
        return np.asarray(source.read(tuple(slice(None) for _ in source.shape)), np.float32)
    return assemble_params(config, read, mesh=mesh, rules=rules), config


def _check_source(source, m: TensorMapping, checkpoint_dir: str):
    if source.shape != m.hf_shape:
        raise hf_checkpoint.CheckpointError(
            f"tensor {source.name!r} in {source.path!r} has shape {source.shape}, but the config.json of "
            f"{checkpoint_dir!r} implies {m.hf_shape}.")
    if np.dtype(source.dtype).name not in DISK_DTYPES:
        raise hf_checkpoint.CheckpointError(
            f"tensor {source.name!r} in {source.path!r} has dtype {np.dtype(source.dtype).name}; expected one of "
            f"{', '.join(DISK_DTYPES)} (quantised checkpoints are read from GGUF, see gguf_llama.py).")


# ----------------------------------------------------------------------------------------------
# Writing a Hugging Face checkpoint


def _parse_size(size) -> int:
    if isinstance(size, (int, np.integer)):
        return int(size)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size={size!r}: give bytes or e.g. '5GB', '200MiB'.")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(match.group(1)) * scale)


def _to_host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def save_hf_llama(params, config: LlamaConfig, out_dir, *, max_shard_size="5GB", dtype=None) -> list[str]:
    """Writes params + config as a Hugging Face LlamaForCausalLM directory; returns the files written.

    max_shard_size: bytes or "5GB"-style; a model over it is split into model-0000i-of-0000n.safetensors
      with model.safetensors.index.json, as save_pretrained does. dtype: on-disk dtype (default: the
      parameters'); e.g. jnp.bfloat16 halves the files.
    A tied head is not written (HF re-ties lm_head to the embedding). Only process 0 writes.
    """
    from safetensors.numpy import save_file

    out_dir = os.fspath(out_dir)
    disk_dtype = np.dtype(dtype or config.param_dtype)
    if disk_dtype.name not in DISK_DTYPES:
        raise ValueError(f"dtype={disk_dtype.name}: write one of {', '.join(DISK_DTYPES)}.")
    limit = _parse_size(max_shard_size)

    # Plan the shards from the shapes alone, then materialise one shard at a time.
    shards: list[list[tuple[TensorMapping, int | None]]] = [[]]
    shard_bytes = 0
    for m, layer in hf_tensors(config):
        nbytes = int(np.prod(m.hf_shape)) * disk_dtype.itemsize
        if shards[-1] and shard_bytes + nbytes > limit:
            shards.append([])
            shard_bytes = 0
        shards[-1].append((m, layer))
        shard_bytes += nbytes

    def tensor(m: TensorMapping, layer):
        leaf = _get(params, param_path(config, m, layer))
        if m.per_layer and config.scan_layers:
            leaf = leaf[layer]
        return np.ascontiguousarray(m.to_hf(_to_host(leaf)).astype(disk_dtype))

    names = [hf_checkpoint.SAFETENSORS_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    hf_config = dict(config.to_hf_dict(), dtype=disk_dtype.name)
    if jax.process_index() != 0:
        for shard in shards:            # every process joins the gathers of sharded parameters
            for m, layer in shard:
                tensor(m, layer)
        return []
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, hf_checkpoint.CONFIG_NAME), "w") as f:
        json.dump(hf_config, f, indent=2)
    written = [hf_checkpoint.CONFIG_NAME]
    weight_map, total = {}, 0
    for file_name, shard in zip(names, shards):
        tensors = {m.name(layer): tensor(m, layer) for m, layer in shard}
        save_file(tensors, os.path.join(out_dir, file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in tensors})
        total += sum(t.nbytes for t in tensors.values())
        written.append(file_name)
        del tensors
    if len(shards) > 1:
        with open(os.path.join(out_dir, hf_checkpoint.SAFETENSORS_INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        written.append(hf_checkpoint.SAFETENSORS_INDEX_NAME)
    return written
