"""Reconstruction evaluation on held-out images: metrics that a collapsed tokenizer cannot pass.

Every evaluation reports, on the same images and with the same sampler rng:
  * PSNR / SSIM of the reconstructions with the configured decode (`config.sampler`), without
    guidance (w = 1), and with the other decode (mean <-> sample);
  * the same with the token ids swapped between images (image i decoded from image i+1's ids) and
    the token-dependence gap `token_gap_db` = own - swapped PSNR: near 0 when the decoder ignores
    its tokens, however good the PSNR looks;
  * the trivial floors (flat grey, mean colour, patch-mean colour) on the same images;
  * codebook usage / perplexity and, with a vocabulary, its perplexity and token entropy, pooled over
    the evaluation set; the vocabulary-alignment diagnostic (metrics/alignment.py) and the nearest
    vocabulary words of a few images' tokens.
All of it goes to metrics.json and the console. A fixed rng is used at every evaluation, so figures
from different steps are comparable.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from v2flow_jax import build, input_pipeline, sampling, sharding
from v2flow_jax.metrics import alignment, floors, perceptual
from v2flow_jax.models import autoencoders
from v2flow_jax.metrics import image as image_metrics
from v2flow_jax.metrics.codebook import CodebookUsage

WORDS_IMAGES, WORDS_TOKENS = 3, 16     # nearest words: of the first tokens of the first images


def encode_batch(run: build.Run, variables, ae_params, data):
    """Pixels (or cached unscaled latents) -> (originals, encode outputs). Pure; jit it.

    Originals are the input pixels, or the cached latents decoded by the autoencoder (with
    autoencoder 'none' they stay latents).
    """
    ae = run.autoencoder
    if run.config.data.source != "latents":
        originals, latents = data, autoencoders.images_to_latents(ae, ae_params, data)
    else:
        latents = data.astype(jnp.float32) * ae.scale
        originals = autoencoders.latents_to_images(ae, ae_params, latents)
    enc = run.model.apply(variables, latents, method=run.model.encode)
    return originals, enc


def decode_batch(run: build.Run, variables, ae_params, indices, rng, cfg):
    """Token ids -> pixels (or latents with autoencoder 'none'). Pure; jit it with cfg static."""
    latents = sampling.decode_indices(run.model, variables, indices, rng, cfg)
    return autoencoders.latents_to_images(run.autoencoder, ae_params, latents)


def _pad_to(x, rows):
    return np.concatenate([x, np.zeros((rows - x.shape[0],) + x.shape[1:], x.dtype)]) if x.shape[0] < rows else x


def decode_variants(sampler: sampling.SamplerConfig) -> dict[str, sampling.SamplerConfig]:
    """Result-key suffix -> sampler config: the configured decode (''), unguided, and the other decode."""
    variants = {"": sampler}
    if sampler.guided:
        variants["_unguided"] = dataclasses.replace(sampler, cfg_scale=1.0)
    other = "mean" if sampler.decode == "sample" else "sample"
    variants[f"_{other}"] = dataclasses.replace(sampler, decode=other)
    return variants


def swap_ids(indices, real):
    """Image i gets the next real image's ids (cyclically); `real`: a row mask, or n for the first n rows."""
    rows = np.flatnonzero(real) if np.ndim(real) else np.arange(int(real))
    out = np.array(indices)
    out[rows] = out[np.roll(rows, -1)]
    return out


def _unboxed(vq) -> dict:
    """The quantizer's state ('codebook', ...) out of the 'vq' collection, without axis boxes."""
    from flax import linen as nn
    from flax import traverse_util
    flat = traverse_util.flatten_dict(nn.unbox(vq))
    return {k[-1]: v for k, v in flat.items()}


