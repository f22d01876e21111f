"""The Python API on a trained tiny run: `Tokenizer.from_workdir` encode / decode / reconstruct, input
checks, and `main` in mode 'evaluate'.

The run is tiny_configs.shared_run (trained once per pytest process, shared with test_train.py). The
Tokenizer is loaded in-process on conftest's 8 virtual devices, so its batches are padded to 8 rows.
"""
from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

import tiny_configs
from v2flow_jax.api import Tokenizer, as_model_images


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tiny_configs.shared_run(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def tok(workdir):
    assert jax.device_count() == 8
    return Tokenizer.from_workdir(str(workdir))


@pytest.fixture(scope="module")
def images():
    """Three 32x32 uint8 photos (the demo's held-out ones, centre-cropped like the pipeline does)."""
    from v2flow_jax.data import decoding, sources
    photos = sources.demo_photos()
    return np.stack([decoding.adm_center_crop(Image.open(photos[name]), 32)
                     for name in ("astronaut", "coffee", "chelsea")])


def test_from_workdir_loads_the_last_checkpoint(tok):
    assert tok.step == tiny_configs.SHARED_STEPS
    cfg = tok.run.model.config
    assert cfg.vocab_size == 64 and cfg.num_tokens == 64 and cfg.codebook_size == 64
    # 8 virtual devices, mesh [("data", -1), ...] from the saved config.
    assert tok.run.mesh.shape["data"] == 8


def test_from_workdir_reads_only_what_inference_needs(workdir, monkeypatch):
    """No optimizer is built and orbax reads only the EMA weights and the VQ state, not the optimizer's
    moments (twice the weights) or the live params."""
    import optax
    from v2flow_jax import checkpointing, train
    for name in ("adamw", "adam", "chain"):
        monkeypatch.setattr(optax, name, lambda *a, **k: pytest.fail("an optimizer was built"))
    monkeypatch.setattr(train, "make_optimizer", lambda *a, **k: pytest.fail("the trainer was asked"))
    asked = []
    real = checkpointing.Checkpointer.restore_subtree

    def recording(self, step, items):
        asked.append(sorted(items))
        return real(self, step, items)
    monkeypatch.setattr(checkpointing.Checkpointer, "restore_subtree", recording)
    loaded = Tokenizer.from_workdir(str(workdir))
    assert asked == [["ema_params", "vq"]]
    assert set(loaded.variables) == {"frozen", "params", "vq"}
    saved = jax.tree.leaves(_load_ema(workdir, loaded.step))
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(loaded.variables["params"])[0]), saved[0])


def _load_ema(workdir, step):
    import orbax.checkpoint as ocp
    state = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
    return state["ema_params"]


def test_encode_is_int32_and_deterministic(tok, images):
    ids = tok.encode(images)
    assert ids.dtype == np.int32 and ids.shape == (3, 64)
    assert ids.min() >= 0 and ids.max() < 64
    np.testing.assert_array_equal(ids, tok.encode(images))
    # uint8 and the same pixels as floats in [-1, 1] give the same tokens.
    np.testing.assert_array_equal(ids, tok.encode(images.astype(np.float32) / 127.5 - 1.0))
    # Each row is encoded on its own: the padding rows of the 8-device batch change nothing.
    np.testing.assert_array_equal(ids[:1], tok.encode(images[:1]))


def test_decode_range_shape_and_keys(tok, images):
    ids = tok.encode(images)
    a = tok.decode(ids, jax.random.key(0))
    assert a.shape == (3, 32, 32, 3) and a.dtype == np.float32
    assert np.all(np.isfinite(a)) and a.min() >= -1.0 and a.max() <= 1.0
    np.testing.assert_array_equal(a, tok.decode(ids, jax.random.key(0)))
    b = tok.decode(ids, jax.random.key(1))
    assert np.abs(a - b).max() > 1e-3
    # Random token ids (what an LLM could emit) decode too.
    ids_random = np.random.default_rng(0).integers(0, 64, (5, 64)).astype(np.int32)
    assert tok.decode(ids_random, jax.random.key(0)).shape == (5, 32, 32, 3)


def test_reconstruct_batch_not_divisible_by_devices(tok, images):
    out = tok.reconstruct(images, jax.random.key(0))           # 3 rows on 8 data-parallel devices
    assert out.shape == images.shape and out.dtype == np.float32
    assert np.all(np.isfinite(out)) and out.min() >= -1.0 and out.max() <= 1.0
    np.testing.assert_array_equal(out, tok.reconstruct(images, jax.random.key(0)))
    assert np.abs(out - tok.reconstruct(images, jax.random.key(1))).max() > 1e-3
    assert np.abs(out[0] - out[1]).max() > 1e-3                # not one row copied into the others


