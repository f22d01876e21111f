"""Grain input pipelines for the V2Flow tokenizer: pixels from tfds / folders / demo photos, or cached latents.

This module is the pipeline (transforms, batching, sharding, the checkpointable iterator); the pieces it
composes live in `v2flow_jax.data`: `settings` (the config.data fields and their defaults), `images`
(decoding and the bad-file policy), `sources` (the random-access sources) and `latent_records` (the
cached-latent format).

Entry point::

    iterator, num_examples = create_dataset(config.data, split="train", batch_size=per_host_batch,
                                            seed=config.seed, train=True)
    batch = next(iterator)        # {"image": float32 (B, S, S, 3) in [-1, 1]}  (or {"latent": ...})
    state = iterator.get_state()  # bytes; iterator.set_state(state) resumes with the same batches
    iterator.stats                # PipelineStats: files skipped / converted, per reason

Sources (``config.data.source``):
  * ``demo``    photos bundled with scikit-image (plus scikit-learn's china/flower and matplotlib's
                grace_hopper when those packages happen to be installed); no download. The photos named
                in ``config.data.demo_eval_names`` form split 'eval', the rest split 'train'.
  * ``folder``  every file under ``config.data.path`` (recursive, sorted) whose extension PIL knows;
                split 'eval' reads ``config.data.eval_path`` (or, if unset, ``path`` with a warning).
  * ``tfds``    ``tfds.data_source(config.data.tfds_name, data_dir=config.data.tfds_data_dir)``: a
                dataset already prepared in array_record format (``tfds build ... --file_format=array_record``).
                Images are decoded here with PIL, not by tfds, so bad files are handled like any other.
  * ``latents`` array_record shards written by ``data.latent_records.write_latent_shard`` (glob in
                ``config.data.path``, or ``eval_path`` for split 'eval'); yields ``{"latent": float32 (B, h, w, C)}``, no flipping
                (the caching job stores the flipped copy as its own record).

Pixel transform (guided-diffusion's "ADM" centre crop, as the official release uses): while the short
side is >= 2S halve the image with a box filter, bicubic-resize so the short side is S, centre-crop SxS;
then a random horizontal flip when ``train=True``. With ``config.data.random_crop_scale=(lo, hi)`` training
takes instead a random square crop of U(lo, hi) times the short side, anywhere in the image, resized to
SxS (many distinct views of few photos: the demo); evaluation keeps the centre crop. Crops and flips are
deterministic (the rng comes from the seed and the record's position in the stream); uint8 is then
scaled to float32 ``x / 127.5 - 1``.

Bad data never stops a run (unless ``config.data.strict``): a file PIL cannot identify, a truncated or
corrupt file, or an unreadable path is skipped with a warning and counted; odd but usable images are
converted and counted (see ``data.images.SKIP_REASONS`` / ``CONVERT_REASONS``). Decoding happens inside
the data source, so it runs in grain's read threads (PIL releases the GIL) and, with ``worker_count > 0``, in the
worker processes; failed records become ``None`` images that a grain ``Filter`` drops. The counts travel
with the surviving elements through workers and batching, so ``iterator.stats`` is right in the main
process whatever the worker count. Counts are occurrences (a bad file is counted once per epoch) over
the batches delivered: elements in a dropped final partial batch are not counted, nor, with
``worker_count > 0``, skips after a worker's last good element of an epoch-limited run. A camera's EXIF
orientation tag is applied (the pixels turned upright, counted as "oriented").

Sharding: every host uses the same seed and walks the same global order of positions (one shuffle of
all records per epoch, grain's ``IndexSampler``); host ``p`` of ``P`` takes slots ``[p*b, (p+1)*b)`` of every
global batch of ``P*b`` positions (``HostSlotSampler``), so the hosts' shards are disjoint and complete,
and the global batch, crops and flips included (their rng follows the global position), are the same
whatever the number of hosts. One epoch (evaluation, the latent cache) pads the last global batch's
empty slots with records the pipeline drops, so every host's sampler has the same length and a host can
come up one batch short: ``global_batches`` says how many there are, for loops that must run in step.
Skipped files shift a host's later slots (still disjoint and deterministic, no longer host-count-free).
Training repeats forever; evaluation is one epoch, dropping the last partial batch unless
``drop_remainder=False``.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

from absl import flags
from absl import logging
import grain
import numpy as np

from v2flow_jax.data import settings, sources
from v2flow_jax.data.decoding import REASONS, PipelineStats, random_resized_crop

# ----------------------------------------------------------------------------------------------------
# Grain transforms.


class _DropFailed(grain.transforms.Filter):
    """Drops records whose decode failed and hands their counts to the next surviving element.

    Grain filters cannot emit anything, so the skip counts ride on the next good element (mutated in
    place: grain passes the same object on to the following transform); this keeps the counts correct
    when the filter runs in a worker process. Runs sequentially per process, so plain state is safe.
    """

    def __init__(self, field: str, max_consecutive: int, description: str):
        self._field = field
        self._max_consecutive = max_consecutive
        self._description = description
        self._pending = np.zeros(len(REASONS), np.int32)
        self._consecutive = 0

    def filter(self, element: dict[str, Any]) -> bool:
        if element.get("_padding"):       # an empty slot of the last global batch (HostSlotSampler)
            return False
        if element[self._field] is None:
            self._pending += element["_counts"]
            self._consecutive += 1
            # A repeating stream over only bad files would otherwise spin forever without a word.
            if self._consecutive > self._max_consecutive:
                raise RuntimeError(f"{self._consecutive} records in a row failed to decode in "
                                   f"{self._description}: no usable data (see the warnings above).")
            return False
        element["_counts"] = element["_counts"] + self._pending
        self._pending = np.zeros_like(self._pending)
        self._consecutive = 0
        return True

    def take_pending(self) -> np.ndarray:
        pending, self._pending = self._pending, np.zeros_like(self._pending)
        return pending


class _RandomResizedCrop(grain.transforms.RandomMap):
    """`random_resized_crop` of the whole decoded image (config.data.random_crop_scale)."""

    def __init__(self, size: int, scale: Sequence[float]):
        self._size, self._scale = int(size), tuple(float(s) for s in scale)

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        return dict(element, image=random_resized_crop(element["image"], self._size, self._scale, rng))


class _RandomFlip(grain.transforms.RandomMap):
    """Horizontal flip with probability 1/2; the rng is grain's per-record Philox(seed + position)."""

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if rng.random() < 0.5:
            element = dict(element, image=np.ascontiguousarray(element["image"][:, ::-1]))
        return element


