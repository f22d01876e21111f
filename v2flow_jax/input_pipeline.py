"""Grain input pipelines for the V2Flow tokenizer: pixels from tfds / folders / demo photos, or cached latents.

Entry point::

    iterator, num_examples = create_dataset(config.data, split="train", batch_size=per_host_batch,
                                            seed=config.seed, train=True)
    batch = next(iterator)        # {"image": float32 (B, S, S, 3) in [-1, 1]}  (or {"latent": ...})
    state = iterator.get_state()  # bytes; iterator.set_state(state) resumes with the same batches
    iterator.stats                # PipelineStats: files skipped / converted, per reason

Sources (``config.data.source``):
  * ``demo``    photos bundled with scikit-image (plus scikit-learn's china/flower and matplotlib's
                grace_hopper when those packages happen to be installed); no download. The photos named
                in ``config.data.demo_eval_names`` form split 'eval', the rest split 'train'.
  * ``folder``  every file under ``config.data.path`` (recursive, sorted) whose extension PIL knows;
                split 'eval' reads ``config.data.eval_path`` (or, if unset, ``path`` with a warning).
  * ``tfds``    ``tfds.data_source(config.data.tfds_name, data_dir=config.data.tfds_data_dir)``: a
                dataset already prepared in array_record format (``tfds build ... --file_format=array_record``).
                Images are decoded here with PIL, not by tfds, so bad files are handled like any other.
  * ``latents`` array_record shards written by ``write_latent_shard`` (glob in ``config.data.path``, or
                ``eval_path`` for split 'eval'); yields ``{"latent": float32 (B, h, w, C)}``, no flipping
                (the caching job stores the flipped copy as its own record).

Pixel transform (guided-diffusion's "ADM" centre crop, as the official release uses): while the short
side is >= 2S halve the image with a box filter, bicubic-resize so the short side is S, centre-crop SxS;
then a random horizontal flip when ``train=True``. With ``config.data.random_crop_scale=(lo, hi)`` training
takes instead a random square crop of U(lo, hi) times the short side, anywhere in the image, resized to
SxS (many distinct views of few photos: the demo); evaluation keeps the centre crop. After either, (deterministic: the rng comes from the seed and the
record's position in the stream), and scale uint8 to float32 ``x / 127.5 - 1``.

Bad data never stops a run (unless ``config.data.strict``): a file PIL cannot identify, a truncated or
corrupt file, or an unreadable path is skipped with a warning and counted; odd but usable images are
converted and counted (see ``SKIP_REASONS`` / ``CONVERT_REASONS``). Decoding happens inside the data
source, so it runs in grain's read threads (PIL releases the GIL) and, with ``worker_count > 0``, in the
worker processes; failed records become ``None`` images that a grain ``Filter`` drops. The counts travel
with the surviving elements through workers and batching, so ``iterator.stats`` is right in the main
process whatever the worker count. Counts are occurrences (a bad file is counted once per epoch) over
the batches delivered: elements in a dropped final partial batch are not counted, nor, with
``worker_count > 0``, skips after a worker's last good element of an epoch-limited run. EXIF orientation
is not applied (as in ADM / the ImageNet convention).

Sharding: every host uses the same seed and reads its own shard (``ShardOptions(process_index,
process_count, drop_remainder=True)``: grain gives each host a consecutive block of records and shuffles
within it, per epoch), so per-host record counts match. Training repeats forever;
evaluation is one epoch, dropping the last partial batch unless ``drop_remainder=False``. Skipped files
can leave hosts with different numbers of eval batches: a multi-host eval loop must agree on when to
stop (e.g. all-gather a "has batch" flag) rather than assume equal counts.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import io
import os
from typing import Any, Iterable, Iterator, Sequence

from absl import flags
from absl import logging
import grain
import numpy as np
from PIL import Image, ImageOps

SOURCES = ("demo", "folder", "tfds", "latents")
SPLITS = ("train", "eval")

# Why a file was skipped.
SKIP_REASONS = (
    "unsupported",  # PIL cannot identify it (not an image, unknown format) or its pixel mode is unusable
    "truncated",  # the file ends early
    "corrupt",  # the decoder failed on the data (broken stream, bad chunks, zero size ...)
    "unreadable",  # the path could not be read (vanished, permissions)
)
# What was done to a usable image on the way to uint8 RGB.
CONVERT_REASONS = (
    "grayscale",  # one channel (L, 1-bit, 16-bit grey) replicated to RGB
    "alpha",  # an alpha channel (RGBA, LA, transparent palette) composited on WHITE, then dropped
    "palette",  # a palette (P) image expanded to RGB
    "16bit",  # 16 bits per channel scaled to 8 (grey: round(v / 257); RGB: PIL keeps the high byte)
    "cmyk",  # CMYK converted to RGB by PIL
    "other_mode",  # any other PIL mode (YCbCr, LAB, HSV, RGBX ...) converted to RGB by PIL
    "upscaled",  # short side smaller than image_size: the bicubic resize enlarges it
    "oriented",  # an EXIF orientation tag (a camera's rotated JPEG): the pixels turned upright
)
_REASONS = SKIP_REASONS + CONVERT_REASONS
_REASON_INDEX = {r: i for i, r in enumerate(_REASONS)}

# config.data fields this module reads, with the values used when a field is absent.
# The config.data section: every field with its default, the only copy (config_defaults.base_config
# reads it). "" means not set (ConfigDict fields keep one type, so unset paths are empty strings).
DEFAULTS = dict(
    source="tfds",              # tfds | folder | demo | latents (cache_latents' array_record parts)
    path="",                    # folder / latents: the training directory
    eval_path="",               # folder / latents: the evaluation directory ("" = the training one)
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

# The demo photos that are grayscale (config.data.demo_grayscale=False leaves them out of training).
DEMO_GRAYSCALE = ("camera", "moon", "coins", "clock", "horse", "text", "cell", "brick", "grass", "gravel")

# Demo photos: (package, file inside the package, name). scikit-image ships these in its wheel (its
# other samples are fetched with pooch, so unusable offline); sklearn and matplotlib ones are used only
# when installed. Read as files through the normal decoder: no skimage import in the read threads.
_DEMO_FILES = tuple(("skimage", f"data/{file}", name) for name, file in (
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


class BadImageError(ValueError):
    """A record that cannot be turned into an RGB image; ``reason`` is one of SKIP_REASONS."""

    def __init__(self, reason: str, key: str, detail: str):
        assert reason in SKIP_REASONS, reason
        self.reason = reason
        self.key = key
        super().__init__(f"{key}: {reason} image ({detail})")


@dataclasses.dataclass
class PipelineStats:
    """What an iterator has skipped and converted so far (occurrences in delivered batches)."""

    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    converted: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: int = 0  # examples delivered in batches

    def add_counts(self, counts: np.ndarray) -> None:
        for reason, n in zip(_REASONS, np.asarray(counts).reshape(-1, len(_REASONS)).sum(0).tolist()):
            if n:
                (self.skipped if reason in SKIP_REASONS else self.converted)[reason] += int(n)

    def as_dict(self) -> dict:
        """For metrics.json: examples delivered and files skipped / converted, per reason."""
        return {"examples": int(self.examples), "skipped": dict(self.skipped), "converted": dict(self.converted)}

    def summary(self) -> str:
        return (f"{self.examples} examples; skipped {dict(self.skipped) or 'none'}; "
                f"converted {dict(self.converted) or 'none'}")


# ----------------------------------------------------------------------------------------------------
# Decoding and the ADM crop.


def adm_center_crop(pil_image: Image.Image, size: int) -> np.ndarray:
    """Guided-diffusion's centre crop: box-halve while the short side >= 2*size, bicubic to size, crop.

    Returns a uint8 array (size, size, 3). Images smaller than ``size`` are enlarged by the bicubic step.
    """
    img = pil_image if pil_image.mode == "RGB" else pil_image.convert("RGB")
    # Halving with a box filter first avoids the aliasing a single big bicubic downscale would cause.
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return np.ascontiguousarray(arr[top:top + size, left:left + size])


def random_resized_crop(image: np.ndarray, size: int, scale: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """A random square crop whose side is U(scale) times the short side, resized to size x size.

    Bicubic with PIL's `reducing_gap` (a box reduction first on large downscales, like the ADM crop's
    halving). Returns uint8 (size, size, 3).
    """
    h, w = image.shape[:2]
    side = max(1, int(round(min(h, w) * rng.uniform(scale[0], scale[1]))))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    img = Image.fromarray(image)
    out = img.resize((size, size), resample=Image.BICUBIC, box=(left, top, left + side, top + side),
                     reducing_gap=2.0)
    return np.ascontiguousarray(np.asarray(out))


def _raw_mode(img: Image.Image) -> str:
    """The decoder's raw mode before load(), e.g. 'RGB;16B' for a 48-bit PNG that PIL opens as 'RGB'."""
    try:
        args = img.tile[0][3]
    except (IndexError, TypeError, AttributeError):
        return ""
    if isinstance(args, str):
        return args
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return ""


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
    alpha = rgba[..., 3:] / 255.0
    rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
    return Image.fromarray(np.round(rgb).astype(np.uint8), "RGB")


