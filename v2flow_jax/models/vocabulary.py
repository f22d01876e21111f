"""The frozen LLM vocabulary L (N_l x d_l): read from a Hugging Face checkpoint, held sharded.

V2Flow mixes the rows of an LLM's input-embedding table (`embed_tokens`, e.g. LLaMA-2's 32000 x
4096) with the resampler's Gumbel-softmax weights, so visual tokens live in the LLM's own space.
The table is frozen: it sits in the `'frozen'` variable collection, never in `'params'`, so no
optimizer or gradient ever sees it.

Reading (`load_embedding_table`) understands the layouts `save_pretrained` writes:
  - `model.safetensors`                                          (one file)
  - `model.safetensors.index.json` + `model-0000i-of-0000n.safetensors`  (the index says which file)
  - `flax_model.msgpack` and `flax_model.msgpack.index.json` + shards   (HF Flax, transformers < 5)
and validates the tensor against `config.json` (`vocab_size`, `hidden_size`). With a `sharding`
each device's block is read from disk on its own (safetensors slices are memory-mapped reads), so
the full table never exists on one device; that is what makes a 32000 x 4096 fp32 table (512 MB)
cheap on a pod.

How a caller uses it (the model holds a `FrozenVocabulary` somewhere inside):

    variables, shardings = sharding.sharded_init(model.init, mesh, rules, rng, x)  # random placeholder
    table = load_embedding_table(cfg.llm_checkpoint, num_tokens=cfg.vocab_size,
                                 sharding=table_sharding(mesh, rules))
    variables = install_table(variables, table)         # finds the one 'table' in 'frozen'
    grads = jax.grad(loss)(variables["params"], variables["frozen"], ...)  # L gets no gradient
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import serialization, traverse_util
from flax.core import FrozenDict, meta
from jax.sharding import PartitionSpec as P

FROZEN = "frozen"                       # the variable collection of frozen tables
TABLE = "table"                         # the variable's name inside FrozenVocabulary
TABLE_AXES = ("vocab", "llm_embed")     # logical axis names of L's (rows, width)
DEFAULT_TENSOR = "model.embed_tokens.weight"

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
FLAX_NAME = "flax_model.msgpack"
FLAX_INDEX_NAME = "flax_model.msgpack.index.json"
LAYOUTS = (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, FLAX_NAME, FLAX_INDEX_NAME)  # by preference


class VocabularyError(ValueError):
    """The checkpoint or the table does not match what was asked for."""


class VocabularyFileNotFoundError(VocabularyError, FileNotFoundError):
    """A directory or file the loader needs is missing."""


# ----------------------------------------------------------------------------------------------
# config.json


def _read_config(checkpoint_dir: str) -> dict:
    if not os.path.isdir(checkpoint_dir):
        raise VocabularyFileNotFoundError(
            f"LLM checkpoint directory {checkpoint_dir!r} does not exist (expected a Hugging Face "
            f"checkpoint directory with {CONFIG_NAME} and {SAFETENSORS_NAME} or its index).")
    path = os.path.join(checkpoint_dir, CONFIG_NAME)
    if not os.path.isfile(path):
        raise VocabularyFileNotFoundError(
            f"{path!r} is missing: a Hugging Face checkpoint directory needs its {CONFIG_NAME} "
            "(vocab_size, hidden_size) next to the weights.")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise VocabularyError(f"{path!r} is not valid JSON: {e}") from e


def _sizes_from_config(config: dict, path: str) -> tuple[int, int]:
    # Multimodal configs (LLaVA and kin) keep the LLM's sizes under text_config.
    for cfg in (config, config.get("text_config") or {}):
        if "vocab_size" in cfg and "hidden_size" in cfg:
            return int(cfg["vocab_size"]), int(cfg["hidden_size"])
    raise VocabularyError(
        f"{path!r} has no 'vocab_size' and 'hidden_size' (top level or under 'text_config'); "
        "is this an LLM checkpoint?")


def embedding_table_info(checkpoint_dir: str) -> tuple[int, int]:
    """(vocab_size, hidden_size) from the checkpoint's config.json; reads no weights."""
    checkpoint_dir = os.fspath(checkpoint_dir)
    config = _read_config(checkpoint_dir)
    return _sizes_from_config(config, os.path.join(checkpoint_dir, CONFIG_NAME))


