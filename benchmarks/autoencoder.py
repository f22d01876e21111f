"""DC-AE f32c32 encode/decode time per image: our Flax port (jitted) beside diffusers' torch model.

Both run the same weights: diffusers' random init (or a real checkpoint via --checkpoint), passed
through our converter. Prints a markdown table of wall seconds and, in brackets, process CPU seconds
(all threads) per image: on a shared machine the CPU seconds stay meaningful when the wall time does
not. The last column is the largest |ours - torch| over encode and decode.

    python benchmarks/autoencoder.py                      # 256^2, 3 repeats, batch 1
    python benchmarks/autoencoder.py --sizes 256 512 --repeats 5 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[256], help="square image sizes (multiples of 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement, after one warm-up")
    p.add_argument("--batch", type=int, default=1, help="images per call; times are reported per image")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="our compute dtype")
    p.add_argument("--checkpoint", default=None, help="a diffusers AutoencoderDC directory (default: random init)")
    p.add_argument("--no_torch", action="store_true", help="time only ours (weights still come from diffusers)")
    return p.parse_args()


def torch_model(checkpoint):
    import torch
    from diffusers import AutoencoderDC

    from v2flow_jax.models.autoencoders.dc_ae import sana_f32c32_config
    if checkpoint:
        return AutoencoderDC.from_pretrained(checkpoint).eval()
    torch.manual_seed(0)
    return AutoencoderDC(**sana_f32c32_config()).eval()


def timed(fn, repeats):
    """Mean (wall s, cpu s) of `repeats` calls after one warm-up call, and the last output."""
    out = fn()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        out = fn()
    return ((time.perf_counter() - t0) / repeats, (time.process_time() - c0) / repeats), out


def compiled(fn, *args):
    """The jitted, compiled `fn` for these arguments and the seconds compilation took."""
    t0 = time.perf_counter()
    exe = jax.jit(fn).lower(*args).compile()
    return exe, time.perf_counter() - t0


def main():
    args = parse_args()
    import torch

    from v2flow_jax.convert import dc_ae as convert
    from v2flow_jax.models.autoencoders.dc_ae import DCAutoencoder, sana_f32c32_config

    torch.set_num_threads(args.threads)
    model = torch_model(args.checkpoint)
    config = dict(model.config) if args.checkpoint else sana_f32c32_config()
    ae = DCAutoencoder(config, dtype=jnp.dtype(args.dtype))
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params = jax.tree.map(jnp.asarray, convert.convert_state_dict(state, ae, source="the diffusers model"))

    rows = []
    for size in args.sizes:
        rng = np.random.default_rng(size)
        images = rng.uniform(-1, 1, (args.batch, size, size, 3)).astype(np.float32)
        latents = rng.standard_normal((args.batch, size // ae.stride, size // ae.stride, ae.channels)).astype(np.float32)
        encode, enc_compile = compiled(ae.encode, params, images)
        decode, dec_compile = compiled(ae.decode, params, latents)
        enc, z = timed(lambda: encode(params, images).block_until_ready(), args.repeats)
        dec, x = timed(lambda: decode(params, latents).block_until_ready(), args.repeats)
        ours = [size, f"ours (jax, {args.dtype})", enc, dec, f"{enc_compile:.1f} / {dec_compile:.1f}", "-"]
        rows.append(ours)
        if args.no_torch:
            continue
        with torch.no_grad():
            timgs = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
            tlat = torch.from_numpy(latents).permute(0, 3, 1, 2).contiguous()
            tenc, tz = timed(lambda: model.encode(timgs).latent, args.repeats)
            tdec, tx = timed(lambda: model.decode(tlat).sample, args.repeats)
        err = max(np.abs(np.asarray(z, np.float32) - tz.permute(0, 2, 3, 1).numpy()).max(),
                  np.abs(np.asarray(x, np.float32) - tx.permute(0, 2, 3, 1).numpy()).max())
        ours[5] = f"{err:.1e}"
        rows.append([size, f"diffusers (torch, {args.threads} threads)", tenc, tdec, "-", "-"])

    weights = args.checkpoint or "f32c32, random weights"
    print(f"\nDC-AE ({weights}), batch {args.batch}, {args.repeats} timed calls after one warm-up, "
          f"{jax.devices()[0].platform} ({jax.device_count()} jax devices)\n")
    print("| size | implementation | encode s/img [cpu s] | decode s/img [cpu s] | compile s (enc / dec) | max abs diff |")
    print("|---|---|---|---|---|---|")
    per_image = lambda t: f"{t[0] / args.batch:.2f} [{t[1] / args.batch:.2f}]"
    for size, name, enc, dec, compile_s, err in rows:
        print(f"| {size}^2 | {name} | {per_image(enc)} | {per_image(dec)} | {compile_s} | {err} |")


if __name__ == "__main__":
    main()
