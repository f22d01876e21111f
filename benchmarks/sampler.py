"""Reconstruction latency of the jitted masked-AR rectified-flow sampler (encode + decode).

Times `sampling.reconstruct_latents` (resampler -> quantizer -> projector -> K AR steps of the MAR
encoder/decoder + ODE solve) under one `jax.jit`, with `block_until_ready`, for each ODE solver and
model size, and prints a markdown table:

    python benchmarks/sampler.py                       # tiny, release, release-novocab
    python benchmarks/sampler.py --mid --repeats 9     # + a mid-size model
    python benchmarks/sampler.py --configs release --solvers dpm_solver_pp_2m --ar-loops unrolled,scan

"release" is the equal-work comparison with the PyTorch release from the project issue: 4 latents
of 8x8x32 (n = L = 64), encoder/decoder 256 wide, 2 + 2 blocks, 4 heads (mar preset 'small'),
velocity MLP depth 2 width 256, resampler width 128 with RegStage depth 4 and generator
128 -> 2048 -> 2048 over a 2048 x 256 vocabulary, codebook 16384 x 256, K = 4 AR steps,
DPM-Solver++(2M) 20 steps with guidance (cfg 2.9, both passes). "release-novocab" has no vocabulary,
RegStage depth 2, codebook 1024, token_dim 256. The release's own time for the same work, on the
same machine, comes from `benchmarks/release_pytorch/` (2 torch threads): RELEASE_SECONDS below, or
`--release-seconds` to pass figures measured elsewhere. (The issue quoted 0.49 s / 0.41 s, taken on
a faster AVX-512 machine; on the 2-core Zen 3 development VM the release takes 0.71 s / 0.72 s.)
Only the dpm_solver_pp_2m rows are equal work, so only they get a speed-up; euler has the same NFE,
heun twice as many.

Compile time is the first call minus the steady-state median. The timed calls are interleaved across
solvers; on a shared machine also read the min and the CPU-time columns. Parameters are the real initialiser's
(the vocabulary a random table): the timing does not depend on their values.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import jax

from v2flow_jax import sampling
from v2flow_jax import host_memory
host_memory.apply_default()   # as main does: before the first computation
from v2flow_jax.models.tokenizer import TokenizerConfig, build_tokenizer, count_parameters, init_variables

import release_figures  # benchmarks/release_figures.py (this directory is on sys.path when run as a script)

CONFIGS = {
    "tiny": TokenizerConfig(latent_size=8, latent_channels=8, preset="tiny", resampler_width=16, resampler_depth=1,
                            token_dim=32, codebook_size=64, velocity_width=32, velocity_depth=2),
    "release": TokenizerConfig(latent_size=8, latent_channels=32, preset="small", resampler_width=128,
                               resampler_depth=4, vocab_size=2048, vocab_dim=256, generator_rank=0,
                               codebook_size=16384, velocity_width=256, velocity_depth=2),
    "release-novocab": TokenizerConfig(latent_size=8, latent_channels=32, preset="small", resampler_width=128,
                                       resampler_depth=2, vocab_size=0, token_dim=256, codebook_size=1024,
                                       velocity_width=256, velocity_depth=2),
    "mid": TokenizerConfig(latent_size=8, latent_channels=32, preset="base", resampler_width=256, resampler_depth=4,
                           token_dim=256, codebook_size=16384, velocity_width=1024, velocity_depth=6),
}
# The PyTorch release's seconds per batch of 4 on 2 CPU threads, DPM-Solver++(2M) 20 steps, both CFG passes,
# measured by benchmarks/release_pytorch on the 2-core AMD EPYC (Zen 3) development VM, December 2026.
RELEASE_SECONDS = {"release": 0.708, "release-novocab": 0.723}
SOLVERS = ("euler", "heun", "dpm_solver_pp_2m")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="tiny,release,release-novocab",
                   help=f"comma-separated, from {sorted(CONFIGS)}")
    p.add_argument("--mid", action="store_true", help="also time the mid-size config")
    p.add_argument("--solvers", default=",".join(SOLVERS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--solver-steps", type=int, default=20)
    p.add_argument("--ar-steps", type=int, default=4)
    p.add_argument("--cfg", type=float, default=2.9)
    p.add_argument("--warmup", type=int, default=2, help="steady-state calls before timing")
    p.add_argument("--repeats", type=int, default=7, help="timed calls; the median is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ar-loops", default="unrolled",
                   help="comma list of sampler AR loops: unrolled (exact shapes), scan (padded windows)")
    p.add_argument("--release-seconds", default="",
                   help="override the release's figures, e.g. 'release=0.49,release-novocab=0.41'")
    p.add_argument("--dtypes", default="float32",
                   help="comma list of compute dtypes (bfloat16 = bf16 matmul inputs, float32 accumulation)")
    return p.parse_args(argv)


def time_config(name: str, model_cfg: TokenizerConfig, solvers, args):
    """Times every (solver, AR loop) on one model; the timed calls are interleaved across them (round robin), so
    a change in machine load during the run hits them all alike."""
    model = build_tokenizer(model_cfg)
    variables = jax.jit(lambda r: init_variables(model, r))(jax.random.key(args.seed))
    latents = jax.random.normal(jax.random.key(args.seed + 1),
                                (args.batch, model_cfg.latent_size, model_cfg.latent_size, model_cfg.latent_channels))
    runs = {}
    variants = [(solver, loop) for solver in solvers for loop in args.ar_loops.split(",")]
    for solver, loop in variants:
        cfg = sampling.SamplerConfig(num_ar_steps=args.ar_steps, solver=solver, solver_steps=args.solver_steps,
                                     cfg_scale=args.cfg, ar_loop=loop)
        cfg.validate()
        fn = jax.jit(lambda v, x, r, cfg=cfg: sampling.reconstruct_latents(model, v, x, r, cfg))
        t0 = time.perf_counter()
        jax.block_until_ready(fn(variables, latents, jax.random.key(0)))
        runs[solver, loop] = {"cfg": cfg, "fn": fn, "first": time.perf_counter() - t0, "wall": [], "cpu": []}
        for i in range(args.warmup):
            jax.block_until_ready(fn(variables, latents, jax.random.key(1 + i)))
    for i in range(args.repeats):
        rng = jax.random.key(100 + i)
        for variant in variants:
            r = runs[variant]
            c0, t0 = time.process_time(), time.perf_counter()
            jax.block_until_ready(r["fn"](variables, latents, rng))
            r["wall"].append(time.perf_counter() - t0)
            r["cpu"].append(time.process_time() - c0)
    rows = []
    for solver, loop in variants:
        r = runs[solver, loop]
        med = statistics.median(r["wall"])
        nfe = sampling.model_evaluations(model_cfg.num_patches, r["cfg"])
        rows.append({
            "config": name, "solver": solver, "loop": loop,
            "params_m": count_parameters(variables.get("params", {})) / 1e6,
            "mar_passes": nfe["mar_passes"], "velocity_nfe": nfe["velocity_nfe"],
            "compile_s": r["first"] - med, "batch_s": med, "image_ms": 1e3 * med / args.batch,
            "images_per_s": args.batch / med, "spread": (min(r["wall"]), max(r["wall"])),
            "cpu_s": statistics.median(r["cpu"]),
        })
        print(f"  done {name} / {solver} / {loop}: {1e3 * med:.1f} ms", file=sys.stderr, flush=True)
    return rows


def markdown(rows, args) -> str:
    head = ("| config | solver | AR loop | params (M) | MAR passes | velocity NFE | compile (s) | latency / batch (ms) "
            "| latency / image (ms) | images / s | CPU time / batch (s) | release (ms / batch) | speed-up |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    release = release_figures.with_overrides(RELEASE_SECONDS, args.release_seconds)
    for r in rows:
        base = r["config"].split(" ")[0]
        equal_work = (r["solver"] == "dpm_solver_pp_2m" and base in release
                      and args.batch == 4 and args.solver_steps == 20 and args.ar_steps == 4 and args.cfg != 1.0)
        rel = release.get(base)
        rel_s = f"{1e3 * rel:.0f}" if rel and equal_work else "-"
        speed = f"{rel / r['batch_s']:.2f}x" if rel and equal_work else "-"
        out.append(f"| {r['config']} | {r['solver']} | {r['loop']} | {r['params_m']:.2f} | {r['mar_passes']} "
                   f"| {r['velocity_nfe']} "
                   f"| {r['compile_s']:.1f} | {1e3 * r['batch_s']:.1f} ({1e3 * r['spread'][0]:.0f}-"
                   f"{1e3 * r['spread'][1]:.0f}) | {r['image_ms']:.1f} | {r['images_per_s']:.1f} | {r['cpu_s']:.2f} "
                   f"| {rel_s} | {speed} |")
    return "\n".join(out)


def main(argv=None):
    args = parse_args(argv)
    names = [c for c in args.configs.split(",") if c]
    if args.mid and "mid" not in names:
        names.append("mid")
    unknown = [c for c in names if c not in CONFIGS]
    solvers = [s for s in args.solvers.split(",") if s]
    bad = [s for s in solvers if s not in SOLVERS]
    if unknown or bad:
        sys.exit(f"unknown configs {unknown} / solvers {bad}")
    dev = jax.devices()[0]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device: {dev.platform} {dev.device_kind} x{jax.device_count()}, cpus {os.cpu_count()}, "
          f"load avg {load:.1f}; jax {jax.__version__}")
    print(f"batch {args.batch}, K = {args.ar_steps} AR steps, {args.solver_steps} solver steps, cfg {args.cfg} "
          f"(both passes), time shift 3; median of {args.repeats} after {args.warmup} warm-up calls "
          f"(min-max in brackets)\n", flush=True)
    rows = []
    for name in names:
        for dtype in args.dtypes.split(","):
            cfg = dataclasses.replace(CONFIGS[name], dtype=dtype)
            rows.extend(time_config(name if dtype == "float32" else f"{name} ({dtype})", cfg, solvers, args))
    print(markdown(rows, args))
    print("\nlatency: wall-clock median (min-max); CPU time: process CPU seconds per call (all threads; load-"
          "independent-ish, but includes the thread pool's spinning).")
    print("release: PyTorch release, 2 CPU threads, same work (DPM-Solver++(2M) 20 steps, both CFG passes); "
          "speed-up = release / ours, dpm_solver_pp_2m rows only.")


if __name__ == "__main__":
    main()
