"""Text-image pairs for the LLM stage: a folder of images plus a JSONL file of captions.

Each non-blank line of the JSONL file is one JSON object::

    {"image": "images/1F34E.png", "caption": "red apple"}

``image`` is relative to the JSONL file's folder, or absolute. Other keys are allowed and ignored.
The same image may appear on several lines (several captions of one picture). The images themselves
are decoded by `v2flow_jax.data.decoding` (its bad-file policy); `load_pair_image` is the shortcut.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Iterable, Sequence

import numpy as np

from v2flow_jax import atomic_files
from v2flow_jax.data.decoding import adm_center_crop, open_image, to_rgb

EXAMPLE_LINE = '{"image": "images/apple.png", "caption": "a red apple"}'


class PairsError(ValueError):
    """A pairs JSONL file (or a pair to write) that does not follow the format above."""


@dataclasses.dataclass(frozen=True)
class Pair:
    """One captioned image. `read_pairs` always returns an absolute, normalised ``image_path``."""

    image_path: str
    caption: str


def _line_error(jsonl_path: str, line_no: int, problem: str, fix: str) -> PairsError:
    return PairsError(f"{jsonl_path}, line {line_no}: {problem}. {fix}")


def _decode_line(raw: bytes, jsonl_path: str, line_no: int) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _line_error(jsonl_path, line_no, f"not UTF-8 text ({e})",
                          "Save the file as UTF-8.") from e
    # Editors on Windows put a byte-order mark before the first line; it is not part of the JSON.
    return text.removeprefix("\ufeff") if line_no == 1 else text


def _string_field(record: dict, key: str, jsonl_path: str, line_no: int) -> str:
    fix = f"Every line needs a non-empty string {key!r}, e.g. {EXAMPLE_LINE}"
    if key not in record:
        raise _line_error(jsonl_path, line_no, f"missing key {key!r} (keys: {sorted(record)})", fix)
    value = record[key]
    if not isinstance(value, str):
        kind = {int: "a number", float: "a number", bool: "true/false", list: "a list", dict: "an object",
                type(None): "null"}.get(type(value), type(value).__name__)
        raise _line_error(jsonl_path, line_no, f"{key!r} is {kind} ({value!r}), not a string", fix)
    if not value.strip():
        raise _line_error(jsonl_path, line_no, f"{key!r} is empty", fix)
    return value


def _parse_line(text: str, jsonl_path: str, base_dir: str, line_no: int) -> Pair:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise _line_error(jsonl_path, line_no, f"not valid JSON ({e.msg} at column {e.colno})",
                          f"Each line must be one JSON object, e.g. {EXAMPLE_LINE}") from e
    if not isinstance(record, dict):
        raise _line_error(jsonl_path, line_no, f"a JSON {type(record).__name__}, not an object",
                          f"Each line must be one JSON object, e.g. {EXAMPLE_LINE}")
    image = _string_field(record, "image", jsonl_path, line_no)
    caption = _string_field(record, "caption", jsonl_path, line_no)
    # os.path.join keeps an absolute `image` as it is.
    image_path = os.path.normpath(os.path.join(base_dir, image))
    if not os.path.isfile(image_path):
        raise _line_error(jsonl_path, line_no, f"image {image!r} not found (looked for {image_path})",
                          f"Give a path relative to the JSONL's folder {base_dir} or an absolute one, "
                          "and check the file exists.")
    return Pair(image_path=image_path, caption=caption)


def read_pairs(jsonl_path: str | os.PathLike) -> list[Pair]:
    """Reads and validates a pairs JSONL file; blank lines are skipped.

    Raises PairsError naming the file, the 1-based line number and the fix for a line that is not
    UTF-8, not a JSON object, lacks a non-empty string "image" or "caption", or names a missing image.
    """
    jsonl_path = os.path.abspath(os.fspath(jsonl_path))
    try:
        with open(jsonl_path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise PairsError(f"{jsonl_path}: cannot read the pairs file ({type(e).__name__}: {e}). "
                         "Pass the path of an existing JSONL file.") from e
    base_dir = os.path.dirname(jsonl_path)
    pairs = []
    for line_no, raw in enumerate(data.split(b"\n"), start=1):
        text = _decode_line(raw, jsonl_path, line_no)
        if text.strip():
            pairs.append(_parse_line(text, jsonl_path, base_dir, line_no))
    return pairs


def _relative_if_under(image_path: str, base_dir: str) -> str:
    """The path as written to the JSONL: relative (with '/') under the JSONL's folder, else absolute."""
    image_path = os.path.abspath(image_path)
    if os.path.commonpath([image_path, base_dir]) == base_dir:
        return os.path.relpath(image_path, base_dir).replace(os.sep, "/")
    return image_path


