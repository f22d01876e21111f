"""config.mode='cache_latents': the cached records, resuming after a kill, and training on the cache.

The demo config (64x64 photos in 4x4 pixel patches, so a latent is (16, 16, 48)) over the 8 in-process
test devices; the demo's 'train' split has 16 photos. A part holds `images_per_part` images, i.e. twice
as many records (each image, then its horizontal flip).
"""
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from v2flow_jax import cache_latents, demo_config, input_pipeline
from v2flow_jax.data import decoding, latent_records, sources

import tiny_configs

PER_PART = 3
LATENT_SHAPE = (16, 16, 48)


def demo_cache_config(per_part=PER_PART, **overrides):
    c = demo_config.get_config()
    c.mode = "cache_latents"
    c.mesh = [("data", -1)]
    c.batch_size = 8
    c.cache.images_per_part = per_part
    c.data.demo_grayscale = True       # all 16 training photos: enough images for several parts
    for k, v in overrides.items():
        c[k] = v
    return c


def md5s(out_dir):
    return {os.path.basename(p): hashlib.md5(open(p, "rb").read()).hexdigest()
            for p in sorted(glob.glob(os.path.join(out_dir, "*.array_record")))}


def records(out_dir):
    return [r for p in sorted(glob.glob(os.path.join(out_dir, "*.array_record")))
            for r in latent_records.iterate_latent_shard(p)]


def copy_interrupted(out_dir, dst, complete):
    """What a job killed before finishing part `complete` leaves: every file it wrote (parts 0..complete-1
    and any bookkeeping) except later parts and the done marker."""
    dst.mkdir()
    for path in glob.glob(os.path.join(out_dir, "*")):
        m = cache_latents.PART_RE.search(path)
        if path.endswith(".done.json") or (m and int(m.group(1)) >= complete):
            continue
        shutil.copy(path, dst / os.path.basename(path))


def expected_latents(config):
    """(originals, flips) computed here: the pipeline's decode, the ADM crop and a numpy patchify."""
    photos = sources.demo_photos()
    names = sources.demo_split_names(config.data, "train")
    size, p = config.image_size, config.autoencoder.patch_size

    def patchify(x):
        h = size // p
        return x.reshape(h, p, h, p, 3).transpose(0, 2, 1, 3, 4).reshape(h, h, p * p * 3)

    originals, flips = [], []
    for name in names:
        rgb, _ = decoding.load_image(photos[name])
        crop = decoding.adm_center_crop(Image.fromarray(rgb), size).astype(np.float32) / 127.5 - 1.0
        originals.append(patchify(crop))
        flips.append(patchify(crop[:, ::-1]))
    return originals, flips


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(out_dir, summary, md5s, config) of one uninterrupted caching job with PER_PART images per part."""
    workdir = tmp_path_factory.mktemp("cache_full")
    config = demo_cache_config()
    summary = cache_latents.run(config, str(workdir))
    out_dir = os.path.join(workdir, "latents")
    return out_dir, summary, md5s(out_dir), config


def test_parts_summary_and_records(uninterrupted):
    out_dir, summary, sums, config = uninterrupted
    n = len(sources.demo_split_names(config.data, "train"))
    parts = -(-n // PER_PART)
    assert summary["split"] == "train" and summary["host"] == 0
    assert summary["images"] == n and summary["records"] == 2 * n and summary["parts"] == parts
    assert summary["latent_shape"] == list(LATENT_SHAPE)
    assert sorted(sums) == [f"train-host000-part{k:05d}.array_record" for k in range(parts)]
    assert not glob.glob(os.path.join(out_dir, "*.tmp"))
    with open(os.path.join(out_dir, "train-host000.done.json")) as f:
        assert json.load(f) == summary
    # Every part holds PER_PART images (2 records each), the last one the rest.
    sizes = [len(list(latent_records.iterate_latent_shard(os.path.join(out_dir, name)))) for name in sorted(sums)]
    assert sizes == [2 * PER_PART] * (parts - 1) + [2 * (n - PER_PART * (parts - 1))]


def test_records_are_the_latents_of_each_image_then_its_flip(uninterrupted):
    out_dir, _, _, config = uninterrupted
    got = records(out_dir)
    originals, flips = expected_latents(config)
    assert len(got) == 2 * len(originals)
    for i, (orig, flip) in enumerate(zip(originals, flips)):
        assert got[2 * i].shape == LATENT_SHAPE and got[2 * i].dtype == np.float32
        np.testing.assert_allclose(got[2 * i], orig, atol=1e-6, err_msg=f"image {i}")
        np.testing.assert_allclose(got[2 * i + 1], flip, atol=1e-6, err_msg=f"flip of image {i}")
        assert not np.array_equal(got[2 * i], got[2 * i + 1])   # no photo is left-right symmetric


def test_finished_job_rerun_is_a_no_op(uninterrupted):
    out_dir, summary, sums, config = uninterrupted
    mtimes = {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(out_dir, "*"))}
    assert cache_latents.run(config, os.path.dirname(out_dir)) == summary
    assert {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(out_dir, "*"))} == mtimes
    assert md5s(out_dir) == sums


@pytest.mark.parametrize("complete", [0, 2])
def test_resume_after_a_kill_during_a_write(uninterrupted, tmp_path, complete):
    """What a kill while writing part K leaves: parts 0..K-1, a garbage part K .tmp, no done marker."""
    out_dir, summary, sums, config = uninterrupted
    resumed = tmp_path / "latents"
    copy_interrupted(out_dir, resumed, complete)
    tmp = resumed / f"train-host000-part{complete:05d}.array_record.tmp"
    tmp.write_bytes(os.urandom(5000))
    assert cache_latents.complete_parts(str(resumed), "train", 0) == complete
    assert cache_latents.run(config, str(tmp_path)) == summary
    assert md5s(resumed) == sums
    assert not tmp.exists(), "the .tmp of the interrupted part should be overwritten by its rewrite"
    assert not glob.glob(str(resumed / "*.tmp"))
    assert (resumed / "train-host000.done.json").exists()


def test_resume_after_the_last_part_before_the_done_marker(uninterrupted, tmp_path):
    """A kill between the last part's rename and the done marker: the rerun only writes the marker,
    and the summary it records must be the uninterrupted run's (latent_shape included)."""
    out_dir, summary, sums, config = uninterrupted
    resumed = tmp_path / "latents"
    copy_interrupted(out_dir, resumed, len(sums))
    assert cache_latents.run(config, str(tmp_path)) == summary
    assert md5s(resumed) == sums