class _ToFloat(grain.transforms.Map):
    """uint8 batch -> float32 in [-1, 1] (after batching: one vectorised op per batch)."""

    def map(self, batch: dict[str, Any]) -> dict[str, Any]:
        return dict(batch, image=batch["image"].astype(np.float32) * (1.0 / 127.5) - 1.0)


class DataIterator:
    """Iterator over batch dicts; checkpointable like grain's DataLoaderIterator.

    ``get_state() -> bytes`` / ``set_state(bytes)`` (and ``start_prefetch``) delegate to grain, so the
    object works with ``grain.checkpoint.CheckpointSave/CheckpointRestore`` under orbax. ``stats`` is a
    PipelineStats for the batches this iterator has returned.
    """

    def __init__(self, loader: grain.DataLoader, drop_filter: _DropFailed, worker_count: int):
        self._iterator = iter(loader)
        self._drop_filter = drop_filter
        self._worker_count = worker_count
        self.stats = PipelineStats()

    def __iter__(self) -> "DataIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        try:
            batch = next(self._iterator)
        except StopIteration:
            if self._worker_count == 0:  # in-process: skips after the last good element are visible
                self.stats.add_counts(self._drop_filter.take_pending())
            raise
        counts = batch.pop("_counts")
        self.stats.add_counts(counts)
        self.stats.examples += counts.shape[0]
        return batch

    def get_state(self) -> bytes:
        return self._iterator.get_state()

    def set_state(self, state: bytes) -> None:
        self._iterator.set_state(state)

    def start_prefetch(self) -> None:
        self._iterator.start_prefetch()