# ----------------------------------------------------------------------------------------------
# Tensor sources: (file, shape, dtype, read(index) -> numpy block), one per on-disk layout.


class _Source:
    def __init__(self, path: str, name: str, shape: Sequence[int], dtype, read: Callable):
        self.path, self.name, self.shape, self.dtype, self.read = path, name, tuple(shape), dtype, read


def _name_candidates(tensor_name: str) -> list[str]:
    # A base-model checkpoint (LlamaModel rather than LlamaForCausalLM) drops HF's "model." prefix.
    names = [tensor_name]
    if tensor_name.startswith("model."):
        names.append(tensor_name[len("model."):])
    return names


def _not_found(tensor_name: str, where: str, available: Sequence[str]) -> VocabularyError:
    # Embedding-looking names first: they are what the user most likely meant.
    available = sorted(available, key=lambda n: ("embed" not in n.lower(), n))
    shown = ", ".join(repr(n) for n in available[:6])
    more = f" (and {len(available) - 6} more)" if len(available) > 6 else ""
    return VocabularyError(
        f"tensor {tensor_name!r} not found in {where!r}; it holds {len(available)} tensors, e.g. "
        f"{shown}{more}. Pass the embedding's name as tensor_name=...")


def _safetensors_keys(path: str) -> list[str]:
    from safetensors import safe_open
    with safe_open(path, framework="numpy") as f:
        return list(f.keys())


def _safetensors_source(path: str, name: str) -> _Source:
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        sl = f.get_slice(name)
        shape = tuple(sl.get_shape())
        # safetensors >= 0.8's numpy API gives bf16 as ml_dtypes.bfloat16; read one element for it.
        dtype = sl[tuple(slice(0, 1) for _ in shape)].dtype

    def read(index):
        # Re-open per block: the file is memory-mapped, so only this block's bytes are read.
        with safe_open(path, framework="numpy") as f:
            return f.get_slice(name)[index]
    return _Source(path, name, shape, dtype, read)


def _find_in_safetensors(path: str, tensor_name: str) -> _Source:
    keys = _safetensors_keys(path)
    for name in _name_candidates(tensor_name):
        if name in keys:
            return _safetensors_source(path, name)
    raise _not_found(tensor_name, path, keys)


def _read_index(path: str) -> dict:
    try:
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise VocabularyError(f"{path!r} is not a Hugging Face index (a JSON with 'weight_map'): {e}") from e
    return weight_map


def _shard_file(index_path: str, file_name: str) -> str:
    path = os.path.join(os.path.dirname(index_path), file_name)
    if not os.path.isfile(path):
        raise VocabularyFileNotFoundError(f"{index_path!r} points to {file_name!r}, but {path!r} is missing.")
    return path


def _find_in_safetensors_index(index_path: str, tensor_name: str) -> _Source:
    weight_map = _read_index(index_path)
    for name in _name_candidates(tensor_name):
        if name in weight_map:
            return _safetensors_source(_shard_file(index_path, weight_map[name]), name)
    raise _not_found(tensor_name, index_path, list(weight_map))


def _flax_candidates(tensor_name: str) -> list[str]:
    """HF Flax keys ('a/b/embedding') for a PyTorch-style dotted name ('a.b.weight')."""
    if "/" in tensor_name:  # already a Flax path
        return [tensor_name]
    out = []
    for name in _name_candidates(tensor_name):
        parts = name.split(".")
        if parts[-1] == "weight":  # torch's nn.Embedding.weight is Flax's nn.Embed.embedding
            parts = parts[:-1]
        out += ["/".join(parts), "/".join(parts + ["embedding"])]
    return out


