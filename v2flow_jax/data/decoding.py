"""Image decoding and the bad-file policy: any file or bytes -> upright uint8 RGB, or a reason it is skipped.

`load_image` / `to_rgb` turn what PIL opens into RGB (grayscale replicated, alpha composited on white,
palettes expanded, 16-bit scaled, CMYK and other modes converted, EXIF orientation applied), recording
each conversion; a file PIL cannot identify, a truncated or corrupt one or an unreadable path raises
`BadImageError` with its reason. `PipelineStats` counts both per reason. The crops (`adm_center_crop`,
`random_resized_crop`) make the model's square input.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps

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
REASONS = SKIP_REASONS + CONVERT_REASONS
REASON_INDEX = {r: i for i, r in enumerate(REASONS)}


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
        for reason, n in zip(REASONS, np.asarray(counts).reshape(-1, len(REASONS)).sum(0).tolist()):
            if n:
                (self.skipped if reason in SKIP_REASONS else self.converted)[reason] += int(n)

    def as_dict(self) -> dict:
        """For metrics.json: examples delivered and files skipped / converted, per reason."""
        return {"examples": int(self.examples), "skipped": dict(self.skipped), "converted": dict(self.converted)}

    def summary(self) -> str:
        return (f"{self.examples} examples; skipped {dict(self.skipped) or 'none'}; "
                f"converted {dict(self.converted) or 'none'}")




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


def to_rgb(img: Image.Image, key: str) -> tuple[Image.Image, set[str]]:
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


def open_image(payload: Any, key: str) -> Image.Image:
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
    img, notes = to_rgb(open_image(key, key), key)
    return np.asarray(img), tuple(sorted(notes))


