"""LPIPS (Zhang et al. 2018), VGG16 variant v0.1, as a Flax module: a perceptual distance between images.

The distance of two images is built from five VGG16 activations (relu1_2, relu2_2, relu3_3, relu4_3,
relu5_3): each is normalised to unit length along channels, the two images' features are subtracted and
squared, a learned non-negative 1x1 head (no bias) weighs the channels, and the result is averaged over
space and summed over the five layers. It matches `lpips.LPIPS(net='vgg', version='0.1')` of the `lpips`
package (see third_party/LPIPS.md).

Images are float NHWC in [-1, 1], as everywhere in this project. The weights come from one safetensors
file written by `python -m v2flow_jax.convert.lpips_weights` (torchvision's VGG16 + lpips' heads); no
torch is needed here. Names in that file are our parameter paths joined by '/', e.g.
`vgg/conv3_2/kernel` (HWIO) or `lin2/kernel` (channels, 1).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

# Output widths of the convs of each VGG16 stage; stage s ends at the tap relu{s}_{last}.
VGG16_STAGES: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512),
                                             (512, 512, 512))
TAP_NAMES = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
# lpips' ScalingLayer (lpips/lpips.py): roughly ImageNet's mean and std, re-expressed for [-1, 1] input.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# lpips.normalize_tensor adds this to the norm (not to the squared norm) so all-zero features stay zero.
NORM_EPS = 1e-10
# Four 2x2 poolings sit before relu5_3, so smaller images leave it without a single pixel.
MIN_SIDE = 16
SEPARATOR = "/"
CONVERT_HINT = ("write the file with `python -m v2flow_jax.convert.lpips_weights --vgg16=vgg16-397923af.pth "
                "--lpips_heads=vgg.pth --out=PATH` (torchvision's VGG16 weights and the lpips package's "
                "weights/v0.1/vgg.pth)")


class LPIPSWeightsError(ValueError):
    """A weights file that cannot be used; the message names the file, the tensors and the fix."""


# --------------------------------------------------------------------------------------------------
# The pieces, as pure functions


def conv_names() -> list[str]:
    """Our names of the 13 VGG16 convs in network order: conv1_1, conv1_2, conv2_1, ..., conv5_3."""
    return [f"conv{s}_{i}" for s, widths in enumerate(VGG16_STAGES, 1) for i in range(1, len(widths) + 1)]


def tap_channels() -> tuple[int, ...]:
    """Channels of the five tapped activations (also the input widths of the five heads)."""
    return tuple(widths[-1] for widths in VGG16_STAGES)


def param_shapes() -> dict[str, tuple[int, ...]]:
    """Every parameter of `LPIPS`, flat ('/'-joined path -> shape), in the order of the network."""
    shapes, cin = {}, 3
    for name, cout in zip(conv_names(), [w for widths in VGG16_STAGES for w in widths]):
        shapes[f"vgg/{name}/kernel"] = (3, 3, cin, cout)
        shapes[f"vgg/{name}/bias"] = (cout,)
        cin = cout
    for k, c in enumerate(tap_channels()):
        shapes[f"lin{k}/kernel"] = (c, 1)
    return shapes


def scale_input(x: jax.Array) -> jax.Array:
    """[-1, 1] RGB -> the VGG16 input LPIPS v0.1 uses (per-channel shift and scale)."""
    return (x - jnp.asarray(SHIFT, x.dtype)) / jnp.asarray(SCALE, x.dtype)


def unit_normalize(f: jax.Array, eps: float = NORM_EPS) -> jax.Array:
    """Each pixel's feature vector divided by its L2 norm over channels (last axis)."""
    norm = jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True))
    return f / (norm + eps)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    # VALID padding drops an odd last row/column, as torch's MaxPool2d(2, 2) (floor mode) does.
    return nn.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")


def check_images(x, y) -> None:
    """Shape errors at trace time, rather than a broadcast or an empty relu5_3 deep inside."""
    if x.shape != y.shape:
        raise ValueError(f"LPIPS compares images of one shape; got {x.shape} and {y.shape}.")
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"LPIPS takes NHWC RGB images (B, H, W, 3) in [-1, 1]; got shape {x.shape}.")
    if min(x.shape[1:3]) < MIN_SIDE:
        raise ValueError(f"LPIPS needs images of at least {MIN_SIDE}x{MIN_SIDE} pixels (relu5_3 is 1/16 of the "
                         f"side); got {x.shape[1]}x{x.shape[2]}.")


# --------------------------------------------------------------------------------------------------
# Modules


