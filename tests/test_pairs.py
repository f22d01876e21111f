"""The text-image pairs format: JSONL round trip, validation errors with line numbers, the split."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from v2flow_jax.data.pairs import Pair, PairsError, load_pair_image, read_pairs, split_pairs, write_pairs


def _png(path, color=(255, 0, 0), size=(8, 8), mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, color).save(path)
    return str(path)


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_round_trip_relative_and_absolute(tmp_path):
    inside = _png(tmp_path / "data" / "images" / "a.png")
    nested = _png(tmp_path / "data" / "b.png")
    outside = _png(tmp_path / "elsewhere" / "c.png")
    pairs = [Pair(inside, "a red square"), Pair(nested, "ünïcödé “quotes”\nand a newline"),
             Pair(outside, "outside the folder"), Pair(inside, "a second caption of the same image")]
    jsonl = tmp_path / "data" / "pairs.jsonl"
    write_pairs(jsonl, pairs)

    records = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    assert [r["image"] for r in records] == ["images/a.png", "b.png", outside, "images/a.png"]
    assert records[1]["caption"] == "ünïcödé “quotes”\nand a newline"
    assert read_pairs(jsonl) == pairs  # duplicates kept, absolute paths back
    assert all(os.path.isabs(p.image_path) for p in read_pairs(str(jsonl)))
    # No temp file is left next to the JSONL.
    assert sorted(os.listdir(tmp_path / "data")) == ["b.png", "images", "pairs.jsonl"]


def test_moved_folder_still_reads(tmp_path):
    _png(tmp_path / "d" / "images" / "a.png")
    write_pairs(tmp_path / "d" / "p.jsonl", [Pair(str(tmp_path / "d" / "images" / "a.png"), "x")])
    os.rename(tmp_path / "d", tmp_path / "moved")
    (pair,) = read_pairs(tmp_path / "moved" / "p.jsonl")
    assert pair.image_path == str(tmp_path / "moved" / "images" / "a.png")


def test_blank_lines_bom_and_crlf(tmp_path):
    _png(tmp_path / "a.png")
    body = '\ufeff{"image": "a.png", "caption": "one"}\r\n\r\n   \n{"image": "a.png", "caption": "two", "id": 7}\r\n'
    (tmp_path / "p.jsonl").write_bytes(body.encode("utf-8"))
    assert [p.caption for p in read_pairs(tmp_path / "p.jsonl")] == ["one", "two"]


def test_empty_file_is_no_pairs(tmp_path):
    (tmp_path / "p.jsonl").write_text("")
    assert read_pairs(tmp_path / "p.jsonl") == []


GOOD = '{"image": "a.png", "caption": "fine"}'


@pytest.mark.parametrize("bad_line, expected", [
    ('{"image": "a.png", "caption": "unterminated}', "not valid JSON"),
    ('["a.png", "a caption"]', "a JSON list, not an object"),
    ('{"caption": "no image"}', "missing key 'image'"),
    ('{"image": "a.png"}', "missing key 'caption'"),
    ('{"image": 3, "caption": "x"}', "'image' is a number (3), not a string"),
    ('{"image": "a.png", "caption": null}', "'caption' is null (None), not a string"),
    ('{"image": "a.png", "caption": "   "}', "'caption' is empty"),
    ('{"image": "missing.png", "caption": "x"}', "image 'missing.png' not found"),
])
def test_each_error_names_file_and_line(tmp_path, bad_line, expected):
    _png(tmp_path / "a.png")
    jsonl = _write_lines(tmp_path / "p.jsonl", [GOOD, "", bad_line, GOOD])
    with pytest.raises(PairsError) as info:
        read_pairs(jsonl)
    message = str(info.value)
    assert message.startswith(f"{jsonl}, line 3: ")  # 1-based, blank line counted
    assert expected in message
    assert "e.g. {" in message or "relative to the JSONL's folder" in message  # the fix is spelled out


def test_missing_image_error_shows_where_it_looked(tmp_path):
    _write_lines(tmp_path / "p.jsonl", ['{"image": "sub/x.png", "caption": "x"}'])
    with pytest.raises(PairsError, match=rf"line 1: .*looked for {tmp_path}/sub/x.png"):
        read_pairs(tmp_path / "p.jsonl")


def test_not_utf8_names_the_line(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "p.jsonl").write_bytes(GOOD.encode() + b'\n{"image": "a.png", "caption": "caf\xe9"}\n')
    with pytest.raises(PairsError, match="line 2: not UTF-8"):
        read_pairs(tmp_path / "p.jsonl")


def test_missing_jsonl_file(tmp_path):
    with pytest.raises(PairsError, match="cannot read the pairs file"):
        read_pairs(tmp_path / "nope.jsonl")


def test_write_rejects_bad_pairs_and_keeps_old_file(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("old\n")
    with pytest.raises(PairsError, match="item 1 has caption=''"):
        write_pairs(jsonl, [Pair("/x.png", "ok"), Pair("/y.png", "")])
    with pytest.raises(PairsError, match="item 0 is a tuple"):
        write_pairs(jsonl, [("/x.png", "ok")])
    assert jsonl.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["p.jsonl"]


def _many_pairs(n=2000):
    return [Pair(f"/img/{i}.png", f"caption number {i % 700}") for i in range(n)]


def test_split_is_deterministic_and_caption_disjoint():
    pairs = _many_pairs()
    train, held = split_pairs(pairs, 0.2, seed=3)
    assert (train, held) == split_pairs(list(pairs), 0.2, seed=3)
    assert len(train) + len(held) == len(pairs)
    assert {p.caption for p in train}.isdisjoint({p.caption for p in held})
    assert 0.13 < len(held) / len(pairs) < 0.27  # 700 distinct captions, about 20% of them held out
    # Order kept on each side.
    assert train == [p for p in pairs if p in set(train)]
    # Another seed gives another split.
    assert split_pairs(pairs, 0.2, seed=4)[1] != held


def test_split_groups_captions_ignoring_case_and_spaces():
    pairs = [Pair(f"/{i}.png", c) for i in range(50) for c in (f"dog {i}", f"DOG  {i} ")]
    train, held = split_pairs(pairs, 0.5, seed=0)
    assert held and train
    held_keys = {" ".join(p.caption.split()).lower() for p in held}
    assert held_keys.isdisjoint({" ".join(p.caption.split()).lower() for p in train})


def test_split_does_not_depend_on_other_pairs():
    pairs = _many_pairs(300)
    _, held = split_pairs(pairs, 0.3, seed=1)
    _, held_more = split_pairs(pairs + [Pair("/new.png", "a brand new caption")], 0.3, seed=1)
    assert [p for p in held_more if p.image_path != "/new.png"] == held


def test_split_edges_and_bad_fraction():
    pairs = _many_pairs(50)
    assert split_pairs(pairs, 0.0, seed=0) == (pairs, [])
    assert split_pairs(pairs, 1.0, seed=0) == ([], pairs)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(PairsError, match="held_out_fraction"):
            split_pairs(pairs, bad, seed=0)


def test_load_pair_image_uses_project_decoding(tmp_path):
    path = _png(tmp_path / "rgba.png", color=(0, 0, 255, 0), size=(40, 20), mode="RGBA")
    img = load_pair_image(Pair(path, "transparent"), 16)
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8
    assert (img == 255).all()  # transparent -> white, the decoding module's alpha policy
