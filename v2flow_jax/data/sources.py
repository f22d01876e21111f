"""Random-access sources for grain: the demo photos, image folders, tfds array_record sets, cached latents.

Each raw source maps an index to (key, payload); `DecodingSource` turns that into a cropped uint8 image (or
None plus the reason it was skipped) inside grain's read threads, and `LatentSource` decodes latent records.
The `config.data` fields they read are the ones in `settings.DEFAULTS`.
"""
from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any, Sequence

import grain
import numpy as np
from absl import logging
from PIL import Image

from v2flow_jax.data import settings
from v2flow_jax.data.decoding import REASON_INDEX, REASONS, BadImageError, adm_center_crop, open_image, to_rgb
from v2flow_jax.data.latent_records import decode_latent

# The demo photos that are grayscale (config.data.demo_grayscale=False leaves them out of training).
DEMO_GRAYSCALE = ("camera", "moon", "coins", "clock", "horse", "text", "cell", "brick", "grass", "gravel")

# Demo photos: (package, file inside the package, name). scikit-image ships these in its wheel (its
# other samples are fetched with pooch, so unusable offline); sklearn and matplotlib ones are used only
# when installed. Read as files through the normal decoder: no skimage import in the read threads.
DEMO_FILES = tuple(("skimage", f"data/{file}", name) for name, file in (
    ("astronaut", "astronaut.png"), ("chelsea", "chelsea.png"), ("coffee", "coffee.png"),
    ("rocket", "rocket.jpg"), ("hubble_deep_field", "hubble_deep_field.jpg"), ("retina", "retina.jpg"),
    ("immunohistochemistry", "ihc.png"), ("motorcycle_left", "motorcycle_left.png"),
    ("colorwheel", "color.png"), ("camera", "camera.png"), ("moon", "moon.png"), ("coins", "coins.png"),
    ("clock", "clock_motion.png"), ("horse", "horse.png"), ("text", "text.png"), ("cell", "cell.png"),
    ("brick", "brick.png"), ("grass", "grass.png"), ("gravel", "gravel.png"),
)) + (
#     ("sklearn", "datasets/images/china.jpg", "china"),
    ("sklearn", "datasets/images/flower.jpg", "flower"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "grace_hopper"),
)



