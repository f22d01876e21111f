"""Reading an LLM's input-embedding table from a Hugging Face checkpoint directory.

The layouts `save_pretrained` writes today (transformers 5):
  - `model.safetensors`                                                  (one file)
  - `model.safetensors.index.json` + `model-0000i-of-0000n.safetensors`   (the index says which file)
validated against `config.json` (`vocab_size`, `hidden_size`; under `text_config` for multimodal
configs). With a `sharding` each device's block is read from disk on its own (safetensors slices
are memory-mapped reads), so the full table never exists on one device: a 32000 x 4096 fp32 table
(512 MB) is cheap on a pod. `check_embedding_table` answers the same questions from the headers
alone, before anything is allocated. The Flax msgpack layout of transformers < 5 is not read: no
current tool writes it (convert such a checkpoint with transformers 4 `save_pretrained` to safetensors).

models/vocabulary.py holds the table inside the model (`FrozenVocabulary`, `install_table`).
"""
from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_TENSOR = "model.embed_tokens.weight"

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
LAYOUTS = (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME)  # by preference


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


_FINDERS = {
    SAFETENSORS_NAME: _find_in_safetensors,
    SAFETENSORS_INDEX_NAME: _find_in_safetensors_index,
}


def _find_tensor(checkpoint_dir: str, tensor_name: str) -> _Source:
    for layout in LAYOUTS:  # safetensors first: sliceable, and the format transformers 5 writes
        path = os.path.join(checkpoint_dir, layout)
        if os.path.isfile(path):
            return _FINDERS[layout](path, tensor_name)
    found = sorted(os.listdir(checkpoint_dir))
    legacy = ("; flax_model.msgpack (transformers < 5) is not read: re-save the model with transformers' "
              "save_pretrained, which writes safetensors" if any(f.startswith("flax_model") for f in found) else "")
    raise VocabularyFileNotFoundError(
        f"no weights in {checkpoint_dir!r}: expected one of {', '.join(LAYOUTS)} (found {found[:10]}){legacy}.")


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
      tensor_name: the table's name in the state dict (PyTorch-style dotted, as safetensors store it).
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