def _diagnostic_vocabulary(run: build.Run):
    """(table (V, d) numpy, words, first_row) for the alignment diagnostic, or (None, None, 0).

    The configured LLM table (a random placeholder has nothing to align with). Without a vocabulary
    (model.vocab_size = 0) the same checkpoint's rows still serve as the reference when they are as
    wide as the codes: that is how the no-vocabulary variant is compared (plain VQ codes in a space
    of the LLM's width, unrelated to its rows).
    """
    from v2flow_jax.convert import embedding_table
    cfg, mc = run.config, run.model.config
    spec = cfg.vocabulary.checkpoint
    if not spec:
        return None, None, 0
    path = build.resolve_checkpoint_dir(spec)
    first_row = int(cfg.vocabulary.get("first_row", 0))
    rows = mc.vocab_size or int(cfg.vocabulary.get("diagnostic_rows", 0)) or None
    try:
        source = embedding_table.embedding_table(path, cfg.vocabulary.tensor_name)
        if source.check()[1] != mc.code_dim:
            return None, None, 0
        table = np.asarray(source.load(num_tokens=rows, first_row=first_row))
    except (OSError, ValueError) as e:
        logging.warning("No vocabulary-alignment diagnostic: %s", e)
        return None, None, 0
    return table, source.words(), first_row