class ListSource:
    """(key, payload) pairs held in a list: the folder and demo sources."""

    def __init__(self, entries: Sequence[tuple[str, Any]]):
        self._entries = list(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> tuple[str, Any]:
        return self._entries[index]

    def __repr__(self) -> str:
        return f"ListSource({len(self._entries)} entries)"


class TfdsImages:
    """Encoded image bytes from a tfds array_record data source (tfds' own decoding is skipped)."""

    def __init__(self, source: Any, image_key: str, name: str):
        self._source = source
        self._image_key = image_key
        self._name = name

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> tuple[str, Any]:
        key = f"{self._name}[{index}]"
        try:
            return key, self._source[index][self._image_key]
        except Exception as e:  # a record that does not even parse: the decoder reports it
            return key, UnparsedRecord(f"{type(e).__name__}: {e}")

    def __repr__(self) -> str:
        return f"TfdsImages({self._name}, {len(self)} records)"


@dataclasses.dataclass(frozen=True)
class UnparsedRecord:
    detail: str


MEMO_MAX_RECORDS = 64


class DecodingSource:
    """Wraps a raw source: index -> {"image": uint8 (S,S,3) or None, "_counts": int32 per reason}."""

    def __init__(self, raw: Any, image_size: int, strict: bool, center_crop: bool = True,
                 min_crop_scale: float = 1.0):
        self._raw = raw
        self._size = image_size
        self._strict = strict
        self._center_crop = center_crop   # False: the whole RGB image (a random crop follows) ...
        # ... box-halved while even the smallest crop would keep >= 2x the output's pixels a side.
        self._keep_short_side = image_size / min_crop_scale
        # A handful of whole photos (the demo) are decoded once and kept: decoding them again for every
        # random crop cost more than the training step on 2 cores.
        self._memo: dict[int, dict[str, Any]] | None = {} if not center_crop and len(raw) <= MEMO_MAX_RECORDS \
            else None

    def __len__(self) -> int:
        return len(self._raw)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._memo is not None and index in self._memo:
            return dict(self._memo[index])
        element = self._decode(index)
        if self._memo is not None:
            self._memo[index] = element
        return dict(element)

    def _decode(self, index: int) -> dict[str, Any]:
        key, payload = self._raw[index]
        counts = np.zeros(len(REASONS), np.int32)
        try:
            if isinstance(payload, UnparsedRecord):
                raise BadImageError("corrupt", key, payload.detail)
            img, notes = to_rgb(open_image(payload, key), key)
            if min(img.size) < self._size:
                notes.add("upscaled")
            if self._center_crop:
                image = adm_center_crop(img, self._size)
            else:
                img = img if img.mode == "RGB" else img.convert("RGB")
                while min(img.size) >= 2 * self._keep_short_side:
                    img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
                image = np.asarray(img)
        except BadImageError as e:
            if self._strict:
                raise
            logging.warning("Skipping %s (config.data.strict=False).", e)
            counts[REASON_INDEX[e.reason]] = 1
            return {"image": None, "_counts": counts}
        for note in notes:
            counts[REASON_INDEX[note]] = 1
        return {"image": image, "_counts": counts}

    def __repr__(self) -> str:
        return f"DecodingSource({self._raw!r}, image_size={self._size}, strict={self._strict})"


class LatentSource:
    """Decodes write_latent_shard records: index -> {"latent": float32 (h,w,C) or None, "_counts"}."""

    def __init__(self, paths: Sequence[str], strict: bool):
        self._paths = list(paths)
        self._strict = strict
        self._records = grain.sources.ArrayRecordDataSource(self._paths)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        counts = np.zeros(len(REASONS), np.int32)
        try:
            latent = decode_latent(self._records[index]).astype(np.float32)
        except ValueError as e:
            if self._strict:
                raise ValueError(f"latent record {index} of {self._paths}: {e}") from e
            logging.warning("Skipping latent record %d of %s: %s", index, self._paths, e)
            counts[REASON_INDEX["corrupt"]] = 1
            return {"latent": None, "_counts": counts}
        return {"latent": latent, "_counts": counts}

    def __repr__(self) -> str:
        return f"LatentSource({len(self._paths)} files, {len(self)} records)"


def demo_photos() -> dict[str, str]:
    """The demo photos available offline: name -> file path."""
    import importlib.util  # pylint: disable=g-import-not-at-top

    photos = {}
    for package, relpath, name in DEMO_FILES:
        # find_spec locates the package without importing it (sklearn's import is slow).
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        path = os.path.join(list(spec.submodule_search_locations)[0], relpath)
        if os.path.isfile(path):
            photos[name] = path
    return photos


def _image_extensions() -> frozenset[str]:
    Image.init()
    return frozenset(ext.lower() for ext in Image.registered_extensions())


def list_image_files(root: str) -> list[str]:
    """Files under ``root`` (recursive, sorted, hidden entries skipped) with an extension PIL knows."""
    extensions = _image_extensions()
    files, ignored = [], 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() in extensions:
                files.append(os.path.join(dirpath, name))
            else:
                ignored += 1
    if ignored:
        logging.info("%s: ignored %d files whose extension is not an image format.", root, ignored)
    return sorted(files)


def folder_entries(config_data: Any, split: str) -> tuple[list[tuple[str, str]], str]:
    field = "path" if split == "train" else "eval_path"
    root = settings.field(config_data, field)
    if split == "eval" and root is None:
        root = settings.field(config_data, "path")
        field = "path"
        logging.warning("config.data.eval_path is not set: evaluating on the training folder %s.", root)
    if root is None:
        raise ValueError("config.data.path is not set: source 'folder' needs a directory of images, "
                         "e.g. --config.data.path=/data/imagenet/train")
    root = os.path.expanduser(os.fspath(root))
    if root.endswith(".jsonl"):
        # A text-image pairs file (data/pairs.py): its images, in its order (a tokenizer for the LLM stage
        # trains on the same split of the pairs the LLM is fine-tuned on).
        from v2flow_jax.data.pairs import read_pairs
        files = [pair.image_path for pair in read_pairs(root)]
        if not files:
            raise ValueError(f"config.data.{field}={root!r} lists no pairs; give a JSONL with one "
                             '{"image": ..., "caption": ...} object a line, or a folder of images.')
        return [(f, f) for f in files], root
    if not os.path.isdir(root):
        raise ValueError(f"config.data.{field}={root!r} does not exist or is not a directory; point it at "
                         f"a folder of images (searched recursively) or a pairs .jsonl.")
    files = list_image_files(root)
    if not files:
        raise ValueError(f"config.data.{field}={root!r} contains no image files (looked recursively for "
                         f"extensions PIL knows, e.g. .jpg .jpeg .png .webp .bmp).")
    return [(f, f) for f in files], root


def demo_split_names(config_data: Any, split: str) -> list[str]:
    """Names of the demo photos in ``split`` ('train' or 'eval'), in a fixed order."""
    photos = demo_photos()
    eval_names = tuple(settings.field(config_data, "demo_eval_names"))
    unknown = [n for n in eval_names if n not in photos]
    if unknown:
        raise ValueError(f"config.data.demo_eval_names has {unknown} which are not available demo photos; "
                         f"choose from {sorted(photos)}.")
    names = [n for n in photos if (n in eval_names) == (split == "eval")]
    if split == "train" and not settings.field(config_data, "demo_grayscale"):
        names = [n for n in names if n not in DEMO_GRAYSCALE]
    if not names:
        raise ValueError(f"config.data.demo_eval_names={eval_names} leaves no photos for split {split!r}.")
    return names


def tfds_source(config_data: Any, split: str) -> tuple[TfdsImages, str]:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow; tfds only)

    name = settings.field(config_data, "tfds_name")
    data_dir = settings.field(config_data, "tfds_data_dir")
    split_field = "train_split" if split == "train" else "eval_split"
    tfds_split = settings.field(config_data, split_field)
    image_key = settings.field(config_data, "tfds_image_key")
    try:
        source = tfds.data_source(name, split=tfds_split, data_dir=data_dir, download=False,
                                  decoders={image_key: tfds.decode.SkipDecoding()})
    except Exception as e:
        raise ValueError(
            f"tfds could not open config.data.tfds_name={name!r} split config.data.{split_field}="
            f"{tfds_split!r} in config.data.tfds_data_dir={data_dir!r} ({type(e).__name__}: {e}). Prepare "
            f"it first in array_record format, e.g. `tfds build {name} --file_format=array_record "
            f"--data_dir=DIR` (imagenet2012 needs the manually downloaded tars in DIR/downloads/manual), "
            f"and set config.data.tfds_data_dir=DIR.") from e
    features = getattr(getattr(source, "dataset_info", None), "features", None)
    if features is not None and image_key not in features.keys():
        raise ValueError(f"config.data.tfds_image_key={image_key!r} is not a feature of {name!r}; "
                         f"features: {sorted(features.keys())}.")
    return TfdsImages(source, image_key, f"{name}:{tfds_split}"), f"tfds {name}:{tfds_split}"


def latent_paths(config_data: Any, split: str) -> list[str]:
    field = "path" if split == "train" else "eval_path"
    pattern = settings.field(config_data, field)
    if split == "eval" and pattern is None:
        field, pattern = "path", settings.field(config_data, "path")
        logging.warning("config.data.eval_path is not set: evaluating on the training latents %s.", pattern)
    if pattern is None:
        raise ValueError("config.data.path is not set: source 'latents' needs a glob of array_record "
                         "shards from write_latent_shard, e.g. '/cache/latents/train-*.array_record'.")
    matched = sorted(glob.glob(os.path.expanduser(os.fspath(pattern))))
    # The caching job writes .parts.json / .done.json beside its parts: a glob like 'train-*' takes them too.
    paths = [p for p in matched if p.endswith(".array_record")]
    if len(paths) < len(matched):
        logging.info("config.data.%s=%r: ignoring %d matched files that are not .array_record parts.", field,
                     pattern, len(matched) - len(paths))
    if not paths:
        raise ValueError(f"config.data.{field}={pattern!r} matches no .array_record files; expected a glob of the "
                         f"shards written by write_latent_shard (run the latent caching job first).")
    return paths


