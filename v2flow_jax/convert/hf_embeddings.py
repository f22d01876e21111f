"""Reading an LLM's input-embedding table from a Hugging Face checkpoint directory.

The layouts are hf_checkpoint.py's (one safetensors file, or an index and its shards); the table is
validated against `config.json` (`vocab_size`, `hidden_size`; under `text_config` for multimodal
configs). With a `sharding` each device's block is read from disk on its own (safetensors slices
are memory-mapped reads), so the full table never exists on one device: a 32000 x 4096 fp32 table
(512 MB) is cheap on a pod. `check_embedding_table` answers the same questions from the headers
alone, before anything is allocated.

`check_rows` and `place_table` are shared with the GGUF reader (gguf_llama.py); embeddings.py picks
between the two readers. models/vocabulary.py holds the table inside the model (`FrozenVocabulary`,
`install_table`).
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from v2flow_jax.convert import hf_checkpoint

DEFAULT_TENSOR = "model.embed_tokens.weight"

class VocabularyError(hf_checkpoint.CheckpointError):
    """The table does not match what was asked for (shape, rows, config.json's sizes). Unreadable or
    missing files raise hf_checkpoint.CheckpointError / CheckpointFileNotFoundError, its base."""


# ----------------------------------------------------------------------------------------------
# config.json


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
    config = hf_checkpoint.read_config(checkpoint_dir)
    return _sizes_from_config(config, os.path.join(checkpoint_dir, hf_checkpoint.CONFIG_NAME))


# ----------------------------------------------------------------------------------------------
# Loading


def check_rows(vocab_size: int, num_tokens: int | None, first_row: int, where: str,
               error: type[Exception] = VocabularyError) -> int:
    """The number of rows asked for, once [first_row, first_row + num_tokens) is known to exist in a table of
    vocab_size rows. Shared with the GGUF reader, which passes its own exception class as `error`."""
    if num_tokens is not None and not 0 < num_tokens <= vocab_size:
        raise error(f"num_tokens={num_tokens} must be in [1, vocab_size={vocab_size}] of {where!r}.")
    rows = num_tokens or vocab_size
    if not 0 <= first_row <= vocab_size - rows:
        raise error(f"first_row={first_row} with num_tokens={rows} runs past vocab_size={vocab_size} of {where!r}: "
                    f"rows [{first_row}, {first_row + rows}) do not exist.")
    return rows


def _validate(source: hf_checkpoint.TensorSource, config_path: str, vocab_size: int, hidden_size: int,
              num_tokens, first_row: int = 0):
    if len(source.shape) != 2:
        raise VocabularyError(
            f"tensor {source.name!r} in {source.path!r} has shape {source.shape}; an embedding "
            "table is 2-D (vocab_size, hidden_size). Pass the embedding's name as tensor_name=...")
    if source.shape != (vocab_size, hidden_size):
        raise VocabularyError(
            f"tensor {source.name!r} in {source.path!r} has shape {source.shape}, but {config_path!r} "
            f"says vocab_size={vocab_size}, hidden_size={hidden_size}.")
    check_rows(vocab_size, num_tokens, first_row, config_path)


def check_embedding_table(checkpoint_dir, *, tensor_name: str = DEFAULT_TENSOR, num_tokens: int | None = None,
                          first_row: int = 0) -> tuple[int, int]:
    """The (rows, width) `load_embedding_table` would return, from config.json and the tensor's header
    alone (no weights are read from safetensors files); raises VocabularyError as it would."""
    checkpoint_dir = os.fspath(checkpoint_dir)
    config_path = os.path.join(checkpoint_dir, hf_checkpoint.CONFIG_NAME)
    vocab_size, hidden_size = _sizes_from_config(hf_checkpoint.read_config(checkpoint_dir), config_path)
    _validate(hf_checkpoint.find_tensor(checkpoint_dir, tensor_name), config_path, vocab_size, hidden_size,
              num_tokens, first_row)
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
    config_path = os.path.join(checkpoint_dir, hf_checkpoint.CONFIG_NAME)
    vocab_size, hidden_size = _sizes_from_config(hf_checkpoint.read_config(checkpoint_dir), config_path)
    source = hf_checkpoint.find_tensor(checkpoint_dir, tensor_name)
    _validate(source, config_path, vocab_size, hidden_size, num_tokens, first_row)

    shape = (num_tokens or vocab_size, hidden_size)
    out_dtype = np.dtype(dtype) if dtype is not None else source.dtype

    def read_block(index):
        rows, *rest = hf_checkpoint.full_index(index, shape)
        rows = slice(rows.start + first_row, rows.stop + first_row)
        return np.asarray(source.read((rows, *rest))).astype(out_dtype, copy=False)

    return place_table(shape, read_block, sharding, checkpoint_dir)


def place_table(shape: tuple[int, int], read_block, sharding, where: str) -> jax.Array:
    """The table as one jax.Array: `read_block(index)` per addressable device under `sharding` (so no device
    holds more than its block), or the whole table on the default device when sharding is None."""
    if sharding is None:
        return jax.device_put(read_block(()))
    try:
        sharding.shard_shape(shape)
    except ValueError as e:
        raise VocabularyError(
            f"the table {shape} from {where!r} does not split evenly under {sharding}: "
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
