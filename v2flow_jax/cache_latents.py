"""config.mode == 'cache_latents': encode a dataset once through the frozen autoencoder.

Like the release, every image is stored twice: its latent and the latent of its horizontal flip
(the only augmentation), so training on cached latents (`config.data.source = 'latents'`) needs no
autoencoder at all. Unlike the release the job is sharded and resumable:

  * each host encodes its own shard of the split (input_pipeline's host slots, in order, no shuffle);
    the hosts together write the same records whatever their number;
  * output is cut into parts of `config.cache.images_per_part` images:
    `<out>/<split>-host<H>-part<K>.array_record`, each written under a temporary name and renamed
    when complete, so a part either exists whole or not at all;
  * a restarted job counts the complete parts, skips that many images and continues, producing the
    same files as an uninterrupted run; `<split>-host<H>.done.json` marks a finished host.

Latents are stored unscaled (as the autoencoder returns them); training multiplies by the scale.
"""
from __future__ import annotations

import glob
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from v2flow_jax import build, input_pipeline, sharding
from v2flow_jax.data import latent_records

PART_RE = re.compile(r"-part(\d{5})\.array_record$")


def part_path(out_dir: str, split: str, host: int, part: int) -> str:
    return os.path.join(out_dir, f"{split}-host{host:03d}-part{part:05d}.array_record")


def complete_parts(out_dir: str, split: str, host: int) -> int:
    """Number of consecutive finished parts 0..K-1 of this host (temporary files do not count)."""
    done = {int(PART_RE.search(p).group(1)) for p in glob.glob(os.path.join(out_dir, f"{split}-host{host:03d}-part*"))
            if PART_RE.search(p)}
    k = 0
    while k in done:
        k += 1
    return k


def _write_part(path: str, latents: list[np.ndarray]) -> None:
    tmp = path + ".tmp"
    latent_records.write_latent_shard(tmp, latents)
    os.replace(tmp, path)


def _encode_fn(run: build.Run):
    """jit of (autoencoder params, images) -> unscaled latents of the images, then of their flips."""
    def encode(ae_params, images):
        both = jnp.concatenate([images, images[:, :, ::-1]], axis=0)   # originals, then their flips
        return run.autoencoder.encode(ae_params, both).astype(jnp.float32)
    return jax.jit(encode)


def run(config, workdir: str) -> dict:
    cache = config.cache
    split = cache.split
    out_dir = cache.output_dir or os.path.join(workdir, "latents")
    per_part = int(cache.images_per_part)
    if per_part <= 0:
        raise ValueError(f"config.cache.images_per_part={per_part} must be positive.")
    os.makedirs(out_dir, exist_ok=True)
    r = build.build_run(config)
    host = jax.process_index()
    dp = sharding.data_parallel_size(r.mesh)
    batch_size = -(-config.batch_size // dp) * dp // jax.process_count()
    done_marker = os.path.join(out_dir, f"{split}-host{host:03d}.done.json")
    # The encode is collective: every host runs it until all are done (a finished host writes nothing).
    if sharding.all_hosts_values(os.path.exists(done_marker)).all():
        logging.info("Latent cache for split %r, host %d is already complete (%s).", split, host, done_marker)
        with open(done_marker) as f:
            return json.load(f)

    skip_parts = complete_parts(out_dir, split, host)
    # The part size the existing parts were cut with: resuming with another one would skip the wrong
    # number of images (duplicating or dropping some), so it is recorded and checked.
    layout = os.path.join(out_dir, f"{split}-host{host:03d}.parts.json")
    if skip_parts and os.path.exists(layout):
        with open(layout) as f:
            previous = json.load(f)["images_per_part"]
        if previous != per_part:
            raise ValueError(f"config.cache.images_per_part={per_part} but the {skip_parts} complete parts in "
                             f"{out_dir} hold {previous} images each: resume with "
                             f"--config.cache.images_per_part={previous}, or start a new config.cache.output_dir.")
    elif not skip_parts:
        with open(layout + ".tmp", "w") as f:
            json.dump({"images_per_part": per_part}, f)
        os.replace(layout + ".tmp", layout)
    skip_images = skip_parts * per_part
    views = int(cache.get("views", 1))
    if views < 1:
        raise ValueError(f"config.cache.views={views} must be >= 1.")

    def view_iterator(view):
        # view 0 keeps the seed (and, without random crops, the images) of a single-view cache
        it, n = input_pipeline.create_dataset(config.data, split=split, batch_size=batch_size,
                                              seed=config.seed + view, train=False, drop_remainder=False,
                                              random_crops=views > 1)
        return it, n

    first_it, num_records = view_iterator(0)
    stats = [first_it.stats]

    hosts = jax.process_count()
    per_view = input_pipeline.global_batches(num_records, batch_size, hosts, drop_remainder=False)

    def batches():
        """Each view's host batches, the same count on every host (a host whose slots ran out: 0 rows)."""
        for view in range(views):
            it = first_it if view == 0 else view_iterator(view)[0]
            if view:
                stats.append(it.stats)
            for _ in range(per_view):
                batch = next(it, None)
                yield batch["image"] if batch is not None else np.zeros((0, size, size, 3), np.float32)
    size = config.data.image_size
    it = batches()
    logging.info("Caching latents of split %r (%d records x %d views, all hosts) into %s; resuming after %d "
                 "complete parts.", split, num_records, views, out_dir, skip_parts)
    encode = _encode_fn(r)
    # From the shapes alone: a resumed job may have nothing left to encode.
    latent_shape = list(jax.eval_shape(encode, r.ae_params, jax.ShapeDtypeStruct((batch_size, size, size, 3),
                                                                                jnp.float32)).shape[1:])
    pending: list[np.ndarray] = []
    part, seen, t0 = skip_parts, 0, time.perf_counter()
    rows_of_host = sharding.local_row_positions(batch_size, r.mesh)
    with sharding.use_mesh(r.mesh, r.rules):
        for images in it:
            n = images.shape[0]
            # Skipped only where every host's rows lie in parts already written (the encode is collective).
            if not sharding.all_hosts_values(seen + n > skip_images).any():
                seen += n
                continue
            first = max(skip_images - seen, 0)
            seen += n
            padded = np.concatenate([images, np.zeros((batch_size - n,) + images.shape[1:], images.dtype)]) \
                if n < batch_size else images
            latents = sharding.to_host(encode(r.ae_params, sharding.put_batch(padded, r.mesh)))
            whole = batch_size * hosts        # the global batch, then the flips
            mine = rows_of_host[:n]           # where this host's rows sit in it (its devices' places)
            originals, flips = latents[:whole][mine][first:], latents[whole:][mine][first:]
            for orig, flip in zip(originals, flips):
                pending.extend([orig, flip])
                if len(pending) == 2 * per_part:
                    _write_part(part_path(out_dir, split, host, part), pending)
                    pending, part = [], part + 1
                    logging.info("  part %d written (%d images so far, %.1f img/s).", part, part * per_part,
                                 (seen - skip_images) / (time.perf_counter() - t0))
    if pending:
        _write_part(part_path(out_dir, split, host, part), pending)
        part += 1
    summary = {"split": split, "host": host, "parts": part, "images": seen, "records": 2 * seen,
               "latent_shape": latent_shape, "views": views,
               "skipped_input": "; ".join(st.summary() for st in stats)}
    with open(done_marker + ".tmp", "w") as f:
        json.dump(summary, f)
    os.replace(done_marker + ".tmp", done_marker)
    logging.info("Latent cache complete: %s", summary)
    return summary
