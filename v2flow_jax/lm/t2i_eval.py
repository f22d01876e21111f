"""config.mode == 'evaluate_t2i': how well a fine-tuned LLM draws, against what its tokenizer can draw.

    python -m v2flow_jax.main --config=configs/t2i_smollm2.py:demo --workdir=runs/t2i_demo \
        --config.mode=evaluate_t2i --config.generate.held_out=runs/emoji/held_out.jsonl

For captions seen in training (`generate.num_seen` of the token records the LLM was tuned on, evenly spaced),
greedy generation -> `Tokenizer.decode` -> PSNR / SSIM against the true image, beside the
tokenizer's own reconstruction of that image (the decode of its recorded codes, the same decode
and noise: the best the LLM can do by writing the right codes), the fraction of codes written
exactly, and the trivial floors on the same images. For held-out captions (a pairs JSONL), a grid
a person can judge: each generation beside the training image nearest to it in pixels (is it
copying?) and the true emoji. Writes <workdir>/t2i_eval/{metrics.json, seen.png (the first 16 seen
captions: true | reconstruction | generation), held_out.png (generation | nearest training | true)}.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from PIL import Image, ImageDraw

from v2flow_jax.data import pairs as pairs_lib
from v2flow_jax.lm import generate as gen
from v2flow_jax.lm import token_records
from v2flow_jax.metrics import floors
from v2flow_jax.metrics import image as image_metrics


def _scores(reference, images) -> dict[str, float]:
    return {"psnr": float(np.mean(image_metrics.psnr(reference, images))),
            "ssim": float(np.mean(image_metrics.ssim(reference, images)))}


def _pixels(items, size: int) -> np.ndarray:
    """float32 (N, size, size, 3) in [-1, 1] of pairs or token records (their "image" and "caption")."""
    pairs = [p if isinstance(p, pairs_lib.Pair) else pairs_lib.Pair(p["image"], p["caption"]) for p in items]
    return np.stack([pairs_lib.load_pair_image(p, size) for p in pairs]).astype(np.float32) / 127.5 - 1.0


def in_batches(fn, items: list, batch_size: int) -> np.ndarray:
    """fn over consecutive chunks of items (the last one padded by repeating its last item), concatenated."""
    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        out.append(np.asarray(fn(chunk + [chunk[-1]] * (batch_size - len(chunk))))[:len(chunk)])
    return np.concatenate(out)


def nearest_by_pixels(images, pool) -> np.ndarray:
    """For each image (B, H, W, C), the index of the pool image (N, H, W, C) with the least squared error."""
    a = np.asarray(images, np.float32).reshape(len(images), -1)
    b = np.asarray(pool, np.float32).reshape(len(pool), -1)
    d = (a ** 2).sum(1)[:, None] - 2.0 * a @ b.T + (b ** 2).sum(1)[None]
    return np.argmin(d, axis=1)


def captioned_grid(rows: list[list[np.ndarray]], captions: list[str], scale: int = 2):
    """uint8 picture: one row per caption, its images side by side (scaled up), the caption after them."""
    rows = [[image_metrics.to_uint8(x) for x in row] for row in rows]
    h, w = rows[0][0].shape[:2]
    cell, pad = (h * scale, w * scale), 2
    text_width = 8 + int(max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(c) for c in captions))
    width = pad + len(rows[0]) * (cell[1] + pad) + text_width
    canvas = Image.new("RGB", (width, pad + len(rows) * (cell[0] + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (row, caption) in enumerate(zip(rows, captions)):
        y = pad + r * (cell[0] + pad)
        for c, image in enumerate(row):
            canvas.paste(Image.fromarray(image).resize(cell[::-1], Image.NEAREST), (pad + c * (cell[1] + pad), y))
        draw.text((pad + len(row) * (cell[1] + pad) + 4, y + cell[0] // 2 - 6), caption, fill=(0, 0, 0))
    return np.asarray(canvas)


def evaluate(pipeline, seen: list[dict], held_out: list[pairs_lib.Pair], pool: list[dict], *, rng,
             batch_size: int = 16) -> tuple[dict, dict]:
    """(metrics, pictures) of a `t2i.TextToImage` on seen records, held-out pairs and a pool of training records."""
    tok = pipeline.image_tokenizer
    size = tok.config.image_size
    greedy = gen.Sampling(greedy=True, cfg_scale=1.0)
    token_rng, decode_rng = jax.random.split(rng)

    def decode(codes):   # one noise draw for every decode, so the comparison is of the codes alone
        return in_batches(lambda c: tok.decode(np.stack(c), decode_rng), list(codes), batch_size)

    captions = [r["caption"] for r in seen]
    logging.info("evaluate_t2i: greedy codes for %d seen captions, then their decodes and the tokenizer's "
                 "reconstructions (batches of %d)...", len(seen), batch_size)
    codes = in_batches(lambda c: pipeline.codes(c, token_rng, greedy), captions, batch_size)
    recorded = np.stack([r["codes"] for r in seen])
    truth = _pixels(seen, size)
    generated, reconstructed = decode(codes), decode(recorded)
    patch = size // int(round(np.sqrt(tok.num_tokens)))
    metrics = {"seen_images": len(seen), "code_accuracy": float(np.mean(codes == recorded)),
               "exact_images": int(np.sum(np.all(codes == recorded, axis=1)))}
    for name, images in (("generated", generated), ("tokenizer", reconstructed),
                         *((f"floor_{k}", v) for k, v in floors.all_floors(truth, patch).items())):
        metrics.update({f"seen_{k}_{name}": v for k, v in _scores(truth, images).items()})
    pictures = {"seen": captioned_grid([list(x) for x in zip(truth, reconstructed, generated)][:16], captions[:16])}

    if held_out:
        logging.info("evaluate_t2i: %d held-out captions...", len(held_out))
        held_captions = [p.caption for p in held_out]
        held_codes = in_batches(lambda c: pipeline.codes(c, token_rng, greedy), held_captions, batch_size)
        held_images = decode(held_codes)
        held_truth, pool_images = _pixels(held_out, size), _pixels(pool, size)
        nearest = nearest_by_pixels(held_images, pool_images)
        metrics.update({f"held_out_{k}_generated": v for k, v in _scores(held_truth, held_images).items()})
        metrics.update({f"held_out_{k}_nearest_training": v
                        for k, v in _scores(held_images, pool_images[nearest]).items()})
        metrics["held_out_images"] = len(held_out)
        labels = [f"{c}  (nearest: {pool[j]['caption']})" for c, j in zip(held_captions, nearest)]
        pictures["held_out"] = captioned_grid([list(x) for x in zip(held_images, pool_images[nearest], held_truth)],
                                              labels)
    return metrics, pictures


def run(config, workdir: str) -> dict:
    """The main mode: a finetune_llm workdir's export, its tokenizer and records -> metrics and grids."""
    from v2flow_jax.lm import t2i
    g = config.generate
    if int(g.num_seen) <= 0:
        raise ValueError(f"config.generate.num_seen={g.num_seen} must be positive.")
    pipeline, tokenizer_workdir = t2i.load_pipeline(config, workdir, mode="evaluate_t2i")
    records_dir = config.llm.records_dir or os.path.join(tokenizer_workdir, "token_records")
    records = list(token_records.read_records(records_dir))
    held_out = (token_records.evenly_spaced(pairs_lib.read_pairs(g.held_out), int(g.num_held_out),
                                            "config.generate.num_held_out") if g.held_out else [])
    if not held_out:
        logging.warning("config.generate.held_out is not set: only captions seen in training are evaluated.")
    seen = token_records.evenly_spaced(records, int(g.num_seen))
    metrics, pictures = evaluate(pipeline, seen, held_out, records,
                                 rng=jax.random.key(config.seed), batch_size=int(g.batch_size))
    metrics["uniform_loss"] = float(np.log(pipeline.chat.vocab.num_visual))
    out_dir = g.output_dir or os.path.join(workdir, "t2i_eval")
    os.makedirs(out_dir, exist_ok=True)
    for name, picture in pictures.items():
        image_metrics.save_png(os.path.join(out_dir, f"{name}.png"), picture)
    image_metrics.write_json_metrics(os.path.join(out_dir, "metrics.json"), metrics)
    m = metrics
    logging.info("seen captions (%d): generated %.2f dB / SSIM %.3f, tokenizer's own reconstruction %.2f dB / %.3f; "
                 "codes written exactly %.3f (%d whole images); floors: grey %.2f, mean colour %.2f, patch mean %.2f",
                 m["seen_images"], m["seen_psnr_generated"], m["seen_ssim_generated"], m["seen_psnr_tokenizer"],
                 m["seen_ssim_tokenizer"], m["code_accuracy"], m["exact_images"], m["seen_psnr_floor_grey"],
                 m["seen_psnr_floor_mean_colour"], m["seen_psnr_floor_patch_mean"])
    if held_out:
        logging.info("held-out captions (%d): generated vs true %.2f dB; generated vs nearest training image %.2f dB; "
                     "grid: %s", m["held_out_images"], m["held_out_psnr_generated"],
                     m["held_out_psnr_nearest_training"], os.path.join(out_dir, "held_out.png"))
    return metrics
