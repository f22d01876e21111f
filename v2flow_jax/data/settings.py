"""The `config.data` section: every field with its default (the only copy) and its validation."""
from __future__ import annotations

from typing import Any

import numpy as np

SOURCES = ("demo", "folder", "tfds", "latents")
SPLITS = ("train", "eval")

# config_defaults.base_config reads it. "" means not set (ConfigDict fields keep one type, so unset
# paths are empty strings).
DEFAULTS = dict(
    source="tfds",              # tfds | folder | demo | latents (cache_latents' array_record parts)
    path="",                    # folder / latents: the training directory (folder: or a pairs .jsonl)
    eval_path="",               # folder / latents: the evaluation directory or .jsonl ("" = the training one)
    tfds_name="imagenet2012",
    tfds_data_dir="",
    tfds_image_key="image",
    train_split="train",
    eval_split="validation",
    image_size=256,
    strict=False,               # True: a bad image file stops the run (default: skip it, count it)
    worker_count=8,             # grain worker processes (0 = decode in the main process)
    read_threads=16,
    prefetch_buffer_size=None,  # None: 2 * max(batch_size, read_threads) decoded images ahead
    demo_eval_names=("astronaut", "coffee", "chelsea"),
    demo_grayscale=True,
    # () = ADM centre crop; (lo, hi) = random square crops of lo..hi of the short side (training only)
    random_crop_scale=(),
)


def field(config_data: Any, name: str) -> Any:
    value = config_data.get(name, None) if hasattr(config_data, "get") else getattr(config_data, name, None)
    # Configs spell "not set" as None or "" (ConfigDict fields keep one type, so paths default to "").
    if value is None or (isinstance(value, str) and not value):
        value = DEFAULTS[name]
    return None if isinstance(value, str) and not value else value



def validate_data_config(config_data: Any) -> None:
    """Checks the fields every source shares; raises ValueError naming the field."""
    source = field(config_data, "source")
    if source not in SOURCES:
        raise ValueError(f"config.data.source={source!r} is not one of {SOURCES}.")
    size = field(config_data, "image_size")
    if source != "latents" and (not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size <= 0):
        raise ValueError(f"config.data.image_size={size!r} must be a positive integer (pixels).")
    workers = field(config_data, "worker_count")
    if not isinstance(workers, (int, np.integer)) or workers < 0:
        raise ValueError(f"config.data.worker_count={workers!r} must be an integer >= 0 "
                         f"(0 = decode in this process).")
    scale = tuple(field(config_data, "random_crop_scale") or ())
    if scale and not (len(scale) == 2 and 0.0 < scale[0] <= scale[1] <= 1.0):
        raise ValueError(f"config.data.random_crop_scale={scale!r} must be () (the ADM centre crop) or "
                         f"(min, max) with 0 < min <= max <= 1: the crop side as a fraction of the short side.")
    for name in ("read_threads", "prefetch_buffer_size"):
        value = field(config_data, name)
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 0):
            raise ValueError(f"config.data.{name}={value!r} must be an integer >= 0.")