EXIF_ORIENTATION = 0x0112


def _upright(img: Image.Image, notes: set[str]) -> Image.Image:
    """Applies an EXIF orientation tag: cameras store rotated JPEGs and only tag which way is up."""
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a malformed EXIF block: keep the stored orientation rather than lose the image
        return img
    if orientation in (None, 1):
        return img
    notes.add("oriented")
    return ImageOps.exif_transpose(img)


def _to_rgb(img: Image.Image, key: str) -> tuple[Image.Image, set[str]]:
    """Decodes a lazily opened PIL image to mode RGB; returns it with the conversions applied."""
    notes = set()
    if ";16" in _raw_mode(img):
        notes.add("16bit")
    try:
        img.load()
    except Image.DecompressionBombError as e:
        raise BadImageError("unsupported", key, str(e)) from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib/struct errors ...
        reason = "truncated" if "truncated" in str(e).lower() else "corrupt"
        raise BadImageError(reason, key, f"{type(e).__name__}: {e}") from e
    if min(img.size) == 0:
        raise BadImageError("corrupt", key, f"zero-sized image {img.size}")
    img = _upright(img, notes)

    mode = img.mode
    if mode == "RGB":
        pass
    elif mode == "L":
        notes.add("grayscale")
    elif mode == "1":
        notes.add("grayscale")
        img = img.convert("L")
    elif mode.startswith("I"):  # I, I;16, I;16B, I;16L ...: integer grey, usually a 16-bit PNG/TIFF
        arr = np.asarray(img).astype(np.float64)
        if ";16" in mode or "16bit" in notes or arr.max() > 255:
            notes.add("16bit")
            arr = arr / 257.0  # 65535 -> 255 exactly, not a clip at 255
        img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L")
        notes.add("grayscale")
    elif mode in ("LA", "La"):
        notes.update(("grayscale", "alpha"))
        img = _composite_on_white(img)
    elif mode in ("RGBA", "RGBa"):
        notes.add("alpha")
        img = _composite_on_white(img)
    elif mode in ("P", "PA"):
        notes.add("palette")
        if mode == "PA" or "transparency" in img.info:
            notes.add("alpha")
            img = _composite_on_white(img)
    elif mode == "CMYK":
        notes.add("cmyk")
    elif mode == "F":
        # Float images have no agreed range to map to uint8; guessing would silently corrupt data.
        raise BadImageError("unsupported", key, "floating-point pixel mode 'F'")
    else:
        notes.add("other_mode")
    if img.mode != "RGB":
        try:
            img = img.convert("RGB")
        except (ValueError, OSError) as e:
            raise BadImageError("unsupported", key, f"mode {mode!r} cannot be converted to RGB: {e}") from e
    return img, notes