def _restore_flat_msgpack(path: str) -> dict[str, Any]:
    # msgpack cannot be read partially: the whole file is decoded into host memory.
    with open(path, "rb") as f:
        try:
            state = serialization.msgpack_restore(f.read())
        except Exception as e:  # msgpack raises several unrelated types on corrupt input
            raise VocabularyError(f"{path!r} is not a Flax msgpack checkpoint: {e}") from e
    # Whole-model files are nested dicts; HF's shard files are flat dicts keyed 'a/b/c': flatten both.
    return traverse_util.flatten_dict(state, sep="/") if isinstance(state, dict) else {}


def _array_source(path: str, name: str, array) -> _Source:
    array = np.asarray(array)
    return _Source(path, name, array.shape, array.dtype, lambda index: array[index])


def _find_in_flax(path: str, tensor_name: str) -> _Source:
    flat = _restore_flat_msgpack(path)
    for key in _flax_candidates(tensor_name):
        if key in flat:
            return _array_source(path, key, flat[key])
    raise _not_found(tensor_name, path, list(flat))


def _find_in_flax_index(index_path: str, tensor_name: str) -> _Source:
    weight_map = _read_index(index_path)
    for key in _flax_candidates(tensor_name):
        if key in weight_map:
            path = _shard_file(index_path, weight_map[key])
            flat = _restore_flat_msgpack(path)
            if key not in flat:
                raise VocabularyError(f"{index_path!r} maps {key!r} to {path!r}, which does not hold it.")
            return _array_source(path, key, flat[key])
    raise _not_found(tensor_name, index_path, list(weight_map))


_FINDERS = {
    SAFETENSORS_NAME: _find_in_safetensors,
    SAFETENSORS_INDEX_NAME: _find_in_safetensors_index,
    FLAX_NAME: _find_in_flax,
    FLAX_INDEX_NAME: _find_in_flax_index,
}


def _find_tensor(checkpoint_dir: str, tensor_name: str) -> _Source:
    for layout in LAYOUTS:  # safetensors first: sliceable, and the format transformers 5 writes
        path = os.path.join(checkpoint_dir, layout)
        if os.path.isfile(path):
            return _FINDERS[layout](path, tensor_name)
    raise VocabularyFileNotFoundError(
        f"no weights in {checkpoint_dir!r}: expected one of {', '.join(LAYOUTS)} "
        f"(found {sorted(os.listdir(checkpoint_dir))[:10]}).")


# ----------------------------------------------------------------------------------------------
# Loading


