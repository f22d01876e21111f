"""What a demo-sized codebook can reach at all: k-means of training patches, against the trivial floors.

A tokenizer with K codes per P x P patch cannot beat, on average, replacing each held-out patch by its
nearest of K centroids fitted to the training patches (a mean decode that knows the optimal partition).
This prints that ceiling next to the floors evaluation reports (flat grey, mean colour, patch mean), on
the demo's held-out photos, for each patch size and codebook size:

    python benchmarks/patch_ceiling.py                          # patches 4 and 8, K = 64, 256
    python benchmarks/patch_ceiling.py --patches 4 --codes 256,1024 --crops 400

Training patches come from the demo's own training input (random crops and flips of the 6 colour photos,
`--crops` of them); PSNR is per image, averaged, as `evaluate` reports it. Plain numpy (Lloyd's
algorithm from k-means++ seeds); seconds on a CPU.
"""
from __future__ import annotations

import argparse
import itertools

import numpy as np

from v2flow_jax import demo_config, input_pipeline


def patches(images: np.ndarray, p: int) -> np.ndarray:
    n, h, w, c = images.shape
    x = images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatch(x: np.ndarray, shape: tuple, p: int) -> np.ndarray:
    n, h, w, c = shape
    return x.reshape(n, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(shape)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over images of the PSNR of [-1, 1] images, peak 1 in [0, 1] (as metrics.image.psnr)."""
    mse = (((a - b) / 2.0) ** 2).reshape(len(a), -1).mean(axis=1)
    return float(np.mean(-10.0 * np.log10(mse)))


def nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    d = (x ** 2).sum(1)[:, None] - 2.0 * x @ centroids.T + (centroids ** 2).sum(1)[None]
    return d.argmin(1)


def kmeans(x: np.ndarray, k: int, iters: int, rng: np.random.Generator) -> np.ndarray:
    centroids = [x[rng.integers(len(x))]]
    d2 = ((x - centroids[0]) ** 2).sum(1)
    for _ in range(k - 1):                      # k-means++ seeding
        centroids.append(x[rng.choice(len(x), p=d2 / d2.sum())])
        d2 = np.minimum(d2, ((x - centroids[-1]) ** 2).sum(1))
    c = np.stack(centroids)
    for _ in range(iters):
        a = nearest(x, c)
        sums = np.zeros_like(c)
        np.add.at(sums, a, x)
        counts = np.bincount(a, minlength=k)[:, None]
        c = np.where(counts > 0, sums / np.maximum(counts, 1), c)   # an empty cluster keeps its centroid
    return c


def load(split: str, crops: int, seed: int) -> np.ndarray:
    config = demo_config.get_config()
    train = split == "train"
    it, n = input_pipeline.create_dataset(config.data, split=split, batch_size=1 if not train else 8, seed=seed,
                                          train=train, drop_remainder=False, shard_index=0, shard_count=1)
    batches = itertools.islice(it, crops // 8) if train else it
    return np.concatenate([b["image"] for b in batches]).astype(np.float64)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patches", default="4,8")
    ap.add_argument("--codes", default="64,256")
    ap.add_argument("--crops", type=int, default=800, help="training crops to fit the centroids to")
    ap.add_argument("--iters", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    train, held_out = load("train", args.crops, args.seed), load("eval", 0, args.seed)
    rng = np.random.default_rng(args.seed)
    print(f"{len(train)} training crops, {len(held_out)} held-out photos of {held_out.shape[1]}x{held_out.shape[2]}")
    print("| patch | tokens | floor: grey | floor: mean colour | floor: patch mean | "
          + " | ".join(f"k-means {k}" for k in args.codes.split(",")) + " |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(args.codes.split(",")))
    grey = psnr(held_out, np.zeros_like(held_out))
    colour = psnr(held_out, np.broadcast_to(held_out.mean(axis=(1, 2), keepdims=True), held_out.shape))
    for p in (int(s) for s in args.patches.split(",")):
        x_train, x_eval = patches(train, p).reshape(-1, p * p * 3), patches(held_out, p)
        channel_means = x_eval.reshape(*x_eval.shape[:2], p * p, 3).mean(2, keepdims=True)
        patch_mean = unpatch(np.broadcast_to(channel_means, x_eval.shape[:2] + (p * p, 3)), held_out.shape, p)
        row = [f"{p}x{p}", str(x_eval.shape[1]), f"{grey:.2f}", f"{colour:.2f}", f"{psnr(held_out, patch_mean):.2f}"]
        for k in (int(s) for s in args.codes.split(",")):
            c = kmeans(x_train, k, args.iters, rng)
            flat = x_eval.reshape(-1, x_eval.shape[-1])
            recon = unpatch(c[nearest(flat, c)].reshape(x_eval.shape), held_out.shape, p)
            row.append(f"{psnr(held_out, recon):.2f}")
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
