"""Reconstruction evaluation on held-out images: PSNR / SSIM, codebook usage, an image grid, metrics.json.

The same fixed rng is used at every evaluation, so figures from different steps are comparable.
"""
from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from v2flow_jax import build, input_pipeline, sampling, sharding
from v2flow_jax.metrics import image as image_metrics
from v2flow_jax.metrics.codebook import CodebookUsage


def reconstruct_batch(run: build.Run, variables, data, rng):
    """Pixels (or cached unscaled latents) -> tokens -> pixels (pure; jit it).

    Returns (originals, reconstructions, token ids); originals are the input pixels, or the cached
    latents decoded by the autoencoder. With autoencoder 'none' both stay latents.
    """
    if run.config.data.source != "latents":
        originals, latents = data, build.encode_images(run, data)
    else:
        latents = data.astype(jnp.float32) * run.autoencoder.scale
        originals = build.decode_latents(run, latents)
    recon, indices = sampling.reconstruct_latents(run.model, variables, latents, rng, run.sampler)
    return originals, build.decode_latents(run, recon), indices


def _pad_to(x, rows):
    return np.concatenate([x, np.zeros((rows - x.shape[0],) + x.shape[1:], x.dtype)]) if x.shape[0] < rows else x


class Evaluator:
    """Runs `run()` at a step: reconstructs config.eval.num_images held-out images."""

    def __init__(self, run: build.Run, workdir: str):
        self.run_ = run
        self.workdir = workdir
        cfg = run.config
        dp = sharding.data_parallel_size(run.mesh)
        # A fixed batch shape (padded to the data-parallel size) means one compilation for the whole run.
        self.batch_size = -(-cfg.eval.batch_size // dp) * dp
        self._fn = jax.jit(functools.partial(reconstruct_batch, run))
        # Pixel metrics need pixels: with autoencoder 'none' only a latent-space MSE is reported.
        self.pixels = run.config.autoencoder.name != "none"
        self._psnr, self._ssim = jax.jit(image_metrics.psnr), jax.jit(image_metrics.ssim)

    def _batches(self):
        cfg = self.run_.config
        per_host = self.batch_size // jax.process_count()
        it, _ = input_pipeline.create_dataset(cfg.data, split="eval", batch_size=per_host, seed=cfg.seed,
                                              train=False, drop_remainder=False)
        seen = 0
        for batch in it:
            if seen >= cfg.eval.num_images:
                break
            images = (batch["image"] if "image" in batch else batch["latent"])[: cfg.eval.num_images - seen]
            seen += images.shape[0]
            yield images

    def run(self, params, vq, frozen, *, step: int, writer=None) -> dict:
        run, cfg = self.run_, self.run_.config
        t0 = time.perf_counter()
        variables = {"params": params, "vq": vq, "frozen": frozen}
        usage = CodebookUsage(run.model.config.codebook_size)
        psnrs, ssims, grid_rows = [], [], []
        rng = jax.random.key(cfg.seed + 12345)
        with sharding.use_mesh(run.mesh, run.rules):
            for i, images in enumerate(self._batches()):
                n = images.shape[0]
                batch = sharding.put_batch(_pad_to(images, self.batch_size), run.mesh)
                originals, recon, indices = self._fn(variables, batch, jax.random.fold_in(rng, i))
                images, recon, indices = (np.asarray(a)[:n] for a in (originals, recon, indices))
                if self.pixels:
                    psnrs.append(np.asarray(self._psnr(images, recon)))
                    ssims.append(np.asarray(self._ssim(images, recon)))
                else:
                    psnrs.append(np.mean((images - recon) ** 2, axis=(1, 2, 3)))   # latent MSE
                usage.update(indices)
                if sum(len(r) for r in grid_rows) < cfg.eval.grid_images:
                    grid_rows.extend(zip(images, recon))
        if not psnrs:
            raise ValueError("the evaluation split yielded no images: check config.data (eval_path / "
                             "demo_eval_names) and config.eval.num_images.")
        first = np.concatenate(psnrs)
        result = {"step": int(step), "num_images": int(first.size), "codebook_usage": usage.usage,
                  "codebook_perplexity": usage.perplexity}
        if self.pixels:
            result.update(psnr=float(first.mean()), ssim=float(np.concatenate(ssims).mean()))
        else:
            result.update(latent_mse=float(first.mean()))
        result["eval_seconds"] = time.perf_counter() - t0
        self._write(result, grid_rows[: cfg.eval.grid_images] if self.pixels else [], writer)
        logging.info("eval @ step %d: %s on %d images, codebook usage %.3f (%.1f s)", step,
                     (f"PSNR {result['psnr']:.2f} dB  SSIM {result['ssim']:.4f}" if self.pixels
                      else f"latent MSE {result['latent_mse']:.4f}"),
                     result["num_images"], result["codebook_usage"], result["eval_seconds"])
        return result

    def _write(self, result, pairs, writer):
        if jax.process_index() != 0:
            return
        out_dir = os.path.join(self.workdir, "eval")
        os.makedirs(out_dir, exist_ok=True)
        grid = None
        if pairs:
            # Each row: an original (left) beside its reconstruction (right).
            grid = image_metrics.image_grid([list(p) for p in pairs])
            image_metrics.save_png(os.path.join(out_dir, f"grid_step{result['step']:07d}.png"), grid)
        path = os.path.join(self.workdir, "metrics.json")
        history = []
        if os.path.exists(path):
            with open(path) as f:
                history = [h for h in json.load(f).get("history", []) if h["step"] != result["step"]]
        history = sorted(history + [result], key=lambda h: h["step"])
        image_metrics.write_json_metrics(path, {"latest": result, "history": history})
        if writer is not None:
            writer.write_scalars(result["step"], {f"eval/{k}": v for k, v in result.items() if k != "step"})
            if grid is not None:
                writer.write_images(result["step"], {"eval/reconstructions": grid[None]})
