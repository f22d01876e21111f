"""The cached-latent record format: one array_record record per (h, w, C) latent, stored as .npy bytes."""
from __future__ import annotations

import io
import os
from typing import Any, Iterable, Iterator

import grain
import numpy as np


def encode_latent(latent: Any) -> bytes:
    """One (h, w, C) latent as .npy bytes (float16 and float32 kept; other dtypes, e.g. bf16, -> float32)."""
    arr = np.asarray(latent)
    if arr.ndim != 3:
        raise ValueError(f"a latent must be (h, w, C), got shape {arr.shape}")
    if arr.dtype not in (np.float16, np.float32):
        arr = arr.astype(np.float32)
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(arr), allow_pickle=False)
    return buffer.getvalue()


def decode_latent(record: bytes) -> np.ndarray:
    """Inverse of encode_latent; raises ValueError on anything that is not a float (h, w, C) .npy."""
    try:
        arr = np.load(io.BytesIO(record), allow_pickle=False)
    except Exception as e:
        raise ValueError(f"not a .npy latent record ({type(e).__name__}: {e})") from e
    if arr.ndim != 3 or arr.dtype not in (np.float16, np.float32):
        raise ValueError(f"latent record has shape {arr.shape} dtype {arr.dtype}; expected float (h, w, C)")
    return arr


def write_latent_shard(path: str | os.PathLike, latents_iter: Iterable[Any]) -> int:
    """Writes latents (each (h, w, C), float16/float32) to one array_record file; returns the count.

    Every item becomes one record, in order; a caching job that wants the flip augmentation writes the
    latent of the flipped image as its own item. ``group_size:1`` keeps random access (shuffling) cheap.
    """
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

    writer = array_record_module.ArrayRecordWriter(os.fspath(path), "group_size:1")
    count = 0
    try:
        for latent in latents_iter:
            writer.write(encode_latent(latent))
            count += 1
    finally:
        writer.close()
    return count


def iterate_latent_shard(path: str | os.PathLike) -> Iterator[np.ndarray]:
    """Reads one shard back in order (for checks and tools; training uses create_dataset)."""
    records = grain.sources.ArrayRecordDataSource([os.fspath(path)])
    for i in range(len(records)):
        yield decode_latent(records[i])