@pytest.mark.parametrize("bad", [
    np.zeros((2, 63), np.int32),                 # wrong number of tokens
    np.zeros((64,), np.int32),                   # no batch axis
    np.full((2, 64), 64, np.int32),              # id == codebook_size
    np.full((2, 64), -1, np.int32),              # negative id
])
def test_decode_rejects_bad_ids(tok, bad):
    with pytest.raises(ValueError):
        tok.decode(bad, jax.random.key(0))


@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, 32, 32), np.uint8), "grayscale"),
    (np.zeros((2, 32, 32, 4), np.uint8), "RGBA"),
    (np.zeros((2, 48, 48, 3), np.uint8), "adm_center_crop"),            # another size: resize it first
    (np.zeros((2, 32, 32, 3), np.int64), "uint8"),                       # integers that are not bytes
    (np.full((2, 32, 32, 3), 200.0, np.float32), "value_range=\\(0, 255\\)"),  # 0..255 passed as floats
    (np.full((2, 32, 32, 3), -1.5, np.float32), "must lie in"),
    (np.where(np.arange(3)[:, None, None, None] == 1, np.nan, 0.0) * np.ones((3, 32, 32, 3)), "\\[1\\]"),
])
def test_input_contract_refuses_with_the_fix(bad, match):
    with pytest.raises(ValueError, match=match):
        as_model_images(bad, 32)


def test_input_contract_value_ranges_agree():
    """The same picture as uint8, as floats in (0, 255), (0, 1) and (-1, 1) reaches the model identically."""
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    want = u8.astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(as_model_images(u8, 32), want, atol=1e-6)
    np.testing.assert_allclose(as_model_images(u8.astype(np.float64), 32, (0, 255)), want, atol=1e-6)
    np.testing.assert_allclose(as_model_images(u8 / 255.0, 32, (0, 1)), want, atol=1e-6)
    np.testing.assert_allclose(as_model_images(want, 32), want, atol=1e-6)
    with pytest.raises(ValueError, match="value_range"):
        as_model_images(want, 32, (0, 2))


def test_encode_rejects_bad_images(tok):
    with pytest.raises(ValueError, match="grayscale"):
        tok.encode(np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="RGBA"):
        tok.encode(np.zeros((2, 32, 32, 4), np.uint8))


def test_empty_batches_give_empty_results(tok):
    n = tok.num_tokens
    assert tok.encode(np.zeros((0, 32, 32, 3), np.uint8)).shape == (0, n)
    assert tok.decode(np.zeros((0, n), np.int32), jax.random.key(0)).shape == (0, *tok.image_shape)
    assert tok.reconstruct(np.zeros((0, 32, 32, 3), np.float32), jax.random.key(0)).shape == (0, *tok.image_shape)


def test_value_range_reaches_the_model(tok, images):
    """encode(uint8) and encode(floats in (0, 1), value_range=(0, 1)) are the same tokens."""
    np.testing.assert_array_equal(tok.encode(images), tok.encode(images / 255.0, value_range=(0, 1)))


@pytest.fixture(scope="module")
def evaluated(workdir, tmp_path_factory):
    """`main` with --config.mode=evaluate on a copy of the run (its metrics.json and grids removed)."""
    copy = tmp_path_factory.mktemp("evaluate") / "run"
    shutil.copytree(workdir, copy)
    os.remove(copy / "metrics.json")
    shutil.rmtree(copy / "eval")
    tiny_configs.run_main(copy, "--config.mode=evaluate", *tiny_configs.SHARED_FLAGS, arg=tiny_configs.SHARED_ARG,
                          cache_dir=tiny_configs.compile_cache(tmp_path_factory))
    return copy


def test_evaluate_mode_writes_metrics_and_grid(evaluated):
    n = tiny_configs.SHARED_STEPS
    with open(evaluated / "metrics.json") as f:
        result = json.load(f)
    latest = result["latest"]
    assert latest["step"] == n and latest["num_images"] == 3
    assert np.isfinite(latest["psnr"]) and np.isfinite(latest["ssim"]) and latest["psnr"] > 0
    assert [h["step"] for h in result["history"]] == [n]
    grid = evaluated / "eval" / f"grid_step{n:07d}.png"
    assert grid.exists()
    width, height = Image.open(grid).size
    assert width > 2 * 32 and height > 3 * 32          # 3 rows of (original | reconstruction)


def test_evaluate_mode_reproduces_the_trainers_evaluation(workdir, evaluated):
    """Same parameters, images, sampler rng and device count as the trainer's evaluation at that step,
    so the same figures. (With a random placeholder vocabulary table this needs the Tokenizer to rebuild
    the very table the run trained with.)"""
    n = tiny_configs.SHARED_STEPS
    with open(os.path.join(workdir, "metrics.json")) as f:
        trained = {h["step"]: h for h in json.load(f)["history"]}[n]
    with open(evaluated / "metrics.json") as f:
        latest = json.load(f)["latest"]
    for key in ("psnr", "ssim", "codebook_usage", "codebook_perplexity"):
        assert latest[key] == pytest.approx(trained[key], rel=1e-6), (key, latest[key], trained[key])
