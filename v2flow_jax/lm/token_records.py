"""config.mode == 'encode_pairs': every image of a pairs JSONL encoded once into token-id records.

The LLM stage trains on (caption, token ids) and never needs the image tokenizer again. The job is
the latent cache's (cache_latents.py) shape: each host takes every process_count-th pair from its
index on; output is cut into parts `<out>/pairs-host<H>-part<K>.array_record` of
`config.pairs.per_part` records, each written under a temporary name and renamed when complete, so a
killed job restarts after its last complete part and produces the same files; `pairs-host<H>.done.json`
marks a finished host. A record is UTF-8 JSON: {"caption": str, "codes": [int, ...], "image": str}.
A pair whose image does not decode (truncated, not an image, gone since the JSONL was read) is
skipped, named in the log and counted by reason in the done file; part K always covers the same
pairs, so restarts still agree. `pairs-host<H>.job.json` records what the parts depend on (the pairs,
their order, per_part, the token count): a restart or rerun of another job there is refused.
"""
from __future__ import annotations

import collections
import glob
import hashlib
import json
import os
import time
from typing import Iterator

import grain
import jax
import numpy as np
from absl import logging
from array_record.python import array_record_module as ar

from v2flow_jax.cache_latents import complete_parts
from v2flow_jax.data import pairs as pairs_lib
from v2flow_jax.data.decoding import BadImageError
from v2flow_jax import atomic_files

SPLIT = "pairs"


def encode_record(caption: str, codes, image: str = "") -> bytes:
    return json.dumps({"caption": caption, "codes": [int(c) for c in np.asarray(codes).reshape(-1)],
                       "image": image}).encode("utf-8")


def decode_record(record: bytes) -> dict:
    try:
        out = json.loads(record.decode("utf-8"))
        out["codes"] = np.asarray(out["codes"], np.int32)
        str(out["caption"])
    except Exception as e:
        raise ValueError(f"not a token record ({type(e).__name__}: {e}); records come from mode=encode_pairs.") from e
    return out


def part_path(out_dir: str, host: int, part: int) -> str:
    return os.path.join(out_dir, f"{SPLIT}-host{host:03d}-part{part:05d}.array_record")


def _write_part(path: str, records: list[bytes]) -> None:
    tmp = path + ".tmp"
    writer = ar.ArrayRecordWriter(tmp, "group_size:1")
    for r in records:
        writer.write(r)
    writer.close()
    os.replace(tmp, path)


def _load_images(chunk: list[pairs_lib.Pair], size: int, skipped: dict) -> tuple[list, list]:
    """(pairs whose image decodes, their uint8 images); the others are counted by reason and named."""
    good, images = [], []
    for pair in chunk:
        try:
            images.append(pairs_lib.load_pair_image(pair, size))
            good.append(pair)
        except BadImageError as e:
            skipped[e.reason] = skipped.get(e.reason, 0) + 1
            logging.warning("encode_pairs: skipping the pair of caption %r: %s", pair.caption, e)
    return good, images


def _skipped_path(out_dir: str, host: int) -> str:
    return os.path.join(out_dir, f"{SPLIT}-host{host:03d}.skipped.json")


def _skipped_per_part(out_dir: str, host: int, parts_done: int) -> list[dict]:
    """Each written part's skip counts (a restart after part K keeps those of parts 0..K-1)."""
    try:
        with open(_skipped_path(out_dir, host)) as f:
            per_part = json.load(f)["per_part"]
    except FileNotFoundError:
        per_part = []
    return (per_part + [{}] * parts_done)[:parts_done]


def _total(per_part: list[dict]) -> dict:
    return dict(sum((collections.Counter(counts) for counts in per_part), collections.Counter()))


def _job(mine: list[pairs_lib.Pair], per_part: int, num_tokens: int) -> dict:
    """What the parts of this host's share depend on: a restart or a rerun must be the same job."""
    digest = hashlib.sha256("\n".join(f"{p.caption}\t{p.image_path}" for p in mine).encode("utf-8"))
    return {"pairs": len(mine), "per_part": per_part, "num_tokens": num_tokens, "pairs_sha256": digest.hexdigest()[:16]}


def _check_same_job(out_dir: str, host: int, job: dict) -> None:
    """Records the job on a fresh start; refuses to resume or reuse parts that another job wrote."""
    path = os.path.join(out_dir, f"{SPLIT}-host{host:03d}.job.json")
    if not os.path.exists(path):
        atomic_files.write_bytes(path, json.dumps(job).encode())
        return
    with open(path) as f:
        previous = json.load(f)
    if previous != job:
        changed = ", ".join(f"{k} {previous.get(k)} -> {v}" for k, v in job.items() if previous.get(k) != v)
        raise ValueError(f"{out_dir} holds token records of another encode_pairs job ({changed}; pairs_sha256 covers "
                         f"the captions and image paths, e.g. another config.pairs.jsonl or pairs.limit): set a new "
                         f"--config.pairs.output_dir, or delete {out_dir} to encode again.")


def record_paths(out_dir: str) -> list[str]:
    """The complete parts in `out_dir`, host by host, part by part (temporary files excluded)."""
    paths = sorted(glob.glob(os.path.join(out_dir, f"{SPLIT}-host*-part*.array_record")))
    if not paths:
        raise FileNotFoundError(f"no token records in {out_dir}: run mode=encode_pairs first.")
    return paths