class VGG16Features(nn.Module):
    """The conv part of VGG16 up to relu5_3 (3x3 convs, padding 1, ReLU; 2x2 max-pool between stages).

    Takes the already scaled input (`scale_input`) and returns the five tapped activations, NHWC.
    """
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        taps = []
        for s, widths in enumerate(VGG16_STAGES, 1):
            if s > 1:
                x = max_pool_2x2(x)
            for i, width in enumerate(widths, 1):
                conv = nn.Conv(width, (3, 3), padding=1, precision=self.precision, name=f"conv{s}_{i}")
                x = nn.relu(conv(x))
            taps.append(x)
        return tuple(taps)


class LPIPS(nn.Module):
    """LPIPS-VGG v0.1 distance of two image batches: (B, H, W, 3) x 2 in [-1, 1] -> (B,).

    `precision` defaults to HIGHEST so the metric means the same on every backend (TPU's default
    would run the float32 convs in bfloat16 passes).
    """
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def per_layer(self, x: jax.Array, y: jax.Array) -> tuple[jax.Array, ...]:
        """The five layers' contributions, each (B,); `__call__` is their sum."""
        check_images(x, y)
        b = x.shape[0]
        x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
        # One VGG pass over both batches: half the convs to compile. (Two passes would not make
        # LPIPS(x, x) exactly 0 either: XLA may compile or tile them differently; it is ~1e-16.)
        feats = VGG16Features(self.precision, name="vgg")(scale_input(jnp.concatenate([x, y], axis=0)))
        out = []
        for k, f in enumerate(feats):
            diff = (unit_normalize(f[:b]) - unit_normalize(f[b:])) ** 2
            head = nn.Dense(1, use_bias=False, precision=self.precision, name=f"lin{k}")
            # The head weighs channels per pixel; lpips averages over space afterwards.
            out.append(jnp.mean(head(diff), axis=(1, 2, 3)))
        return tuple(out)

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        return functools.reduce(jnp.add, self.per_layer(x, y))


# --------------------------------------------------------------------------------------------------
# Functional entry points


@functools.partial(jax.jit, static_argnames=("precision",))
def lpips_distance(params, x: jax.Array, y: jax.Array, precision=jax.lax.Precision.HIGHEST) -> jax.Array:
    """LPIPS-VGG distance per image pair, (B,); `params` from `load_lpips_params`, images NHWC in [-1, 1]."""
    return LPIPS(precision).apply({"params": params}, x, y)


@functools.partial(jax.jit, static_argnames=("precision",))
def vgg16_features(params, x: jax.Array, precision=jax.lax.Precision.HIGHEST) -> tuple[jax.Array, ...]:
    """The five VGG16 taps of images in [-1, 1] (scaling layer included); `params` as for `lpips_distance`."""
    return VGG16Features(precision).apply({"params": params["vgg"]}, scale_input(jnp.asarray(x, jnp.float32)))


# --------------------------------------------------------------------------------------------------
# Weights


def name_listing(keys, limit: int = 6) -> str:
    """'a, b, c and 4 more': error messages name tensors without flooding the screen."""
    keys = list(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_flat_params(flat: Mapping[str, Any], source: str) -> None:
    """Raises LPIPSWeightsError naming the missing, unexpected and mis-shaped tensors of `flat`."""
    expected = param_shapes()
    missing = [k for k in expected if k not in flat]
    unexpected = [k for k in flat if k not in expected]
    wrong = [f"{k} has shape {tuple(np.shape(flat[k]))}, expected {expected[k]}"
             for k in expected if k in flat and tuple(np.shape(flat[k])) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing tensors: {name_listing(missing)}")
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong[:6]) + (" ..." if len(wrong) > 6 else ""))
    if unexpected:
        hint = (" (torch names: this is a torch state dict, not a converted file)"
                if any(k.startswith(("features.", "lin0.model")) for k in unexpected) else "")
        problems.append(f"unexpected tensors{hint}: {name_listing(unexpected)}")
    if problems:
        raise LPIPSWeightsError(f"{source} is not a complete LPIPS-VGG weights file: " + "; ".join(problems)
                                + f". To fix it, {CONVERT_HINT}.")


def unflatten(flat: Mapping[str, Any]) -> dict:
    """{'vgg/conv1_1/kernel': a, ...} -> the nested params tree `LPIPS.apply` takes."""
    return traverse_util.unflatten_dict({tuple(k.split(SEPARATOR)): v for k, v in flat.items()})


def load_lpips_params(path: str | os.PathLike) -> dict:
    """The LPIPS-VGG params (a nested dict of float32 jax arrays) from a converted safetensors file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LPIPSWeightsError(f"LPIPS weights file {path!r} does not exist: {CONVERT_HINT}.")
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        flat = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise LPIPSWeightsError(f"{path!r} is not a safetensors file ({e}): {CONVERT_HINT}.") from e
    check_flat_params(flat, repr(path))
    return unflatten({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})