def _full_index(index, shape) -> tuple[slice, ...]:
    """make_array_from_callback's index with Nones resolved against the *global* (possibly cut) shape."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(n)) for s, n in zip(index, shape))


def _validate(source: _Source, config_path: str, vocab_size: int, hidden_size: int, num_tokens,
              first_row: int = 0):
    if len(source.shape) != 2:
        raise VocabularyError(
            f"tensor {source.name!r} in {source.path!r} has shape {source.shape}; an embedding "
            "table is 2-D (vocab_size, hidden_size). Pass the embedding's name as tensor_name=...")
    if source.shape != (vocab_size, hidden_size):
        raise VocabularyError(
            f"tensor {source.name!r} in {source.path!r} has shape {source.shape}, but {config_path!r} "
            f"says vocab_size={vocab_size}, hidden_size={hidden_size}.")
    if num_tokens is not None and not 0 < num_tokens <= vocab_size:
        raise VocabularyError(
            f"num_tokens={num_tokens} must be in [1, vocab_size={vocab_size}] of {config_path!r}.")
    if not 0 <= first_row <= vocab_size - (num_tokens or vocab_size):
        raise VocabularyError(
            f"first_row={first_row} with num_tokens={num_tokens} runs past vocab_size={vocab_size} of "
            f"{config_path!r}: the rows [first_row, first_row + num_tokens) must exist.")


def check_embedding_table(checkpoint_dir, *, tensor_name: str = DEFAULT_TENSOR, num_tokens: int | None = None,
                          first_row: int = 0) -> tuple[int, int]:
    """The (rows, width) `load_embedding_table` would return, from config.json and the tensor's header
    alone (no weights are read from safetensors files); raises VocabularyError as it would."""
    checkpoint_dir = os.fspath(checkpoint_dir)
    config_path = os.path.join(checkpoint_dir, CONFIG_NAME)
    vocab_size, hidden_size = _sizes_from_config(_read_config(checkpoint_dir), config_path)
    _validate(_find_tensor(checkpoint_dir, tensor_name), config_path, vocab_size, hidden_size, num_tokens, first_row)
    return (num_tokens or vocab_size), hidden_size


def load_embedding_table(checkpoint_dir, *, tensor_name: str = DEFAULT_TENSOR, sharding=None,
                         dtype=jnp.float32, num_tokens: int | None = None, first_row: int = 0) -> jax.Array:
    """The LLM's input-embedding table (num_tokens or vocab_size, hidden_size) as a jax.Array.

    Args:
      checkpoint_dir: a Hugging Face checkpoint directory (config.json + weights, see module doc).
      tensor_name: the table's name in the state dict (PyTorch-style dotted; for Flax files the
        HF Flax path is derived from it, or give one as 'model/embed_tokens/embedding').
      sharding: a jax.sharding.Sharding (e.g. `table_sharding(mesh, rules)`); each addressable
        device's block is then read from disk on its own. None: one array on the default device.
      dtype: the result's dtype (cast on the host, per block); None keeps the dtype on disk.
      num_tokens: keep only num_tokens rows (a vocabulary subset for small configs) ...
      first_row: ... starting at this row (e.g. past a tokenizer's special and unused rows).
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    config_path = os.path.join(checkpoint_dir, CONFIG_NAME)
    vocab_size, hidden_size = _sizes_from_config(_read_config(checkpoint_dir), config_path)
    source = _find_tensor(checkpoint_dir, tensor_name)
    _validate(source, config_path, vocab_size, hidden_size, num_tokens, first_row)

    shape = (num_tokens or vocab_size, hidden_size)
    out_dtype = np.dtype(dtype) if dtype is not None else source.dtype

    def read_block(index):
        rows, *rest = _full_index(index, shape)
        rows = slice(rows.start + first_row, rows.stop + first_row)
        return np.asarray(source.read((rows, *rest))).astype(out_dtype, copy=False)

    if sharding is None:
        return jax.device_put(read_block(()))
    try:
        sharding.shard_shape(shape)
    except ValueError as e:
        raise VocabularyError(
            f"the table {shape} from {checkpoint_dir!r} does not split evenly under {sharding}: "
            f"{e}. Choose num_tokens divisible by the mesh axes that shard it.") from e
    return jax.make_array_from_callback(shape, sharding, read_block)


def table_sharding(mesh, rules) -> jax.sharding.NamedSharding:
    """The NamedSharding the rules give a (vocab, llm_embed) table on this mesh."""
    from v2flow_jax.sharding import rules_for_mesh  # pylint: disable=g-import-not-at-top
    return nn.logical_to_mesh_sharding(P(*TABLE_AXES), mesh, rules_for_mesh(rules, mesh))


def load_vocabulary_words(checkpoint_dir) -> list[str] | None:
    """The token strings of a checkpoint's tokenizer, by row (tokenizer.json or vocab.txt); None if absent.

    Only for showing which words visual tokens sit near; nothing is tokenized here.
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    tok_json = os.path.join(checkpoint_dir, "tokenizer.json")
    if os.path.isfile(tok_json):
        with open(tok_json, encoding="utf-8") as f:
            vocab = json.load(f).get("model", {}).get("vocab")
        if isinstance(vocab, dict):
            words = [""] * (max(vocab.values()) + 1)
            for word, row in vocab.items():
                words[row] = word
            return words
        if isinstance(vocab, list):          # unigram: [[piece, score], ...]
            return [v[0] if isinstance(v, list) else str(v) for v in vocab]
    vocab_txt = os.path.join(checkpoint_dir, "vocab.txt")
    if os.path.isfile(vocab_txt):
        with open(vocab_txt, encoding="utf-8") as f:
            return f.read().splitlines()
    return None


# ----------------------------------------------------------------------------------------------
# The frozen table inside a linen model


class FrozenVocabulary(nn.Module):
    """Holds L as variable 'table' of the 'frozen' collection; calling it returns L.

    `init` fills it with normal(0.02) placeholders, boxed with the logical names (vocab, llm_embed)
    so `sharding.sharded_init` shards it; `install_table` then puts the real table in. Keeping it out
    of 'params' keeps it out of the optimizer by construction; stop_gradient keeps it frozen even
    when a caller differentiates w.r.t. all variables.
    """
    num_tokens: int
    dim: int
    dtype: Any = jnp.float32  # storage dtype (the release keeps an fp32 buffer)

    @nn.compact
    def __call__(self) -> jax.Array:
        if not self.is_initializing() and not self.has_variable(FROZEN, TABLE):
            raise VocabularyError(
                f"FrozenVocabulary {self.path} has no '{FROZEN}/{TABLE}': apply the model with "
                f"variables={{'params': ..., '{FROZEN}': ...}} (both collections from init).")
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), TABLE_AXES)
        # The lambda defers make_rng to init time: at apply there is no 'params' rng to draw.
        table = self.variable(FROZEN, TABLE, lambda: init(self.make_rng("params"),
                                                          (self.num_tokens, self.dim), self.dtype))
        return jax.lax.stop_gradient(table.value)


def _table_paths(variables) -> list[tuple[str, ...]]:
    frozen = variables.get(FROZEN, {}) if isinstance(variables, Mapping) else {}
    flat = traverse_util.flatten_dict(frozen) if frozen else {}
    return [(FROZEN,) + k for k in flat if k[-1] == TABLE]


def _replace_at(tree, path, fn):
    if not path:
        return fn(tree)
    head = path[0]
    new = dict(tree)
    new[head] = _replace_at(tree[head], path[1:], fn)
    return FrozenDict(new) if isinstance(tree, FrozenDict) else new


def _get_at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def install_table(variables, table, path: Sequence[str] | None = None):
    """`variables` with the loaded table at `path` (default: the only 'table' under 'frozen').

    Works on boxed (LogicallyPartitioned) or plain trees. The table takes the placeholder's sharding
    and dtype, so jitted steps compiled for the placeholder accept the result unchanged.
    """
    if path is None:
        found = _table_paths(variables)
        if len(found) != 1:
            raise VocabularyError(
                f"install_table: expected exactly one '{TABLE}' under '{FROZEN}', found "
                f"{['/'.join(p) for p in found]}; pass path=(...) to pick one.")
        path = found[0]
    path = tuple(path)
    try:
        old = _get_at(variables, path)
    except (KeyError, TypeError) as e:
        raise VocabularyError(f"install_table: no variable at {'/'.join(path)!r}.") from e

    boxed = isinstance(old, meta.AxisMetadata)
    placeholder = old.unbox() if boxed else old
    if tuple(table.shape) != tuple(placeholder.shape):
        raise VocabularyError(
            f"install_table: the table's shape {tuple(table.shape)} differs from the model's "
            f"{'/'.join(path)} {tuple(placeholder.shape)}; load it with num_tokens="
            f"{placeholder.shape[0]} or build the model with this vocabulary size.")
    target = getattr(placeholder, "sharding", None)
    if target is not None and getattr(table, "sharding", None) != target:
        table = jax.device_put(table, target)  # host or differently-placed table -> the model's layout
    table = jnp.asarray(table)
    if table.dtype != placeholder.dtype:
        table = table.astype(placeholder.dtype)
    new = old.replace_boxed(table) if boxed else table
    return _replace_at(variables, path, lambda _: new)
