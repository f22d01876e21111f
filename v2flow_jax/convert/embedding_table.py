"""The tokenizer's vocabulary table from whichever file holds it: the one place that picks the reader.

A path ending in `.gguf` is a llama.cpp file, read by gguf_llama.py (`token_embd.weight`, dequantised
on the host); anything else is a Hugging Face checkpoint directory, read by hf_embeddings.py. Both
readers answer the same three questions, bound here to the path:

    table = embedding_table(path, tensor_name)
    table.check(num_tokens=, first_row=)            # (rows, width) from the headers alone
    table.load(sharding=, dtype=, num_tokens=, first_row=)   # the rows, read into the sharding
    table.words()                                   # the token strings by row, or None

Callers (build.py, evaluate.py) never look at the path's kind themselves.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable

from v2flow_jax.convert import gguf_llama, hf_checkpoint, hf_embeddings

# What a missing, unreadable or misfit table raises, from either reader (open_gguf raises a plain
# FileNotFoundError for a missing .gguf; the HF reader's CheckpointFileNotFoundError is a CheckpointError).
ERRORS = (hf_checkpoint.CheckpointError, gguf_llama.GGUFError, FileNotFoundError)


@dataclasses.dataclass(frozen=True)
class EmbeddingTable:
    path: str
    check: Callable     # (*, num_tokens=None, first_row=0) -> (rows, width)
    load: Callable      # (*, sharding=None, dtype=float32, num_tokens=None, first_row=0) -> jax.Array
    words: Callable     # () -> list[str] | None


def is_gguf(path) -> bool:
    return os.fspath(path).lower().endswith(".gguf")


def _check_gguf_tensor_name(path: str, tensor_name: str) -> None:
    # A GGUF holds one input embedding, under llama.cpp's name; the HF name of the same table (the config's
    # default) is accepted too, so pointing vocabulary.checkpoint at a .gguf needs no other change.
    if gguf_llama.GGUF_NAMES.get(tensor_name, tensor_name) != gguf_llama.EMBEDDING_TENSOR:
        raise gguf_llama.GGUFError(
            f"tensor_name={tensor_name!r} with the GGUF file {path!r}: a GGUF's input embedding is "
            f"{gguf_llama.EMBEDDING_TENSOR!r}, the only table read from one. Set tensor_name="
            f"{gguf_llama.EMBEDDING_TENSOR!r} (config.vocabulary.tensor_name).")


def embedding_table(path, tensor_name: str = hf_embeddings.DEFAULT_TENSOR) -> EmbeddingTable:
    """The reader for `path`: a .gguf file -> gguf_llama's, anything else -> a HF directory's (hf_embeddings)."""
    path = os.fspath(path)
    if is_gguf(path):
        _check_gguf_tensor_name(path, tensor_name)
        return EmbeddingTable(path,
                              check=functools.partial(gguf_llama.check_gguf_embedding_table, path),
                              load=functools.partial(gguf_llama.load_gguf_embedding_table, path),
                              words=functools.partial(gguf_llama.load_gguf_vocabulary_words, path))
    return EmbeddingTable(path,
                          check=functools.partial(hf_embeddings.check_embedding_table, path, tensor_name=tensor_name),
                          load=functools.partial(hf_embeddings.load_embedding_table, path, tensor_name=tensor_name),
                          words=functools.partial(hf_embeddings.load_vocabulary_words, path))
