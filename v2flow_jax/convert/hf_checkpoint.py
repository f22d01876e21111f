"""Hugging Face checkpoint directories as `save_pretrained` writes them (transformers 5): reading only.

  - `config.json`                                                        the model config
  - `model.safetensors`                                                  (one file)
  - `model.safetensors.index.json` + `model-0000i-of-0000n.safetensors`   (the index says which file)

`find_tensor(dir, name)` returns a `TensorSource` (file, shape, dtype and a `read(index)` of any block:
safetensors slices are memory-mapped reads, so a device's shard is read without the rest). Shared by the
vocabulary reader (`hf_embeddings.py`) and the LLaMA loader (`hf_llama.py`). The Flax msgpack layout of
transformers < 5 is not read: no current tool writes it.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Sequence

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
LAYOUTS = (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME)  # by preference


class CheckpointError(ValueError):
    """A checkpoint file is malformed or lacks what was asked for."""


class CheckpointFileNotFoundError(CheckpointError, FileNotFoundError):
    """A directory or file the loader needs is missing."""


def read_config(checkpoint_dir: str) -> dict:
    if not os.path.isdir(checkpoint_dir):
        raise CheckpointFileNotFoundError(
            f"LLM checkpoint directory {checkpoint_dir!r} does not exist (expected a Hugging Face "
            f"checkpoint directory with {CONFIG_NAME} and {SAFETENSORS_NAME} or its index).")
    path = os.path.join(checkpoint_dir, CONFIG_NAME)
    if not os.path.isfile(path):
        raise CheckpointFileNotFoundError(
            f"{path!r} is missing: a Hugging Face checkpoint directory needs its {CONFIG_NAME} "
            "(vocab_size, hidden_size) next to the weights.")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path!r} is not valid JSON: {e}") from e


class TensorSource:
    def __init__(self, path: str, name: str, shape: Sequence[int], dtype, read: Callable):
        self.path, self.name, self.shape, self.dtype, self.read = path, name, tuple(shape), dtype, read


def name_candidates(tensor_name: str) -> list[str]:
    # A base-model checkpoint (LlamaModel rather than LlamaForCausalLM) drops HF's "model." prefix.
    names = [tensor_name]
    if tensor_name.startswith("model."):
        names.append(tensor_name[len("model."):])
    return names


def not_found(tensor_name: str, where: str, available: Sequence[str]) -> CheckpointError:
    # Embedding-looking names first: they are what the user most likely meant.
    available = sorted(available, key=lambda n: ("embed" not in n.lower(), n))
    shown = ", ".join(repr(n) for n in available[:6])
    more = f" (and {len(available) - 6} more)" if len(available) > 6 else ""
    return CheckpointError(
        f"tensor {tensor_name!r} not found in {where!r}; it holds {len(available)} tensors, e.g. "
        f"{shown}{more}. Pass the embedding's name as tensor_name=...")


def safetensors_keys(path: str) -> list[str]:
    from safetensors import safe_open
    with safe_open(path, framework="numpy") as f:
        return list(f.keys())


def safetensors_source(path: str, name: str) -> TensorSource:
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
    return TensorSource(path, name, shape, dtype, read)


def find_in_safetensors(path: str, tensor_name: str) -> TensorSource:
    keys = safetensors_keys(path)
    for name in name_candidates(tensor_name):
        if name in keys:
            return safetensors_source(path, name)
    raise not_found(tensor_name, path, keys)


def read_index(path: str) -> dict:
    try:
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path!r} is not a Hugging Face index (a JSON with 'weight_map'): {e}") from e
    return weight_map


def shard_file(index_path: str, file_name: str) -> str:
    path = os.path.join(os.path.dirname(index_path), file_name)
    if not os.path.isfile(path):
        raise CheckpointFileNotFoundError(f"{index_path!r} points to {file_name!r}, but {path!r} is missing.")
    return path


def find_in_safetensors_index(index_path: str, tensor_name: str) -> TensorSource:
    weight_map = read_index(index_path)
    for name in name_candidates(tensor_name):
        if name in weight_map:
            return safetensors_source(shard_file(index_path, weight_map[name]), name)
    raise not_found(tensor_name, index_path, list(weight_map))


FINDERS = {
    SAFETENSORS_NAME: find_in_safetensors,
    SAFETENSORS_INDEX_NAME: find_in_safetensors_index,
}


def find_tensor(checkpoint_dir: str, tensor_name: str) -> TensorSource:
    for layout in LAYOUTS:  # safetensors first: sliceable, and the format transformers 5 writes
        path = os.path.join(checkpoint_dir, layout)
        if os.path.isfile(path):
            return FINDERS[layout](path, tensor_name)
    found = sorted(os.listdir(checkpoint_dir))
    legacy = ("; flax_model.msgpack (transformers < 5) is not read: re-save the model with transformers' "
              "save_pretrained, which writes safetensors" if any(f.startswith("flax_model") for f in found) else "")
    raise CheckpointFileNotFoundError(
        f"no weights in {checkpoint_dir!r}: expected one of {', '.join(LAYOUTS)} (found {found[:10]}){legacy}.")


def full_index(index, shape) -> tuple[slice, ...]:
    """make_array_from_callback's index with Nones resolved against the *global* (possibly cut) shape."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(n)) for s, n in zip(index, shape))