def _open(payload: Any, key: str) -> Image.Image:
    """A lazily opened PIL image from a path or encoded bytes."""
    if isinstance(payload, (str, os.PathLike)):
        try:
            with open(payload, "rb") as f:
                payload = f.read()  # read whole file: PIL then holds no file handle
        except OSError as e:
            raise BadImageError("unreadable", key, f"{type(e).__name__}: {e}") from e
    if isinstance(payload, np.ndarray) and payload.dtype == np.uint8 and payload.ndim == 1:
        payload = payload.tobytes()
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise BadImageError("unsupported", key, f"record payload of type {type(payload).__name__}")
    try:
        return Image.open(io.BytesIO(payload))
    except Image.DecompressionBombError as e:
        raise BadImageError("unsupported", key, str(e)) from e
    except Image.UnidentifiedImageError as e:
        raise BadImageError("unsupported", key, "PIL cannot identify the file as an image") from e
    except Exception as e:
        reason = "truncated" if "truncated" in str(e).lower() else "corrupt"
        raise BadImageError(reason, key, f"{type(e).__name__}: {e}") from e


def load_image(path: str | os.PathLike) -> tuple[np.ndarray, tuple[str, ...]]:
    """Reads one image file as uint8 (H, W, 3) RGB.

    Returns the array and the sorted conversions applied (names from CONVERT_REASONS). Raises
    BadImageError (a ValueError naming the file, with ``.reason`` in SKIP_REASONS) when it cannot.
    """
    key = os.fspath(path)
    img, notes = _to_rgb(_open(key, key), key)
    return np.asarray(img), tuple(sorted(notes))