def test_resume_with_another_images_per_part_is_refused_or_correct(uninterrupted, tmp_path):
    """Parts written with images_per_part=3, the rerun with 1: the skip count (complete parts x the NEW
    part size) must not silently duplicate or drop images. Either the job refuses (ValueError naming
    config.cache.images_per_part) or the cache holds every image and flip exactly once, in order."""
    out_dir, _, sums, config = uninterrupted
    resumed = tmp_path / "latents"
    copy_interrupted(out_dir, resumed, 2)
    try:
        cache_latents.run(demo_cache_config(per_part=1), str(tmp_path))
    except ValueError as e:
        assert "config.cache.images_per_part" in str(e)
        return
    got, want = records(str(resumed)), records(out_dir)
    n_got, n_want = len(got), len(want)
    assert n_got == n_want, f"{n_got} records cached, {n_want} expected (images duplicated or dropped)"
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_real_sigkill_then_resume_matches_uninterrupted(tmp_path):
    """`python -m v2flow_jax.main ... --config.mode=cache_latents` killed after its first part, resumed here
    (a different batch size and mesh) -> the same files as an uninterrupted run of the same part size."""
    killed_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "v2flow_jax.main", "--config=configs/tok256.py:demo",
           "--config.mode=cache_latents", "--config.cache.images_per_part=1",
           # One image per batch on one device: a part per step, slow enough to be killed mid-way.
           "--config.batch_size=1", "--config.data.read_threads=1",
           f"--workdir={killed_dir}"]
    out = killed_dir / "latents"
    first = out / "train-host000-part00000.array_record"
    killed = False
    for _ in range(3):
        shutil.rmtree(killed_dir, ignore_errors=True)
        proc = subprocess.Popen(cmd, cwd=tiny_configs.REPO_ROOT, env=tiny_configs.main_env(1),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while proc.poll() is None and not first.exists() and time.monotonic() < deadline:
            time.sleep(0.001)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        log = proc.communicate()[0].decode(errors="replace")
        assert first.exists(), f"the job never wrote its first part (rc {proc.returncode}):\n{log[-4000:]}"
        if not (out / "train-host000.done.json").exists():
            killed = True
            break
    if not killed:
        pytest.skip("the caching job finished before the kill three times (the deterministic kill tests cover it)")
    config = demo_cache_config(per_part=1)
    assert 1 <= cache_latents.complete_parts(str(out), "train", 0) < len(
        sources.demo_split_names(config.data, "train"))
    summary = cache_latents.run(config, str(killed_dir))
    full_dir = tmp_path / "full"
    assert cache_latents.run(config, str(full_dir)) == summary
    assert md5s(out) == md5s(full_dir / "latents")
    assert len(md5s(out)) == summary["parts"] == summary["images"]
    assert not glob.glob(str(out / "*.tmp"))


def test_training_reads_the_cached_latents(uninterrupted):
    """config.data.source='latents' over the cache's glob. (A full train_and_evaluate on it takes ~85 s on
    2 CPU cores, too slow here: the data path up to the train step's input is checked instead.)"""
    out_dir, summary, _, _ = uninterrupted
    pattern = os.path.join(out_dir, "train-*.array_record")
    config = tiny_configs.tiny_config(**{
        "image_size": 64, "autoencoder.patch_size": 4, "model.latent_size": 16, "model.latent_channels": 48,
        "data.source": "latents", "data.path": pattern, "data.image_size": 64, "data.demo_grayscale": True})
    # The cache as training reads it: (B, 16, 16, 48) float32 latents, 2 records per image.
    it, n = input_pipeline.create_dataset(config.data, split="train", batch_size=8, seed=0, train=False)
    assert n == summary["records"]
    batches = list(it)
    assert [b["latent"].shape for b in batches] == [(8,) + LATENT_SHAPE] * (n // 8)
    assert all(b["latent"].dtype == np.float32 for b in batches)
    np.testing.assert_array_equal(np.concatenate([b["latent"] for b in batches]), np.stack(records(out_dir)))

    # Evaluation on cached latents shows the originals through the autoencoder's decoder: the photos.
    from v2flow_jax import build
    from v2flow_jax.models import autoencoders
    run = build.build_run(config)
    pixels = np.asarray(autoencoders.latents_to_images(run.autoencoder, run.ae_params,
                                                      batches[0]["latent"][0::2] * run.autoencoder.scale))
    photos = sources.demo_photos()
    crops = [decoding.adm_center_crop(Image.fromarray(decoding.load_image(photos[name])[0]), 64)
             for name in sources.demo_split_names(config.data, "train")[:4]]
    np.testing.assert_allclose(pixels, np.stack(crops).astype(np.float32) / 127.5 - 1.0, atol=1e-6)
    # The train step's input: the cached latents times the autoencoder scale (1 for pixels).
    from v2flow_jax import train
    np.testing.assert_array_equal(np.asarray(train.batch_latents(run, run.ae_params, batches[0])), batches[0]["latent"])
