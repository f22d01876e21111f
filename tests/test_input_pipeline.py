"""Tests for the grain input pipelines (all offline, on files the tests write or packages ship)."""
import io
import struct
import zlib

import numpy as np
from PIL import Image
import pytest

from v2flow_jax import input_pipeline as ip
from v2flow_jax.data import decoding, latent_records, settings, sources

S = 16  # image size for pipeline tests: small keeps decode time out of the test budget


def _data(**kw):
    # Few read threads: this machine has 2 cores and the tests check values, not speed.
    return dict(dict(image_size=S, read_threads=2, worker_count=0), **kw)


def _make(cfg, split="train", batch_size=2, seed=0, train=True, **kw):
    return ip.create_dataset(cfg, split=split, batch_size=batch_size, seed=seed, train=train,
                             shard_index=kw.pop("shard_index", 0), shard_count=kw.pop("shard_count", 1), **kw)


def _take(iterator, n):
    return [next(iterator)["image"] for _ in range(n)]


def _png16(arr):
    """A 16-bit-per-channel RGB PNG written by hand (PIL cannot write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def _encode(arr, fmt, **kw):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory):
    """Good images plus every kind of trouble the pipeline must survive; returns (root, expectations)."""
    root = tmp_path_factory.mktemp("messy")
    (root / "sub").mkdir()
    rng = np.random.default_rng(0)
    rgb = lambda: rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)  # noqa: E731
    files = {
        "a_good.jpg": _encode(rgb(), "JPEG", quality=95),
        "sub/b_good.png": _encode(rgb(), "PNG"),
        "c_gray.png": _encode(rng.integers(0, 256, (40, 48), dtype=np.uint8), "PNG"),
        "d_rgba.png": _encode(np.zeros((40, 48, 4), np.uint8), "PNG"),  # fully transparent -> white
        "e_gray16.png": _encode(np.full((40, 48), 128 * 257, np.uint16), "PNG"),  # -> exactly 128
        "f_rgb16.png": _png16(rng.integers(0, 65536, (40, 48, 3), dtype=np.uint16)),
        "g_tiny.png": _encode(rgb()[:5, :5], "PNG"),
        "h_text.png": b"this is a text file, not a PNG\n",
        "i_truncated.jpg": _encode(rgb(), "JPEG", quality=95)[:900],
        "notes.txt": b"ignored: not an image extension",
        "zz_last_good.jpg": _encode(rgb(), "JPEG", quality=95),
    }
    broken = bytearray(_encode(rgb(), "PNG"))  # valid header, scrambled compressed pixel data
    start = broken.find(b"IDAT") + 20
    broken[start:start + 40] = bytes(b ^ 0x5A for b in broken[start:start + 40])
    files["sub/j_broken.png"] = bytes(broken)
    for name, data in files.items():
        (root / name).write_bytes(data)
    expected = dict(
        good=8,  # a, b, c, d, e, f, g, zz
        skipped={"unsupported": 1, "truncated": 1, "corrupt": 1},
        converted={"grayscale": 2, "alpha": 1, "16bit": 2, "upscaled": 1},
    )
    return root, expected


# ---------------------------------------------------------------------------------------------- crop


def test_adm_crop_box_halves_a_2s_by_4s_image_first():
    s = 32
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (2 * s, 4 * s, 3), dtype=np.uint8)  # short side exactly 2S
    out = decoding.adm_center_crop(Image.fromarray(arr), s)
    assert out.shape == (s, s, 3) and out.dtype == np.uint8
    # Independent re-derivation: 2x2 block means (= one box halving), then the centre S columns.
    halved = arr.reshape(s, 2, 2 * s, 2, 3).astype(np.float64).mean(axis=(1, 3))
    expected = halved[:, s // 2: s // 2 + s]
    assert np.abs(out - expected).max() <= 1.0
    # A direct bicubic downscale would give a visibly different answer on noise.
    direct = np.asarray(Image.fromarray(arr).resize((2 * s, s), Image.BICUBIC))[:, s // 2: s // 2 + s]
    assert np.abs(direct.astype(float) - expected).mean() > 5 * np.abs(out - expected).mean() + 1


def test_adm_crop_matches_pil_rederivation():
    rng = np.random.default_rng(2)
    # 100x150 (H x W), S=64: no halving (100 < 128); bicubic to 64x96 (W x H = 96 x 64); crop columns 16:80.
    arr = rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(arr).resize((96, 64), Image.BICUBIC))[:, 16:80]
    np.testing.assert_array_equal(decoding.adm_center_crop(Image.fromarray(arr), 64), expected)
    # 300x200 (H x W), S=48: halve to 150x100 (100 >= 96), again to 75x50 (50 < 96 stops); bicubic to
    # 72x48; crop rows 12:60.
    arr = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)
    img = Image.fromarray(arr).resize((100, 150), Image.BOX).resize((50, 75), Image.BOX)
    expected = np.asarray(img.resize((48, 72), Image.BICUBIC))[12:60]
    np.testing.assert_array_equal(decoding.adm_center_crop(Image.fromarray(arr), 48), expected)
    # A tiny image is enlarged.
    assert decoding.adm_center_crop(Image.fromarray(arr[:5, :5]), 48).shape == (48, 48, 3)


def test_load_image_conversions(messy_folder, tmp_path):
    root, _ = messy_folder
    arr, notes = decoding.load_image(root / "d_rgba.png")
    assert notes == ("alpha",) and arr.shape == (40, 48, 3) and (arr == 255).all()  # composited on white
    arr, notes = decoding.load_image(root / "e_gray16.png")
    assert notes == ("16bit", "grayscale") and (arr == 128).all()  # scaled, not clipped at 255
    arr, notes = decoding.load_image(root / "f_rgb16.png")
    assert notes == ("16bit",) and arr.dtype == np.uint8
    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    others = {"p.png": (rgb.quantize(16), ("palette",)), "cmyk.jpg": (rgb.convert("CMYK"), ("cmyk",)),
              "la.png": (rgb.convert("LA"), ("alpha", "grayscale")), "bw.png": (rgb.convert("1"), ("grayscale",))}
    for name, (img, want) in others.items():
        img.save(tmp_path / name)
        arr, notes = decoding.load_image(tmp_path / name)
        assert notes == want and arr.shape == (20, 24, 3) and arr.dtype == np.uint8, name
    with pytest.raises(decoding.BadImageError, match="h_text.png") as err:
        decoding.load_image(root / "h_text.png")
    assert err.value.reason == "unsupported"


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
@pytest.mark.parametrize("orientation, corner", [(1, (0, 0)), (3, (-1, -1)), (6, (0, -1)), (8, (-1, 0))])
def test_exif_orientation_is_applied(tmp_path, suffix, orientation, corner):
    """A camera stores the sensor's pixels and tags which way is up: the loader must turn them upright.
    A 20x30 landscape with a white top-left block; tag 6 (display rotated 90 degrees clockwise) must give
    a 30x20 portrait with the block top-right, tag 3 bottom-right, tag 8 bottom-left, tag 1 untouched."""
    arr = np.zeros((20, 30, 3), np.uint8)
    arr[:6, :6] = 255
    exif = Image.Exif()
    exif[decoding.EXIF_ORIENTATION] = orientation
    path = tmp_path / f"photo{suffix}"
    Image.fromarray(arr).save(path, exif=exif, **({"quality": 95} if suffix == ".jpg" else {}))
    out, notes = decoding.load_image(path)
    assert out.shape == ((30, 20, 3) if orientation in (6, 8) else (20, 30, 3))
    assert notes == (() if orientation == 1 else ("oriented",))
    rows = slice(0, 4) if corner[0] == 0 else slice(-4, None)
    cols = slice(0, 4) if corner[1] == 0 else slice(-4, None)
    assert out[rows, cols].mean() > 240 and out.mean() < 60   # the block is there, and only there
    assert "oriented" in decoding.CONVERT_REASONS


# ---------------------------------------------------------------------------------------------- demo


def test_demo_batches_and_disjoint_splits():
    import ml_collections

    # The way configs hold it: a ConfigDict with "" for unset paths.
    cfg = ml_collections.ConfigDict(_data(source="demo", path="", eval_path="", tfds_data_dir=""))
    train_names = sources.demo_split_names(cfg, "train")
    eval_names = sources.demo_split_names(cfg, "eval")
    assert sorted(eval_names) == sorted(settings.DEFAULTS["demo_eval_names"])
    assert not set(train_names) & set(eval_names) and len(train_names) >= 10

    iterator, n = _make(cfg, batch_size=4)
    assert n == len(train_names)
    for _ in range(2):
        batch = next(iterator)
        assert set(batch) == {"image"}
        image = batch["image"]
        assert image.shape == (4, S, S, 3) and image.dtype == np.float32
        assert image.min() >= -1.0 and image.max() <= 1.0 and image.max() - image.min() > 0.5

    eval_iter, n_eval = _make(cfg, split="eval", batch_size=1, train=False)
    eval_images = np.concatenate(list(b["image"] for b in eval_iter))
    assert n_eval == len(eval_names) and eval_images.shape == (n_eval, S, S, 3)
    train_images = np.concatenate(list(b["image"] for b in _make(cfg, batch_size=1, train=False)[0]))
    # No eval photo is among the training photos.
    distances = np.abs(eval_images[:, None] - train_images[None]).mean(axis=(2, 3, 4))
    assert distances.min() > 0.01


# ---------------------------------------------------------------------------------------------- folder


def test_folder_skips_and_converts_exactly(messy_folder):
    root, expected = messy_folder
    iterator, n = _make(_data(source="folder", path=str(root)), split="train", batch_size=1, train=False)
    assert n == expected["good"] + 3  # the .txt file is not listed at all
    batches = list(iterator)
    assert len(batches) == expected["good"]
    assert all(b["image"].shape == (1, S, S, 3) for b in batches)
    assert dict(iterator.stats.skipped) == expected["skipped"]
    assert dict(iterator.stats.converted) == expected["converted"]
    assert iterator.stats.examples == expected["good"]

    # Training repeats over the same mess without stopping.
    train_iter, _ = _make(_data(source="folder", path=str(root)), batch_size=3)
    assert _take(train_iter, 6)[-1].shape == (3, S, S, 3)
    assert train_iter.stats.skipped["truncated"] >= 1


def test_folder_source_reads_the_images_of_a_pairs_jsonl_in_its_order(tmp_path):
    from v2flow_jax.data.pairs import Pair, write_pairs
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]
    for i, c in enumerate(colours):
        Image.new("RGB", (S, S), c).save(tmp_path / f"{i}.png")
    Image.new("RGB", (S, S), (9, 9, 9)).save(tmp_path / "not_listed.png")   # in the folder, not in the file
    write_pairs(tmp_path / "train.jsonl", [Pair(str(tmp_path / f"{i}.png"), f"c{i}") for i in (2, 0)])
    iterator, n = _make(_data(source="folder", path=str(tmp_path / "train.jsonl")), batch_size=1, train=False)
    assert n == 2
    means = [b["image"][0].reshape(-1, 3).mean(0) for b in iterator]
    assert [int(np.argmax(m)) for m in means] == [2, 0]
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="lists no pairs"):
        _make(_data(source="folder", path=str(tmp_path / "empty.jsonl")), batch_size=1, train=False)


def test_folder_counts_survive_worker_processes(messy_folder):
    root, expected = messy_folder
    cfg = _data(source="folder", path=str(root), worker_count=1)
    iterator, _ = _make(cfg, batch_size=2, train=False)
    batches = list(iterator)
    assert len(batches) == expected["good"] // 2
    # The last good file sorts last, so every skip is followed by an element that carries it home.
    assert dict(iterator.stats.skipped) == expected["skipped"]
    assert dict(iterator.stats.converted) == expected["converted"]


def test_strict_mode_names_the_file(messy_folder):
    root, _ = messy_folder
    iterator, _ = _make(_data(source="folder", path=str(root), strict=True), batch_size=1, train=False)
    with pytest.raises(ValueError, match="h_text.png"):
        list(iterator)


def test_all_bad_folder_fails_loudly_instead_of_spinning(tmp_path):
    (tmp_path / "x.png").write_bytes(b"not an image")
    iterator, _ = _make(_data(source="folder", path=str(tmp_path)), batch_size=1)
    with pytest.raises(RuntimeError, match="failed to decode"):
        next(iterator)


def test_hosts_read_disjoint_shards(messy_folder):
    root, _ = messy_folder
    cfg = _data(source="folder", path=str(root))
    parts = [np.concatenate(list(b["image"] for b in _make(cfg, batch_size=1, train=False, shard_index=i,
                                                          shard_count=2)[0])) for i in range(2)]
    distances = np.abs(parts[0][:, None] - parts[1][None]).mean(axis=(2, 3, 4))
    assert distances.min() > 0.01


# ---------------------------------------------------------------------------------------------- determinism


def test_seed_determinism_and_flip():
    cfg = _data(source="demo")
    first = _take(_make(cfg, batch_size=4, seed=3)[0], 3)
    again = _take(_make(cfg, batch_size=4, seed=3)[0], 3)
    other = _take(_make(cfg, batch_size=4, seed=4)[0], 3)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other))
    # Training flips some images: over two epochs a photo shows up both ways round.
    unflipped = np.concatenate([b["image"] for b in _make(cfg, batch_size=1, train=False)[0]])
    seen = np.concatenate(_take(_make(cfg, batch_size=len(unflipped), seed=3)[0], 2))
    flipped = unflipped[:, :, ::-1]
    is_plain = np.isclose(np.abs(seen[:, None] - unflipped[None]).max(axis=(2, 3, 4)), 0).any(1)
    is_flip = np.isclose(np.abs(seen[:, None] - flipped[None]).max(axis=(2, 3, 4)), 0).any(1)
    assert (is_plain | is_flip).all() and is_flip.any() and is_plain.any()


def test_iterator_state_restore_continues_identically(tmp_path):
    import grain

    cfg = _data(source="demo")
    iterator, n = _make(cfg, batch_size=3, seed=7)
    _take(iterator, n // 3)  # the next batches cross into the second epoch (a fresh shuffle)
    state = iterator.get_state()
    expected = _take(iterator, 4)

    restored, _ = _make(cfg, batch_size=3, seed=7)
    restored.set_state(state)
    for a, b in zip(expected, _take(restored, 4)):
        np.testing.assert_array_equal(a, b)

    # The same through grain's checkpoint handler (what orbax calls for the data-iterator item).
    from etils import epath

    handler = grain.checkpoint.CheckpointHandler()
    fresh, _ = _make(cfg, batch_size=3, seed=7)
    _take(fresh, n // 3)
    handler.save(epath.Path(tmp_path), fresh)
    reloaded, _ = _make(cfg, batch_size=3, seed=7)
    handler.restore(epath.Path(tmp_path), reloaded)
    for a, b in zip(expected, _take(reloaded, 4)):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------- tfds


def test_tfds_source_on_a_local_array_record_dataset(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    rng = np.random.default_rng(5)
    images = {"train": [rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8) for i in range(5)],
              "validation": [rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for _ in range(2)]}

    class TinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        # tfds 4.9.10 looks for the builder's source file via importlib_resources (not installed);
        # a test-local builder has no source directory anyway.
        code_path = None

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(num_classes=2)}))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in images}

        def _generate_examples(self, split):
            for i, image in enumerate(images[split]):
                yield i, {"image": image, "label": i % 2}

    TinyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    cfg = _data(source="tfds", tfds_name="tiny_images", tfds_data_dir=str(tmp_path))
    iterator, n = _make(cfg, batch_size=2, train=True)
    assert n == 5
    assert _take(iterator, 4)[-1].shape == (2, S, S, 3)

    eval_iter, n_eval = _make(cfg, split="eval", batch_size=1, train=False)
    got = np.concatenate([b["image"] for b in eval_iter])
    assert n_eval == 2 and got.shape == (2, S, S, 3)
    ref = np.stack([decoding.adm_center_crop(Image.fromarray(a), S) for a in images["validation"]])
    ref = ref.astype(np.float32) / 127.5 - 1
    # tfds may store the split in any order: match each output to one reference image.
    assert (np.abs(got[:, None] - ref[None]).max(axis=(2, 3, 4)) < 1e-6).any(1).all()

    with pytest.raises(ValueError, match="tfds_name='no_such_dataset'"):
        _make(_data(source="tfds", tfds_name="no_such_dataset", tfds_data_dir=str(tmp_path)))


# ---------------------------------------------------------------------------------------------- latents


def test_latent_shards_round_trip(tmp_path):
    rng = np.random.default_rng(6)
    latents = [rng.standard_normal((4, 4, 8)).astype(np.float16) for _ in range(3)]
    items = [x for lat in latents for x in (lat, lat[:, ::-1])]  # each latent and its flipped copy
    assert latent_records.write_latent_shard(tmp_path / "train-00000.array_record", items) == 6
    f32 = [rng.standard_normal((4, 4, 8)).astype(np.float32) for _ in range(2)]
    assert latent_records.write_latent_shard(tmp_path / "train-00001.array_record", f32) == 2
    for got, want in zip(latent_records.iterate_latent_shard(tmp_path / "train-00000.array_record"), items):
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got, want)

    # The caching job's sidecar files (parts / done markers) beside the parts: a loose glob skips them.
    (tmp_path / "train-host000.done.json").write_text("{}")
    cfg = _data(source="latents", path=str(tmp_path / "train-*"))
    iterator, n = _make(cfg, batch_size=4, train=False)
    batches = [b["latent"] for b in iterator]
    assert n == 8 and [b.shape for b in batches] == [(4, 4, 4, 8)] * 2 and batches[0].dtype == np.float32
    np.testing.assert_array_equal(np.concatenate(batches), np.stack(items + f32).astype(np.float32))
    train_iter, _ = _make(cfg, batch_size=3, train=True)
    assert [next(train_iter)["latent"].shape for _ in range(4)] == [(3, 4, 4, 8)] * 4

    with pytest.raises(ValueError, match="h, w, C"):
        latent_records.encode_latent(np.zeros((4, 4)))


# ---------------------------------------------------------------------------------------------- config


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"config.data.source='foo' is not one of"):
        _make(_data(source="foo"))
    with pytest.raises(ValueError, match=r"config.data.image_size"):
        _make(_data(source="demo", image_size=0))
    with pytest.raises(ValueError, match=r"config.data.path='.*nowhere'.*does not exist"):
        _make(_data(source="folder", path=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match=r"config.data.path is not set"):
        _make(_data(source="folder"))
    with pytest.raises(ValueError, match=r"config.data.path is not set"):  # "" means unset too
        _make(_data(source="folder", path="", eval_path=""), split="eval")
    with pytest.raises(ValueError, match=r"contains no image files"):
        _make(_data(source="folder", path=str(tmp_path)))
    with pytest.raises(ValueError, match=r"config.data.path=.*matches no .array_record files"):
        _make(_data(source="latents", path=str(tmp_path / "*.array_record")))
    with pytest.raises(ValueError, match=r"config.data.demo_eval_names"):
        _make(_data(source="demo", demo_eval_names=("no_such_photo",)))
    with pytest.raises(ValueError, match=r"config.data.worker_count"):
        _make(_data(source="demo", worker_count=-1))
    with pytest.raises(ValueError, match=r"fewer than batch_size"):
        _make(_data(source="demo"), split="eval", batch_size=64, train=False)


@pytest.mark.parametrize("train", [True, False])
def test_global_batches_do_not_depend_on_the_number_of_hosts(train):
    """Hosts' slots put together give the one-host batches, crops and flips included; one epoch's last
    global batch (16 photos in batches of 6) is padded, and the padding never reaches a batch."""
    cfg = _data(source="demo", image_size=32, random_crop_scale=(0.5, 1.0))

    def global_batches(hosts):
        its = [_make(cfg, batch_size=6 // hosts, seed=3, train=train, drop_remainder=False, shard_index=p,
                     shard_count=hosts)[0] for p in range(hosts)]
        out = []
        for _ in range(5):
            parts = [b["image"] for b in (next(it, None) for it in its) if b is not None]
            if not parts:
                break
            out.append(np.concatenate(parts))
        return out
    one, two, three = global_batches(1), global_batches(2), global_batches(3)
    assert [len(b) for b in one] == ([6] * 5 if train else [6, 6, 4])
    for a, b, c in zip(one, two, three, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    if not train:   # every photo once: disjoint and complete
        flat = np.concatenate(three).reshape(16, -1)
        assert len({row.tobytes() for row in flat}) == 16