# ----------------------------------------------------------------------------------------------------
# Random-access sources. Each raw source returns (key, payload); _DecodingSource turns that into a
# cropped uint8 image (or None plus the reason) inside grain's read threads.


class _ListSource:
    """(key, payload) pairs held in a list: the folder and demo sources."""

    def __init__(self, entries: Sequence[tuple[str, Any]]):
        self._entries = list(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> tuple[str, Any]:
        return self._entries[index]

    def __repr__(self) -> str:
        return f"_ListSource({len(self._entries)} entries)"


class _TfdsImages:
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
            return key, _UnparsedRecord(f"{type(e).__name__}: {e}")

    def __repr__(self) -> str:
        return f"_TfdsImages({self._name}, {len(self)} records)"


@dataclasses.dataclass(frozen=True)
class _UnparsedRecord:
    detail: str


MEMO_MAX_RECORDS = 64


class _DecodingSource:
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
        counts = np.zeros(len(_REASONS), np.int32)
        try:
            if isinstance(payload, _UnparsedRecord):
                raise BadImageError("corrupt", key, payload.detail)
            img, notes = _to_rgb(_open(payload, key), key)
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
            counts[_REASON_INDEX[e.reason]] = 1
            return {"image": None, "_counts": counts}
        for note in notes:
            counts[_REASON_INDEX[note]] = 1
        return {"image": image, "_counts": counts}

    def __repr__(self) -> str:
        return f"_DecodingSource({self._raw!r}, image_size={self._size}, strict={self._strict})"


class _LatentSource:
    """Decodes write_latent_shard records: index -> {"latent": float32 (h,w,C) or None, "_counts"}."""

    def __init__(self, paths: Sequence[str], strict: bool):
        self._paths = list(paths)
        self._strict = strict
        self._records = grain.sources.ArrayRecordDataSource(self._paths)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        counts = np.zeros(len(_REASONS), np.int32)
        try:
            latent = decode_latent(self._records[index]).astype(np.float32)
        except ValueError as e:
            if self._strict:
                raise ValueError(f"latent record {index} of {self._paths}: {e}") from e
            logging.warning("Skipping latent record %d of %s: %s", index, self._paths, e)
            counts[_REASON_INDEX["corrupt"]] = 1
            return {"latent": None, "_counts": counts}
        return {"latent": latent, "_counts": counts}

    def __repr__(self) -> str:
        return f"_LatentSource({len(self._paths)} files, {len(self)} records)"


# ----------------------------------------------------------------------------------------------------
# Grain transforms.


class _DropFailed(grain.transforms.Filter):
    """Drops records whose decode failed and hands their counts to the next surviving element.

    Grain filters cannot emit anything, so the skip counts ride on the next good element (mutated in
    place: grain passes the same object on to the following transform); this keeps the counts correct
    when the filter runs in a worker process. Runs sequentially per process, so plain state is safe.
    """

    def __init__(self, field: str, max_consecutive: int, description: str):
        self._field = field
        self._max_consecutive = max_consecutive
        self._description = description
        self._pending = np.zeros(len(_REASONS), np.int32)
        self._consecutive = 0

    def filter(self, element: dict[str, Any]) -> bool:
        if element[self._field] is None:
            self._pending += element["_counts"]
            self._consecutive += 1
            # A repeating stream over only bad files would otherwise spin forever without a word.
            if self._consecutive > self._max_consecutive:
                raise RuntimeError(f"{self._consecutive} records in a row failed to decode in "
                                   f"{self._description}: no usable data (see the warnings above).")
            return False
        element["_counts"] = element["_counts"] + self._pending
        self._pending = np.zeros_like(self._pending)
        self._consecutive = 0
        return True

    def take_pending(self) -> np.ndarray:
        pending, self._pending = self._pending, np.zeros_like(self._pending)
        return pending


class _RandomResizedCrop(grain.transforms.RandomMap):
    """`random_resized_crop` of the whole decoded image (config.data.random_crop_scale)."""

    def __init__(self, size: int, scale: Sequence[float]):
        self._size, self._scale = int(size), tuple(float(s) for s in scale)

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        return dict(element, image=random_resized_crop(element["image"], self._size, self._scale, rng))


class _RandomFlip(grain.transforms.RandomMap):
    """Horizontal flip with probability 1/2; the rng is grain's per-record Philox(seed + position)."""

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if rng.random() < 0.5:
            element = dict(element, image=np.ascontiguousarray(element["image"][:, ::-1]))
        return element


class _ToFloat(grain.transforms.Map):
    """uint8 batch -> float32 in [-1, 1] (after batching: one vectorised op per batch)."""

    def map(self, batch: dict[str, Any]) -> dict[str, Any]:
        return dict(batch, image=batch["image"].astype(np.float32) * (1.0 / 127.5) - 1.0)


class DataIterator:
    """Iterator over batch dicts; checkpointable like grain's DataLoaderIterator.

    ``get_state() -> bytes`` / ``set_state(bytes)`` (and ``start_prefetch``) delegate to grain, so the
    object works with ``grain.checkpoint.CheckpointSave/CheckpointRestore`` under orbax. ``stats`` is a
    PipelineStats for the batches this iterator has returned.
    """

    def __init__(self, loader: grain.DataLoader, drop_filter: _DropFailed, worker_count: int):
        self._iterator = iter(loader)
        self._drop_filter = drop_filter
        self._worker_count = worker_count
        self.stats = PipelineStats()

    def __iter__(self) -> "DataIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        try:
            batch = next(self._iterator)
        except StopIteration:
            if self._worker_count == 0:  # in-process: skips after the last good element are visible
                self.stats.add_counts(self._drop_filter.take_pending())
            raise
        counts = batch.pop("_counts")
        self.stats.add_counts(counts)
        self.stats.examples += counts.shape[0]
        return batch

    def get_state(self) -> bytes:
        return self._iterator.get_state()

    def set_state(self, state: bytes) -> None:
        self._iterator.set_state(state)

    def start_prefetch(self) -> None:
        self._iterator.start_prefetch()


# ----------------------------------------------------------------------------------------------------
# Config handling and source construction.


def _get(config_data: Any, name: str) -> Any:
    value = config_data.get(name, None) if hasattr(config_data, "get") else getattr(config_data, name, None)
    # Configs spell "not set" as None or "" (ConfigDict fields keep one type, so paths default to "").
    if value is None or (isinstance(value, str) and not value):
        value = DEFAULTS[name]
    return None if isinstance(value, str) and not value else value


def demo_photos() -> dict[str, str]:
    """The demo photos available offline: name -> file path."""
    import importlib.util  # pylint: disable=g-import-not-at-top

    photos = {}
    for package, relpath, name in _DEMO_FILES:
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


def _folder_entries(config_data: Any, split: str) -> tuple[list[tuple[str, str]], str]:
    field = "path" if split == "train" else "eval_path"
    root = _get(config_data, field)
    if split == "eval" and root is None:
        root = _get(config_data, "path")
        field = "path"
        logging.warning("config.data.eval_path is not set: evaluating on the training folder %s.", root)
    if root is None:
        raise ValueError("config.data.path is not set: source 'folder' needs a directory of images, "
                         "e.g. --config.data.path=/data/imagenet/train")
    root = os.path.expanduser(os.fspath(root))
    if not os.path.isdir(root):
        raise ValueError(f"config.data.{field}={root!r} does not exist or is not a directory; point it at "
                         f"a folder of images (searched recursively).")
    files = list_image_files(root)
    if not files:
        raise ValueError(f"config.data.{field}={root!r} contains no image files (looked recursively for "
                         f"extensions PIL knows, e.g. .jpg .jpeg .png .webp .bmp).")
    return [(f, f) for f in files], root


def demo_split_names(config_data: Any, split: str) -> list[str]:
    """Names of the demo photos in ``split`` ('train' or 'eval'), in a fixed order."""
    photos = demo_photos()
    eval_names = tuple(_get(config_data, "demo_eval_names"))
    unknown = [n for n in eval_names if n not in photos]
    if unknown:
        raise ValueError(f"config.data.demo_eval_names has {unknown} which are not available demo photos; "
                         f"choose from {sorted(photos)}.")
    names = [n for n in photos if (n in eval_names) == (split == "eval")]
    if split == "train" and not _get(config_data, "demo_grayscale"):
        names = [n for n in names if n not in DEMO_GRAYSCALE]
    if not names:
        raise ValueError(f"config.data.demo_eval_names={eval_names} leaves no photos for split {split!r}.")
    return names


def _tfds_source(config_data: Any, split: str) -> tuple[_TfdsImages, str]:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow; tfds only)

    name = _get(config_data, "tfds_name")
    data_dir = _get(config_data, "tfds_data_dir")
    split_field = "train_split" if split == "train" else "eval_split"
    tfds_split = _get(config_data, split_field)
    image_key = _get(config_data, "tfds_image_key")
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
    return _TfdsImages(source, image_key, f"{name}:{tfds_split}"), f"tfds {name}:{tfds_split}"