def _check_pair(pair: Pair, index: int) -> None:
    if not isinstance(pair, Pair):
        raise PairsError(f"write_pairs: item {index} is a {type(pair).__name__}, not a Pair. "
                         "Pass Pair(image_path=..., caption=...) objects.")
    for field in ("image_path", "caption"):
        value = getattr(pair, field)
        if not isinstance(value, str) or not value.strip():
            raise PairsError(f"write_pairs: item {index} has {field}={value!r}; expected a non-empty "
                             "string (read_pairs would reject the line).")


def write_pairs(jsonl_path: str | os.PathLike, pairs: Iterable[Pair]) -> None:
    """Writes pairs in the format `read_pairs` reads, atomically (temp file in the folder, then rename).

    Image paths under the JSONL's folder are written relative to it (the folder can then be moved
    as a whole); others stay absolute. Relative ``image_path`` values are taken from the current
    directory. The images are not checked here: `read_pairs` does that.
    """
    jsonl_path = os.path.abspath(os.fspath(jsonl_path))
    base_dir = os.path.dirname(jsonl_path)
    lines = []
    for i, pair in enumerate(pairs):
        _check_pair(pair, i)
        record = {"image": _relative_if_under(pair.image_path, base_dir), "caption": pair.caption}
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    os.makedirs(base_dir, exist_ok=True)
    atomic_files.write_bytes(jsonl_path, "".join(lines).encode("utf-8"))


def caption_key(caption: str) -> str:
    """What the split groups by: the caption with case and runs of whitespace ignored."""
    return " ".join(caption.split()).casefold()


def _held_out_score(caption: str, seed: int) -> float:
    """A number in [0, 1) fixed by (seed, caption): sha256, so it is the same in every process."""
    digest = hashlib.sha256(f"{seed}\x00{caption_key(caption)}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_pairs(pairs: Sequence[Pair], held_out_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Splits pairs into (train, held_out), keeping their order within each side.

    A pair is held out when the hash of (seed, caption) falls below ``held_out_fraction``, so the
    split is the same on every run and machine, a pair's side does not depend on the other pairs
    (adding pairs never moves old ones), and all pairs with one caption (compared ignoring case and
    extra whitespace) land on the same side: no caption of the held-out set is seen in training.
    The held-out share is ``held_out_fraction`` in expectation, not exactly.
    """
    if not 0.0 <= held_out_fraction <= 1.0:
        raise PairsError(f"split_pairs: held_out_fraction={held_out_fraction!r}; expected a number in "
                         "[0, 1] (e.g. 0.05 for 5% held out).")
    train, held_out = [], []
    for pair in pairs:
        (held_out if _held_out_score(pair.caption, seed) < held_out_fraction else train).append(pair)
    return train, held_out


def load_pair_image(pair: Pair, size: int) -> np.ndarray:
    """The pair's image as uint8 (size, size, 3) RGB: the project's decoding and ADM centre crop.

    Raises decoding.BadImageError (a ValueError naming the file and the reason) for a bad file.
    """
    img, _ = to_rgb(open_image(pair.image_path, pair.image_path), pair.image_path)
    return adm_center_crop(img, size)
