"""LPIPS and reconstruction FID for the evaluator, when their weights are configured.

`config.eval.lpips_weights` and `config.eval.inception_weights` name the safetensors files that
`python -m v2flow_jax.convert.lpips_weights` and `... .inception_weights` write, once, from the files
users hold; empty means skipped, and the result says so and why. Both files are read when the
evaluator is built (before training), so a wrong path fails at start-up, not after hours.

rFID compares the Inception statistics of the reconstructions with those of the same originals, over
every evaluated image (config.eval.num_images; FID is biased upwards for small sets: compare rFIDs only
at the same count). The evaluator hands over batches that every host already holds whole, so every host
computes the same statistics.
"""
from __future__ import annotations

import jax
import numpy as np

from v2flow_jax.metrics import frechet, inception, lpips

SKIP_HINT = {
    "lpips": "config.eval.lpips_weights is empty (convert once: python -m v2flow_jax.convert.lpips_weights "
             "--vgg16=vgg16-397923af.pth --out=lpips_vgg.safetensors)",
    "rfid": "config.eval.inception_weights is empty (convert once: python -m v2flow_jax.convert.inception_weights "
            "--pth=pt_inception-2015-12-05-6726825d.pth --out=fid_inception.safetensors)",
}


class PerceptualMetrics:
    """Accumulates LPIPS per image and Inception statistics of originals and reconstructions."""

    def __init__(self, lpips_weights: str = "", inception_weights: str = ""):
        self._lpips = None
        if lpips_weights:
            params = lpips.load_lpips_params(lpips_weights)
            self._lpips = lambda x, y: lpips.lpips_distance(params, x, y)
        self._features = None
        if inception_weights:
            self._features = inception.feature_fn(inception.load_inception_params(inception_weights))
        self.reset()

    @classmethod
    def from_config(cls, eval_config) -> "PerceptualMetrics":
        return cls(str(eval_config.get("lpips_weights", "")), str(eval_config.get("inception_weights", "")))

    @property
    def skipped(self) -> dict[str, str]:
        """Metric -> why it is not computed."""
        return {k: v for k, v in SKIP_HINT.items() if (self._lpips if k == "lpips" else self._features) is None}

    def reset(self) -> None:
        self._distances: list[np.ndarray] = []
        self._real = frechet.StreamingStatistics(2048)
        self._fake = frechet.StreamingStatistics(2048)

    def update(self, originals: np.ndarray, reconstructions: np.ndarray) -> None:
        """One batch of images in [-1, 1], NHWC."""
        if self._lpips is not None:
            self._distances.append(np.asarray(jax.device_get(self._lpips(originals, reconstructions))))
        if self._features is not None:
            self._real.update(np.asarray(self._features(originals), np.float64))
            self._fake.update(np.asarray(self._features(reconstructions), np.float64))

    def result(self) -> dict:
        out: dict = {}
        if self._distances:
            out["lpips"] = float(np.concatenate(self._distances).mean())
        if self._features is not None and self._real.count >= 2:
            out["rfid"] = frechet.frechet_distance(*self._real.statistics(), *self._fake.statistics())
            out["rfid_num_images"] = int(self._real.count)
        if self.skipped:
            out["skipped_metrics"] = self.skipped
        return out