def _latent_paths(config_data: Any, split: str) -> list[str]:
    field = "path" if split == "train" else "eval_path"
    pattern = _get(config_data, field)
    if split == "eval" and pattern is None:
        field, pattern = "path", _get(config_data, "path")
        logging.warning("config.data.eval_path is not set: evaluating on the training latents %s.", pattern)
    if pattern is None:
        raise ValueError("config.data.path is not set: source 'latents' needs a glob of array_record "
                         "shards from write_latent_shard, e.g. '/cache/latents/train-*.array_record'.")
    paths = sorted(glob.glob(os.path.expanduser(os.fspath(pattern))))
    if not paths:
        raise ValueError(f"config.data.{field}={pattern!r} matches no files; expected a glob of array_record "
                         f"shards written by write_latent_shard (run the latent caching job first).")
    return paths


def validate_data_config(config_data: Any) -> None:
    """Checks the fields every source shares; raises ValueError naming the field."""
    source = _get(config_data, "source")
    if source not in SOURCES:
        raise ValueError(f"config.data.source={source!r} is not one of {SOURCES}.")
    size = _get(config_data, "image_size")
    if source != "latents" and (not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size <= 0):
        raise ValueError(f"config.data.image_size={size!r} must be a positive integer (pixels).")
    workers = _get(config_data, "worker_count")
    if not isinstance(workers, (int, np.integer)) or workers < 0:
        raise ValueError(f"config.data.worker_count={workers!r} must be an integer >= 0 "
                         f"(0 = decode in this process).")
    scale = tuple(_get(config_data, "random_crop_scale") or ())
    if scale and not (len(scale) == 2 and 0.0 < scale[0] <= scale[1] <= 1.0):
        raise ValueError(f"config.data.random_crop_scale={scale!r} must be () (the ADM centre crop) or "
                         f"(min, max) with 0 < min <= max <= 1: the crop side as a fraction of the short side.")
    for name in ("read_threads", "prefetch_buffer_size"):
        value = _get(config_data, name)
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 0):
            raise ValueError(f"config.data.{name}={value!r} must be an integer >= 0.")