def global_batches(num_records: int, batch_size: int, shard_count: int, drop_remainder: bool) -> int:
    """Global batches (of `shard_count` x `batch_size` positions) in one epoch of `num_records`."""
    per_global = batch_size * shard_count
    return num_records // per_global if drop_remainder else -(-num_records // per_global)


class HostSlotSampler:
    """Host `p`'s positions of a global order: slots [p*b, (p+1)*b) of every global batch of P*b.

    grain's DataLoader asks for index `j*P + p` for the host's j-th record; the record and its rng are
    those of the global position, so batches, crops and flips do not depend on the number of hosts.
    `num_positions` (one epoch, rounded up to whole global batches) bounds the order; positions past
    `num_records` there are padding (`pad_key`, a record the pipeline drops).
    """

    def __init__(self, base, batch_size: int, shard_index: int, shard_count: int, num_positions: int | None,
                 pad_key: int):
        self._base, self._b, self._p, self._n = base, int(batch_size), int(shard_index), int(shard_count)
        self._positions, self._pad_key, self._num_records = num_positions, int(pad_key), int(pad_key)

    def __len__(self) -> int:
        return sys.maxsize if self._positions is None else self._positions   # endless: as grain measures its own

    def global_position(self, index: int) -> int:
        local, host = divmod(int(index), self._n)
        group, slot = divmod(local, self._b)
        return (group * self._n + host) * self._b + slot

    def __getitem__(self, index: int):
        g = self.global_position(index)
        if index < 0 or (self._positions is not None and index >= self._positions):
            raise IndexError(f"position {index} is past the epoch's {self._positions}")
        if self._positions is not None and g >= self._num_records:
            return grain.RecordMetadata(index=index, record_key=self._pad_key, rng=None)
        meta = self._base[g]
        return grain.RecordMetadata(index=index, record_key=meta.record_key, rng=meta.rng)

    def __repr__(self) -> str:
        return f"HostSlotSampler({self._base!r}, batch_size={self._b}, host {self._p} of {self._n})"


class _WithPadding:
    """The source plus one padding record (key len(source)) that _DropFailed drops without a word."""

    def __init__(self, source, field: str):
        self._source, self._field = source, field

    def __len__(self) -> int:
        return len(self._source) + 1

    def __getitem__(self, key: int):
        if key == len(self._source):
            return {self._field: None, "_padding": True}
        return self._source[key]

    def __repr__(self) -> str:
        return f"{self._source!r} + padding"