class Evaluator:
    """Runs `run()` at a step: reconstructs config.eval.num_images held-out images."""

    def __init__(self, run: build.Run, workdir: str):
        self.run_ = run
        self.workdir = workdir
        cfg = run.config
        dp = sharding.data_parallel_size(run.mesh)
        # A fixed batch shape (padded to the data-parallel size) means one compilation for the whole run.
        self.batch_size = -(-cfg.eval.batch_size // dp) * dp
        self._encode = jax.jit(functools.partial(encode_batch, run))
        self._decode = jax.jit(functools.partial(decode_batch, run), static_argnames=("cfg",))
        self.variants = decode_variants(run.sampler)
        # Pixel metrics need pixels: with autoencoder 'none' only a latent-space MSE is reported.
        self.pixels = run.config.autoencoder.name != "none"
        self._psnr, self._ssim = jax.jit(image_metrics.psnr), jax.jit(image_metrics.ssim)
        mc = run.model.config
        self.patch = cfg.image_size // math.isqrt(mc.num_tokens) if self.pixels else 1
        self._table, self._words, self._first_row = _diagnostic_vocabulary(run)
        # Read now: a wrong weights path fails before training, not at the first evaluation.
        self.perceptual = perceptual.PerceptualMetrics.from_config(cfg.eval) if self.pixels else None

    def check_data(self) -> None:
        """Opens the evaluation split once (at start-up): a missing folder fails before training, not after."""
        cfg = self.run_.config
        input_pipeline.create_dataset(cfg.data, split="eval", batch_size=self.batch_size // jax.process_count(),
                                      seed=cfg.seed, train=False, drop_remainder=False)

    def _batches(self):
        cfg = self.run_.config
        per_host = self.batch_size // jax.process_count()
        it, num_records = input_pipeline.create_dataset(cfg.data, split="eval", batch_size=per_host, seed=cfg.seed,
                                                        train=False, drop_remainder=False)
        # Every host runs the same number of (collective) steps; a host whose slots ran out sends no rows.
        # num_images counts global positions: host p holds slots [p*b, (p+1)*b) of each global batch.
        host, hosts = jax.process_index(), jax.process_count()
        total = min(cfg.eval.num_images, num_records)
        for k in range(input_pipeline.global_batches(total, per_host, hosts, drop_remainder=False)):
            batch = next(it, None)
            if batch is None:
                images = np.zeros((0,) + self._example_shape(), np.float32)
            else:
                images = batch["image"] if "image" in batch else batch["latent"]
            yield images[: max(0, min(per_host, total - (k * hosts + host) * per_host))]

    def _example_shape(self) -> tuple[int, ...]:
        """One input's shape: an image, or (cached latents) what the autoencoder makes of one."""
        run, size = self.run_, self.run_.config.data.image_size
        image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
        if run.config.data.source != "latents":
            return image.shape[1:]
        return jax.eval_shape(functools.partial(autoencoders.images_to_latents, run.autoencoder), run.ae_params,
                              image).shape[1:]

    def _scores(self, originals, recon):
        """Per-image (psnr, ssim), or (latent MSE, None) without pixels."""
        if self.pixels:
            return np.asarray(self._psnr(originals, recon)), np.asarray(self._ssim(originals, recon))
        return np.mean((originals - recon) ** 2, axis=(1, 2, 3)), None

    def run(self, params, vq, *, step: int, writer=None, input_stats: dict | None = None) -> dict:
        """Metrics at `step` (also written to metrics.json); `input_stats`: the training input's skipped /
        converted file counts (data.decoding.PipelineStats.as_dict), recorded beside them."""
        run, cfg = self.run_, self.run_.config
        t0 = time.perf_counter()
        variables, ae_params = run.variables(params, vq), run.ae_params
        mc = run.model.config
        usage = CodebookUsage(mc.codebook_size)
        scores: dict[str, list] = {}
        vocab_probs, vocab_entropy, grid_rows, word_ids = [], [], [], []
        if self.pixels:
            self.perceptual.reset()
        rng = jax.random.key(cfg.seed + 12345)

        def add(name, psnr, ssim):
            scores.setdefault(name, []).append((psnr, ssim))

        per_host = self.batch_size // jax.process_count()
        with sharding.use_mesh(run.mesh, run.rules):
            for i, images in enumerate(self._batches()):
                real = sharding.real_rows(images.shape[0], per_host, run.mesh)   # of the global batch
                if not real.any():
                    continue
                batch = sharding.put_batch(_pad_to(images, per_host), run.mesh)
                originals, enc = self._encode(variables, ae_params, batch)
                ids, originals = sharding.to_host(enc["indices"]), sharding.to_host(originals)[real]
                key = jax.random.fold_in(rng, i)
                recon = None
                for suffix, scfg in self.variants.items():
                    out = sharding.to_host(self._decode(variables, ae_params, enc["indices"], key, cfg=scfg))[real]
                    recon = out if suffix == "" else recon
                    add(suffix, *self._scores(originals, out))
                if real.sum() > 1:   # the same decode from another image's ids
                    swapped = sharding.put_global_batch(swap_ids(ids, real), run.mesh)
                    out = sharding.to_host(self._decode(variables, ae_params, swapped, key, cfg=run.sampler))[real]
                    add("_swapped", *self._scores(originals, out))
                ids = ids[real]
                if self.pixels:
                    self.perceptual.update(originals, recon)
                    for name, floor in floors.all_floors(originals, self.patch).items():
                        add(f"_floor_{name}", *self._scores(originals, floor))
                usage.update(ids)
                if mc.vocab_size:
                    vocab_probs.append(sharding.to_host(enc["vocab_image_probs"])[real])
                    vocab_entropy.append(sharding.to_host(enc["vocab_image_entropy"])[real])
                if len(word_ids) < WORDS_IMAGES:
                    word_ids.extend(ids[: WORDS_IMAGES - len(word_ids), :WORDS_TOKENS])
                if sum(len(r) for r in grid_rows) < cfg.eval.grid_images:
                    grid_rows.extend(zip(originals, recon))
        if not scores:
            raise ValueError("the evaluation split yielded no images: check config.data (eval_path / "
                             "demo_eval_names) and config.eval.num_images.")
        result = {"step": int(step), "num_images": int(sum(len(p) for p, _ in scores[""])),
                  **{k: v for k, v in usage.summary().items() if k != "codebook_size"}}
        metric = "psnr" if self.pixels else "latent_mse"
        for suffix, parts in scores.items():
            result[f"{metric}{suffix}"] = float(np.concatenate([p for p, _ in parts]).mean())
            if self.pixels:
                result[f"ssim{suffix}"] = float(np.concatenate([s for _, s in parts]).mean())
        if "_swapped" in scores:
            sign = 1.0 if self.pixels else -1.0    # an MSE gap is swapped - own
            result["token_gap" + ("_db" if self.pixels else "_mse")] = sign * (
                result[metric] - result[f"{metric}_swapped"])
        if vocab_probs:
            p = np.concatenate(vocab_probs).mean(0)
            result["vocab_perplexity"] = float(np.exp(-np.sum(p * np.log(p + 1e-12))))
            result["vocab_entropy"] = float(np.concatenate(vocab_entropy).mean())
        if self.pixels:
            result.update(self.perceptual.result())
        result.update(self._alignment(vq, np.flatnonzero(usage.counts), word_ids))
        result["eval_seconds"] = time.perf_counter() - t0
        if input_stats is not None:
            result["train_input"] = input_stats
        self._write(result, grid_rows[: cfg.eval.grid_images] if self.pixels else [], writer)
        self._log(result)
        return result

    def _alignment(self, vq, used, word_ids) -> dict:
        if self._table is None:
            return {}
        codebook = np.asarray(jax.device_get(_unboxed(vq)["codebook"]))
        out = alignment.alignment_report(codebook[used], self._table, seed=self.run_.config.seed)
        if self._words is not None:
            out["nearest_words"] = [" ".join(alignment.nearest_words(codebook[ids], self._table, self._words,
                                                                     self._first_row)) for ids in word_ids]
        return out

    def _log(self, r):
        if self.pixels:
            f = lambda k: f"{r[f'psnr{k}']:.2f}" if f"psnr{k}" in r else "-"
            logging.info("eval @ step %d on %d images: PSNR %s dB (SSIM %.4f) | unguided %s, %s %s | swapped "
                         "tokens %s (gap %+.2f dB) | floors: grey %s, mean colour %s, %dx%d patch mean %s", r["step"],
                         r["num_images"], f(""), r["ssim"], f("_unguided"), "mean" if "psnr_mean" in r else "sample",
                         f("_mean") if "psnr_mean" in r else f("_sample"), f("_swapped"), r.get("token_gap_db", 0.0),
                         f("_floor_grey"), f("_floor_mean_colour"), self.patch, self.patch, f("_floor_patch_mean"))
        else:
            logging.info("eval @ step %d on %d images: latent MSE %.4f | swapped tokens %s", r["step"], r["num_images"],
                         r["latent_mse"], r.get("latent_mse_swapped", "-"))
        if "lpips" in r or "rfid" in r or "skipped_metrics" in r:
            logging.info("eval @ step %d: LPIPS %s, rFID %s%s", r["step"], f"{r['lpips']:.4f}" if "lpips" in r else "-",
                         f"{r['rfid']:.2f} on {r['rfid_num_images']} images" if "rfid" in r else "-",
                         "".join(f"; {k} skipped: {v}" for k, v in r.get("skipped_metrics", {}).items()))
        logging.info("eval @ step %d: codebook usage %.3f (perplexity %.1f of %d codes)%s%s  (%.1f s)", r["step"],
                     r["codebook_usage"], r["codebook_perplexity"], self.run_.model.config.codebook_size,
                     f", vocabulary perplexity {r['vocab_perplexity']:.1f}, token entropy {r['vocab_entropy']:.3f}"
                     if "vocab_perplexity" in r else "",
                     (f", alignment: nearest-row cosine {r['align_nearest_cos']:.3f} (random "
                      f"{r['align_nearest_cos_random']:.3f}, rows {r['align_nearest_cos_rows']:.3f}), Frechet "
                      + (f"{r['align_frechet']:.3f} (random {r['align_frechet_random']:.3f})" if "align_frechet" in r
                         else "n/a (fewer than 2 codes in use)")) if "align_nearest_cos" in r else "",
                     r["eval_seconds"])
        for i, words in enumerate(r.get("nearest_words", [])):
            logging.info("eval @ step %d: image %d, nearest words of its first tokens: %s", r["step"], i, words)
        if r["codebook_perplexity"] < 2.0 and r["step"] == 0:
            logging.info("eval @ step 0: codebook perplexity %.2f before training, as expected: a fresh generator's "
                         "softmax is uniform, so every token starts as the same mixture.", r["codebook_perplexity"])
        elif r["codebook_perplexity"] < 2.0:
            logging.warning("eval @ step %d: the tokens have COLLAPSED (codebook perplexity %.2f): the decoder "
                            "cannot depend on them.", r["step"], r["codebook_perplexity"])

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
            writer.write_scalars(result["step"], {f"eval/{k}": v for k, v in result.items()
                                                 if k != "step" and isinstance(v, (int, float))})
            if grid is not None:
                writer.write_images(result["step"], {"eval/reconstructions": grid[None]})
