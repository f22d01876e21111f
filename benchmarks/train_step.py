"""Training-step speed: step time, images/s, FLOP utilisation, memory and compile time; prints a table.

    python benchmarks/train_step.py                     # tiny + release-comparison configs
    python benchmarks/train_step.py --configs=all --repeats=20

"release" and "release_novocab" are the official PyTorch release's setting used for the side-by-side
figure (issue: one step = forward, backward, AdamW on 4 latents of 8x8x32; width 256, 2 + 2 blocks,
velocity MLP 2 x 256, resampler width 128, generator over a 2048 x 256 vocabulary, codebook 16384 x
256, diffusion batch multiplier 4). The release's own step time on the same machine comes from
`benchmarks/release_pytorch/` (2 torch threads; its step has no weight EMA, ours does): 0.478 s / 0.196 s
on the 2-core Zen 3 development VM on a quiet day; that VM's speed drifts, so for a comparison time
both back to back and pass the release's figures with `--release-seconds`. (The issue quoted
0.28 s / 0.13 s from a faster AVX-512 machine.) The page-fault column shows whether freed host
memory is being kept (v2flow_jax/host_memory.py; V2FLOW_RETAIN_HOST_MEMORY=0 turns it off).
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import jax
import numpy as np

from v2flow_jax import build, config_defaults, host_memory, sharding, train, train_state
host_memory.apply_default()   # as main does: before the first computation

import release_figures  # benchmarks/release_figures.py (this directory is on sys.path when run as a script)

# benchmarks/release_pytorch on the 2-core AMD EPYC (Zen 3) development VM, December 2026
RELEASE_SECONDS = {"release": 0.478, "release_novocab": 0.196}


def bench_config(name: str, dtype: str = "float32", dropout: float = 0.1):
    c = config_defaults.base_config()
    c.mesh = [("data", 1), ("fsdp", 1), ("tensor", 1)]
    c.autoencoder.name = "pixels"
    c.ema_decay = 0.9999
    c.vocabulary.checkpoint = ""
    c.model.dropout = dropout
    c.model.dtype = dtype
    if name == "tiny":
        c.image_size = c.data.image_size = 32
        c.autoencoder.patch_size = 4
        c.model.update(latent_size=8, latent_channels=48, preset="tiny", resampler_width=16, resampler_depth=1,
                       token_dim=16, codebook_size=64, velocity_width=32, velocity_depth=1)
        c.batch_size = 8
    elif name in ("release", "release_novocab"):
        # Latents fed directly (the release trains on cached latents): no autoencoder.
        c.image_size = c.data.image_size = 8
        c.autoencoder.name = "none"
        c.model.update(latent_size=8, latent_channels=32, preset="small", resampler_width=128, resampler_depth=4,
                       vocab_size=2048, vocab_dim=256, generator_rank=0, codebook_size=16384,
                       velocity_width=256, velocity_depth=2, diffusion_batch_mul=4)
        if name == "release_novocab":
            c.model.update(vocab_size=0, token_dim=256, resampler_depth=2, codebook_size=1024)
        c.batch_size = 4
    elif name == "mid":
        c.image_size = c.data.image_size = 8
        c.autoencoder.name = "none"
        c.model.update(latent_size=8, latent_channels=32, preset="base", resampler_width=256, resampler_depth=2,
                       token_dim=768, codebook_size=4096, velocity_width=768, velocity_depth=4)
        c.batch_size = 8
    else:
        raise ValueError(f"unknown benchmark config {name!r}")
    return c


def measured_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """This machine's f32 FLOP/s on one large jitted matmul (the utilisation figure's denominator)."""
    a = jax.numpy.ones((n, n), jax.numpy.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def measure(name: str, repeats: int, dtype: str, dropout: float, peak: float):
    config = bench_config(name, dtype, dropout)
    run = build.build_run(config)
    tx = train.make_optimizer(config)
    state, state_sh = train_state.init_state(run, tx, 0)
    cfg = run.model.config
    if name == "tiny":
        batch = {"image": np.random.uniform(-1, 1, (config.batch_size, config.image_size, config.image_size, 3))
                 .astype(np.float32)}
    else:
        batch = {"latent": np.random.normal(size=(config.batch_size, cfg.latent_size, cfg.latent_size,
                                                  cfg.latent_channels)).astype(np.float32)}
    batch = sharding.put_batch(batch, run.mesh)
    t0 = time.perf_counter()
    step_fn, flops = train.compile_train_step(run, tx, state, state_sh, batch)
    constants = run.constants
    compile_s = time.perf_counter() - t0
    mem = step_fn.memory_analysis()
    peak_bytes = 0
    if mem is not None:
        peak_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                      - mem.alias_size_in_bytes)
    for _ in range(3):
        state, metrics = step_fn(state, batch, constants)
    jax.block_until_ready(state)
    times = []
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        t = time.perf_counter()
        state, metrics = step_fn(state, batch, constants)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / repeats
    step = statistics.median(times)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    return dict(name=name, params_m=n_params / 1e6, batch=config.batch_size, step_s=step, spread=(min(times), max(times)),
                img_s=config.batch_size / step, gflop=flops / 1e9, mfu=flops / step / peak if peak else 0.0,
                mem_mb=peak_bytes / 2**20, compile_s=compile_s, faults=faults)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,release,release_novocab",
                        help="comma list of tiny, release, release_novocab, mid, or 'all'")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dropout", type=float, default=0.1, help="MAR dropout (the release's 0.1)")
    parser.add_argument("--peak", type=float, default=0.0,
                        help="peak FLOP/s per device for the MFU column (default: train.PEAK_FLOPS on accelerators, "
                             "a measured 2048^2 f32 matmul on CPU)")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="compute dtypes to time (bfloat16 = bf16 matmul inputs, f32 accumulation)")
    parser.add_argument("--release-seconds", default="",
                        help="override the release's figures, e.g. 'release=0.44,release_novocab=0.22'")
    args = parser.parse_args()
    release = release_figures.with_overrides(RELEASE_SECONDS, args.release_seconds)
    names = ["tiny", "release", "release_novocab", "mid"] if args.configs == "all" else args.configs.split(",")
    peak = args.peak or (measured_matmul_peak() if jax.devices()[0].platform == "cpu"
                         else train.peak_flops(config_defaults.base_config()))
    print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind} x {jax.device_count()}, "
          f"peak {peak / 1e9:.0f} GFLOP/s per device; median of {args.repeats} steps (min-max); freed host memory "
          f"{'retained' if host_memory.applied() else 'returned to the OS'} "
          f"({host_memory.ENV_SWITCH}, v2flow_jax/host_memory.py)\n")
    peak *= jax.device_count()
    print("| config | dtype | params (M) | batch | step (s) | images/s | GFLOP/step | MFU | peak mem (MB) | compile (s) "
          "| page faults / step | release (s) | speed-up |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, dtype in [(n, d) for n in names for d in args.dtypes.split(",")]:
        r = measure(name, args.repeats, dtype, args.dropout, peak)
        ref = release.get(name)
        speedup = f"{ref / r['step_s']:.1f}x" if ref else "-"
        print(f"| {name} | {dtype} | {r['params_m']:.2f} | {r['batch']} | {r['step_s']:.3f} ({r['spread'][0]:.3f}-"
              f"{r['spread'][1]:.3f}) | {r['img_s']:.1f} | "
              f"{r['gflop']:.2f} | {100 * r['mfu']:.1f}% | {r['mem_mb']:.0f} | {r['compile_s']:.1f} | {r['faults']:.0f} | "
              f"{ref if ref else '-'} | {speedup} |", flush=True)


if __name__ == "__main__":
    main()