def create_dataset(
    config_data: Any,
    *,
    split: str,
    batch_size: int,
    seed: int,
    train: bool,
    drop_remainder: bool = True,
    shard_index: int | None = None,
    shard_count: int | None = None,
    random_crops: bool | None = None,
) -> tuple[DataIterator, int]:
    """Builds the batch iterator for one split on this host.

    Args:
      config_data: ``config.data`` (ConfigDict or dict); missing fields take DEFAULTS.
      split: 'train' or 'eval' (mapped to the source's own split/path fields).
      batch_size: examples per batch on this host.
      seed: shuffling and flip seed; the same on every host (it is reduced mod 2**32).
      train: shuffle, repeat forever and flip; otherwise one epoch in order, no flip.
      drop_remainder: drop the last partial batch (only matters when ``train=False``).
      shard_index, shard_count: default ``jax.process_index()``, ``jax.process_count()``.
      random_crops: apply ``config.data.random_crop_scale`` (default: when ``train``); the latent cache
        asks for them on an ordered one-epoch pass, one pass per cached view.

    Returns:
      (iterator, num_examples): a DataIterator over dicts ``{"image": float32 (B,S,S,3)}`` (or
      ``{"latent": float32 (B,h,w,C)}`` for source 'latents'), and the number of records in the whole
      split, all hosts together, counted before any bad file is skipped.
    """
    settings.validate_data_config(config_data)
    if split not in settings.SPLITS:
        raise ValueError(f"split={split!r} is not one of {settings.SPLITS}.")
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive.")
    if shard_index is None or shard_count is None:
        import jax  # pylint: disable=g-import-not-at-top

        shard_index, shard_count = jax.process_index(), jax.process_count()
    source_name = settings.field(config_data, "source")
    strict = bool(settings.field(config_data, "strict"))
    image_size = int(settings.field(config_data, "image_size"))
    random_crops = train if random_crops is None else random_crops
    crop_scale = tuple(settings.field(config_data, "random_crop_scale") or ()) if random_crops else ()

    if source_name == "latents":
        paths = sources.latent_paths(config_data, split)
        source = sources.LatentSource(paths, strict)
        field, description = "latent", f"latent shards {paths[0]}..."
    else:
        if source_name == "demo":
            photos = sources.demo_photos()
            entries = [(f"demo:{n}", photos[n]) for n in sources.demo_split_names(config_data, split)]
            raw, description = sources.ListSource(entries), f"demo split {split!r}"
        elif source_name == "folder":
            entries, root = sources.folder_entries(config_data, split)
            raw, description = sources.ListSource(entries), f"folder {root}"
        else:
            raw, description = sources.tfds_source(config_data, split)
        source = sources.DecodingSource(raw, image_size, strict, center_crop=not crop_scale,
                                 min_crop_scale=crop_scale[0] if crop_scale else 1.0)
        field = "image"

    num_records = len(source)
    if num_records < shard_count:
        raise ValueError(f"{description} has {num_records} records, fewer than the {shard_count} hosts.")
    if not train and drop_remainder and num_records // shard_count < batch_size:
        raise ValueError(f"{description} has {num_records // shard_count} records per host, fewer than "
                         f"batch_size={batch_size}: one epoch would yield no batch.")

    shard_options = grain.sharding.ShardOptions(shard_index=shard_index, shard_count=shard_count,
                                                drop_remainder=True)
    # One host: grain's own sampler (the same order, and the repr that older checkpoints' data state holds).
    sampler = grain.samplers.IndexSampler(
        num_records=num_records,
        shard_options=grain.sharding.ShardOptions(0, 1, drop_remainder=True) if shard_count > 1 else shard_options,
        shuffle=train,
        num_epochs=None if train else 1,
        seed=int(seed) % 2**32,
    )
    if shard_count > 1:
        finite = None if train else global_batches(num_records, batch_size, shard_count, drop_remainder) \
            * batch_size * shard_count
        sampler = HostSlotSampler(sampler, batch_size, shard_index, shard_count, finite, num_records)
        source = _WithPadding(source, field)
    drop_filter = _DropFailed(field, max_consecutive=num_records, description=description)
    operations: list[Any] = [drop_filter]
    if field == "image" and crop_scale:
        operations.append(_RandomResizedCrop(image_size, crop_scale))
    if train and field == "image":
        operations.append(_RandomFlip())
    operations.append(grain.transforms.Batch(batch_size=batch_size, drop_remainder=drop_remainder or train))
    if field == "image":
        operations.append(_ToFloat())
    worker_count = int(settings.field(config_data, "worker_count"))
    if worker_count > 0 and not flags.FLAGS.is_parsed():
        # grain reads its absl flags when starting workers; outside absl.app.run (tests, notebooks)
        # nothing parsed them, so take the defaults rather than fail.
        flags.FLAGS.mark_as_parsed()
    read_threads = int(settings.field(config_data, "read_threads"))
    prefetch = settings.field(config_data, "prefetch_buffer_size")
    # Decoding happens in the read threads, so the buffer holds decoded images: keep it near a batch.
    prefetch = 2 * max(batch_size, read_threads) if prefetch is None else int(prefetch)
    loader = grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=operations,
        worker_count=worker_count,
        shard_options=shard_options,
        read_options=grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch),
    )
    logging.info("Input pipeline: %s, split %r, %d records, host shard %d/%d, batch %d, train=%s.",
                 description, split, num_records, shard_index, shard_count, batch_size, train)
    return DataIterator(loader, drop_filter, worker_count), num_records

