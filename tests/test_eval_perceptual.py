"""LPIPS and rFID in the evaluator: computed when their weights are configured, skipped with a reason
when not (random weights written here in our safetensors layout; the oracle tests of the networks
themselves are tests/test_lpips.py and tests/test_inception.py)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from safetensors.numpy import save_file

import tiny_configs
from v2flow_jax.metrics import frechet, inception, lpips, perceptual


def _lpips_file(path):
    rng = np.random.default_rng(0)
    save_file({k: (rng.standard_normal(s) * 0.1).astype(np.float32) if "lin" not in k else
               np.abs(rng.standard_normal(s)).astype(np.float32) for k, s in lpips.param_shapes().items()}, path)
    return str(path)


def _inception_file(path):
    rng = np.random.default_rng(1)
    tensors = {}
    for key, leaf in inception.expected_variables().items():
        scale = 1.0 if "var" in key or key.endswith("scale") else 0.05
        x = rng.standard_normal(leaf.shape) * scale
        tensors[key] = (np.abs(x) + 0.5 if "var" in key else x).astype(np.float32)
    save_file(tensors, path)
    return str(path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("perceptual")
    return _lpips_file(d / "lpips.safetensors"), _inception_file(d / "inception.safetensors")


def test_metrics_equal_a_direct_computation_and_see_the_difference(weights):
    rng = np.random.default_rng(2)
    originals = np.tanh(rng.standard_normal((6, 32, 32, 3))).astype(np.float32)
    noisy = np.clip(originals + 0.5 * rng.standard_normal(originals.shape), -1, 1).astype(np.float32)
    m = perceptual.PerceptualMetrics(*weights)
    m.update(originals[:4], noisy[:4])
    m.update(originals[4:], noisy[4:])          # two batches, as the evaluator feeds them
    got = m.result()
    assert "skipped_metrics" not in got and got["rfid_num_images"] == 6
    params = lpips.load_lpips_params(weights[0])
    np.testing.assert_allclose(got["lpips"], np.asarray(lpips.lpips_distance(params, originals, noisy)).mean(),
                               rtol=1e-5)
    features = inception.feature_fn(inception.load_inception_params(weights[1]))
    want = frechet.frechet_distance_from_features(np.asarray(features(originals), np.float64),
                                                  np.asarray(features(noisy), np.float64))
    np.testing.assert_allclose(got["rfid"], want, rtol=1e-6)
    m.reset()
    m.update(originals, originals)
    same = m.result()
    assert same["lpips"] < 1e-9 and abs(same["rfid"]) < 1e-3 * got["rfid"] and got["lpips"] > 1e-3


def test_without_weights_the_result_says_what_was_skipped_and_why():
    out = perceptual.PerceptualMetrics().result()
    assert set(out) == {"skipped_metrics"}
    assert "config.eval.lpips_weights is empty" in out["skipped_metrics"]["lpips"]
    assert "config.eval.inception_weights is empty" in out["skipped_metrics"]["rfid"]
    with pytest.raises(lpips.LPIPSWeightsError, match="does not exist"):
        perceptual.PerceptualMetrics(lpips_weights="/nonexistent/lpips.safetensors")


def test_evaluation_reports_lpips_and_says_rfid_is_skipped(weights, tmp_path, tmp_path_factory):
    import shutil
    workdir = tmp_path / "run"      # a copy: the evaluation rewrites metrics.json's entry for its step
    shutil.copytree(tiny_configs.shared_run(tmp_path_factory)[0], workdir)
    proc = tiny_configs.run_main(workdir, *tiny_configs.SHARED_FLAGS, "--config.mode=evaluate",
                                 f"--config.eval.lpips_weights={weights[0]}", arg=tiny_configs.SHARED_ARG,
                                 cache_dir=tiny_configs.compile_cache(tmp_path_factory))
    assert re.search(r"LPIPS \d+\.\d{4}, rFID -", proc.stdout) and "rfid skipped: config.eval.inception_weights is empty" in proc.stdout, \
        proc.stdout[-3000:]
    latest = json.loads((workdir / "metrics.json").read_text())["latest"]
    assert 0 < latest["lpips"] and set(latest["skipped_metrics"]) == {"rfid"}