def create_dataset(
    config_data: Any,
    *,
    split: str,
    batch_size: int,
    seed: int,
    train: bool,
    drop_remainder: bool = True,
    shard_index: int | None = None,
    shard_count: int | None = None,
    random_crops: bool | None = None,
) -> tuple[DataIterator, int]:
    """Builds the batch iterator for one split on this host.

    Args:
      config_data: ``config.data`` (ConfigDict or dict); missing fields take DEFAULTS.
      split: 'train' or 'eval' (mapped to the source's own split/path fields).
      batch_size: examples per batch on this host.
      seed: shuffling and flip seed; the same on every host (it is reduced mod 2**32).
      train: shuffle, repeat forever and flip; otherwise one epoch in order, no flip.
      drop_remainder: drop the last partial batch (only matters when ``train=False``).
      shard_index, shard_count: default ``jax.process_index()``, ``jax.process_count()``.
      random_crops: apply ``config.data.random_crop_scale`` (default: when ``train``); the latent cache
        asks for them on an ordered one-epoch pass, one pass per cached view.

    Returns:
      (iterator, num_examples): a DataIterator over dicts ``{"image": float32 (B,S,S,3)}`` (or
      ``{"latent": float32 (B,h,w,C)}`` for source 'latents'), and the number of records in the whole
      split, all hosts together, counted before any bad file is skipped.
    """
    validate_data_config(config_data)
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}.")
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive.")
    if shard_index is None or shard_count is None:
        import jax  # pylint: disable=g-import-not-at-top

        shard_index, shard_count = jax.process_index(), jax.process_count()
    source_name = _get(config_data, "source")
    strict = bool(_get(config_data, "strict"))
    image_size = int(_get(config_data, "image_size"))
    random_crops = train if random_crops is None else random_crops
    crop_scale = tuple(_get(config_data, "random_crop_scale") or ()) if random_crops else ()

    if source_name == "latents":
        paths = _latent_paths(config_data, split)
        source = _LatentSource(paths, strict)
        field, description = "latent", f"latent shards {paths[0]}..."
    else:
        if source_name == "demo":
            photos = demo_photos()
            entries = [(f"demo:{n}", photos[n]) for n in demo_split_names(config_data, split)]
            raw, description = _ListSource(entries), f"demo split {split!r}"
        elif source_name == "folder":
            entries, root = _folder_entries(config_data, split)
            raw, description = _ListSource(entries), f"folder {root}"
        else:
            raw, description = _tfds_source(config_data, split)
        source = _DecodingSource(raw, image_size, strict, center_crop=not crop_scale,
                                 min_crop_scale=crop_scale[0] if crop_scale else 1.0)
        field = "image"

    num_records = len(source)
    if num_records < shard_count:
        raise ValueError(f"{description} has {num_records} records, fewer than the {shard_count} hosts.")
    if not train and drop_remainder and num_records // shard_count < batch_size:
        raise ValueError(f"{description} has {num_records // shard_count} records per host, fewer than "
                         f"batch_size={batch_size}: one epoch would yield no batch.")

    shard_options = grain.sharding.ShardOptions(shard_index=shard_index, shard_count=shard_count,
                                                drop_remainder=True)
    sampler = grain.samplers.IndexSampler(
        num_records=num_records,
        shard_options=shard_options,
        shuffle=train,
        num_epochs=None if train else 1,
        seed=int(seed) % 2**32,
    )
    drop_filter = _DropFailed(field, max_consecutive=num_records, description=description)
    operations: list[Any] = [drop_filter]
    if field == "image" and crop_scale:
        operations.append(_RandomResizedCrop(image_size, crop_scale))
    if train and field == "image":
        operations.append(_RandomFlip())
    operations.append(grain.transforms.Batch(batch_size=batch_size, drop_remainder=drop_remainder or train))
    if field == "image":
        operations.append(_ToFloat())
    worker_count = int(_get(config_data, "worker_count"))
    if worker_count > 0 and not flags.FLAGS.is_parsed():
        # grain reads its absl flags when starting workers; outside absl.app.run (tests, notebooks)
        # nothing parsed them, so take the defaults rather than fail.
        flags.FLAGS.mark_as_parsed()
    read_threads = int(_get(config_data, "read_threads"))
    prefetch = _get(config_data, "prefetch_buffer_size")
    # Decoding happens in the read threads, so the buffer holds decoded images: keep it near a batch.
    prefetch = 2 * max(batch_size, read_threads) if prefetch is None else int(prefetch)
    loader = grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=operations,
        worker_count=worker_count,
        shard_options=shard_options,
        read_options=grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch),
    )
    logging.info("Input pipeline: %s, split %r, %d records, host shard %d/%d, batch %d, train=%s.",
                 description, split, num_records, shard_index, shard_count, batch_size, train)
    return DataIterator(loader, drop_filter, worker_count), num_records


# ----------------------------------------------------------------------------------------------------
# Cached latents: one array_record record per latent, encoded as .npy bytes.


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