def record_source(out_dir: str) -> grain.sources.ArrayRecordDataSource:
    """Random access to every record (raw bytes; `decode_record` each), for a grain pipeline."""
    return grain.sources.ArrayRecordDataSource(record_paths(out_dir))


def read_records(out_dir: str) -> Iterator[dict]:
    source = record_source(out_dir)
    for i in range(len(source)):
        yield decode_record(source[i])


def encode_pairs(image_tokenizer, pairs: list[pairs_lib.Pair], out_dir: str, *, per_part: int = 1024,
                 batch_size: int = 32, host: int | None = None, num_hosts: int | None = None) -> dict:
    """Encodes this host's share of `pairs` with a `v2flow_jax.api.Tokenizer` into parts (resumable)."""
    if per_part <= 0 or batch_size <= 0:
        raise ValueError(f"config.pairs.per_part={per_part} and batch_size={batch_size} must be positive.")
    host = jax.process_index() if host is None else host
    num_hosts = jax.process_count() if num_hosts is None else num_hosts
    os.makedirs(out_dir, exist_ok=True)
    done = os.path.join(out_dir, f"{SPLIT}-host{host:03d}.done.json")
    mine = pairs[host::num_hosts]
    _check_same_job(out_dir, host, _job(mine, per_part, image_tokenizer.num_tokens))
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    skip_parts = complete_parts(out_dir, SPLIT, host)
    start = skip_parts * per_part
    size = image_tokenizer.config.image_size
    logging.info("Encoding %d pairs (host %d of %d) into %s; %d complete parts already there.",
                 len(mine), host, num_hosts, out_dir, skip_parts)
    # Part k holds the records of pairs [k * per_part, (k + 1) * per_part) of this host's share, minus
    # the pairs whose image does not decode: a restart after part k is the same job from pair k * per_part.
    num_parts = -(-len(mine) // per_part)
    part_skips, t0 = _skipped_per_part(out_dir, host, skip_parts), time.perf_counter()
    for part in range(skip_parts, num_parts):
        records, skipped = [], {}
        for first in range(part * per_part, min((part + 1) * per_part, len(mine)), batch_size):
            chunk = mine[first:min(first + batch_size, (part + 1) * per_part)]
            good, images = _load_images(chunk, size, skipped)
            # A fixed batch shape (one compile): padded with the last image, or a blank one when none
            # decoded (encode is a collective over processes: every host calls it as often).
            images = images or [np.full((size, size, 3), 255, np.uint8)]
            codes = image_tokenizer.encode(np.stack(images + [images[-1]] * (batch_size - len(images))))
            records += [encode_record(p.caption, c, p.image_path) for p, c in zip(good, codes)]
        # The skip counts first: a kill between the two writes leaves them one part ahead, which a
        # restart cuts back to the parts that exist.
        part_skips.append(skipped)
        atomic_files.write_bytes(_skipped_path(out_dir, host), json.dumps({"per_part": part_skips}).encode())
        _write_part(part_path(out_dir, host, part), records)
        done_n = min((part + 1) * per_part, len(mine))
        rate = (done_n - start) / (time.perf_counter() - t0)
        logging.info("  part %d written: %d / %d pairs (%d skipped), %.1f pairs/s, ETA %.0f s", part + 1, done_n,
                     len(mine), sum(_total(part_skips).values()), rate, (len(mine) - done_n) / max(rate, 1e-9))
    part, skipped = num_parts, _total(part_skips)
    summary = {"host": host, "pairs": len(mine), "records": len(mine) - sum(skipped.values()),
               "skipped": dict(skipped), "parts": part, "num_tokens": image_tokenizer.num_tokens}
    atomic_files.write_bytes(done, json.dumps(summary).encode())
    logging.info("Token records complete: %s", summary)
    return summary


def evenly_spaced(pairs: list, limit: int, field: str = "config.pairs.limit") -> list:
    """``limit`` pairs spread evenly over the list (all when limit is 0 or not smaller): a subset that
    keeps the file's variety (OpenMoji's files sort by code point: the first few hundred are flags)."""
    if limit < 0:
        raise ValueError(f"{field}={limit} must be >= 0 (0: every pair).")
    if not limit or limit >= len(pairs):
        return list(pairs)
    return [pairs[i * len(pairs) // limit] for i in range(limit)]


def run(config, workdir: str) -> dict:
    """The main mode: config.pairs.{jsonl, tokenizer_workdir, output_dir, per_part, limit}."""
    from v2flow_jax.api import Tokenizer
    p = config.pairs
    if not p.jsonl or not p.tokenizer_workdir:
        raise ValueError("mode=encode_pairs needs --config.pairs.jsonl=<pairs.jsonl> and "
                         "--config.pairs.tokenizer_workdir=<a trained tokenizer's workdir>.")
    pairs = evenly_spaced(pairs_lib.read_pairs(p.jsonl), int(p.get("limit", 0)))
    if not pairs:
        raise ValueError(f"config.pairs.jsonl={p.jsonl!r} holds no pairs: give a JSONL with one "
                         '{"image": ..., "caption": ...} object a line.')
    tok = Tokenizer.from_workdir(p.tokenizer_workdir)
    return encode_pairs(tok, pairs, p.output_dir or os.path.join(workdir, "token_records"),
                        per_part=int(p.per_part), batch_size=int(config.batch_size))
