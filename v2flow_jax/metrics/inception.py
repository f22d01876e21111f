"""The FID Inception-v3 feature extractor in Flax (NHWC): 2048-d pool3 features, as pytorch-fid computes them.

FID is only comparable across papers when taken with one particular network: the TensorFlow
Inception-v3 graph of 2015-12-05 that TTUR's FID code used, ported to PyTorch by pytorch-fid as
`FIDInceptionA/C/E_1/E_2` patched into torchvision's `Inception3` (weights file
`pt_inception-2015-12-05-6726825d.pth`). That graph differs from torchvision's own Inception-v3:
  * the pool branch of the A, C and E_1 blocks is a 3x3 / stride-1 average pool that ignores the
    zero padding in its denominator (TensorFlow's "SAME" avg pool, torch's count_include_pad=False);
  * the pool branch of the last block (Mixed_7c, E_2) is a 3x3 / stride-1 *max* pool;
  * 1008 output classes (unused here: FID reads the global average pool after Mixed_7c).
Every conv is `BasicConv2d`: conv without bias, BatchNorm (eps 1e-3, running statistics), ReLU.
Module names follow torchvision's (`Mixed_6b/branch7x7dbl_3/conv`), so each of our variables has one
source tensor (`Mixed_6b.branch7x7dbl_3.conv.weight`); `v2flow_jax.convert.inception_weights` writes the
safetensors file that `load_inception_params` reads.

Agreement with an independent torch re-derivation (tests/test_inception.py, random weights and
BatchNorm statistics, 2 x 299 x 299 inputs): 3e-13 in float64, so every layer matches; in float32
1.8e-4 at a feature scale of 6.5, which is float32 rounding through ~95 layers (torch's own float32
features are 2.3e-4 away from its float64 ones).

Input convention (ours, not pytorch-fid's): float NHWC RGB images in [-1, 1], the range our models
produce. pytorch-fid takes [0, 1] images, resizes them to 299 x 299 (bilinear, align_corners=False, no
antialias) and then maps them to [-1, 1]; bilinear weights sum to one, so mapping first and resizing
second is the same up to rounding. Inputs are clipped to [-1, 1] first, as writing them to an image file
would (pytorch-fid reads image files); they are not quantised to 8 bits, which moves an FID slightly.

Resize: `resize_to_inception` uses jax.image.resize("bilinear", antialias=False). It is not
bit-identical to torch's F.interpolate(mode="bilinear", align_corners=False): the sampling grid
(half-pixel centres) and edge clamping agree, the arithmetic does not. Measured in
tests/test_inception.py on uniform [-1, 1] float32 noise: at most 1.2e-7 (one float32 ulp near 1) both
for 64x64 -> 299 and for 512x384 -> 299. jax.image.resize's default antialias=True would low-pass when
shrinking, which pytorch-fid does not (0.93 difference on the same 512x384 noise), hence antialias=False.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
BN_EPSILON = 1e-3
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
CONVERT_HINT = ("convert pytorch-fid's weights once with `python -m v2flow_jax.convert.inception_weights "
                f"--pth=pt_inception-2015-12-05-6726825d.pth --out=fid_inception.safetensors` (the .pth is at "
                f"{FID_WEIGHTS_URL}; download it on a machine with network access)")
# Separator between the parts of a variable path in our safetensors file: params/Mixed_5b/branch1x1/conv/kernel.
KEY_SEPARATOR = "/"


class InceptionWeightsError(ValueError):
    """A weights file that does not fit the FID Inception; the message names the tensors and the fix."""


# --------------------------------------------------------------------------------------------------
# Input


def resize_to_inception(images, size: int = INCEPTION_SIZE):
    """Bilinear resize of NHWC `images` to size x size, as pytorch-fid's F.interpolate(align_corners=False).

    antialias=False: torch's bilinear interpolate does not low-pass when shrinking, and pytorch-fid's
    numbers are the reference. Images already of that size are returned unchanged.
    """
    images = jnp.asarray(images, jnp.float32)
    n, h, w, c = images.shape
    if (h, w) == (size, size):
        return images
    return jax.image.resize(images, (n, size, size, c), method="bilinear", antialias=False)


def preprocess(images, resize: bool = True, clip: bool = True):
    """[-1, 1] NHWC RGB images -> what the network reads: float32, clipped, 299 x 299."""
    x = jnp.asarray(images, jnp.float32)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"FID Inception takes NHWC RGB images, got shape {x.shape}.")
    if clip:
        x = jnp.clip(x, -1.0, 1.0)
    return resize_to_inception(x) if resize else x


# --------------------------------------------------------------------------------------------------
# Layers


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (running statistics, eps 1e-3) -> ReLU; `padding` is torch's (ph, pw)."""
    features: int
    kernel_size: int | tuple[int, int]
    strides: int | tuple[int, int] = 1
    padding: int | tuple[int, int] = 0
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        ph, pw = _pair(self.padding)
        x = nn.Conv(self.features, _pair(self.kernel_size), _pair(self.strides), padding=((ph, ph), (pw, pw)),
                    use_bias=False, dtype=self.dtype, precision=self.precision, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, dtype=self.dtype, name="bn")(x)
        return nn.relu(x)


def _avg_pool_same(x):
    # TensorFlow's SAME average pool: padded zeros are not counted (torch count_include_pad=False).
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_same(x):
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_reduce(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class _Block(nn.Module):
    dtype: Any = jnp.float32
    precision: Any = None

    def conv(self, name: str, features: int, kernel_size, strides=1, padding=0) -> BasicConv2d:
        return BasicConv2d(features, kernel_size, strides, padding, dtype=self.dtype, precision=self.precision,
                           name=name)


class FIDInceptionA(_Block):
    """35 x 35 block (Mixed_5b/c/d): 1x1, 5x5, double 3x3 and pool branches; the pool ignores padding."""
    pool_features: int = 32

    @nn.compact
    def __call__(self, x):
        b1 = self.conv("branch1x1", 64, 1)(x)
        b5 = self.conv("branch5x5_2", 64, 5, padding=2)(self.conv("branch5x5_1", 48, 1)(x))
        b3 = self.conv("branch3x3dbl_1", 64, 1)(x)
        b3 = self.conv("branch3x3dbl_3", 96, 3, padding=1)(self.conv("branch3x3dbl_2", 96, 3, padding=1)(b3))
        bp = self.conv("branch_pool", self.pool_features, 1)(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
    """35 -> 17 reduction (Mixed_6a)."""

    @nn.compact
    def __call__(self, x):
        b3 = self.conv("branch3x3", 384, 3, strides=2)(x)
        bd = self.conv("branch3x3dbl_1", 64, 1)(x)
        bd = self.conv("branch3x3dbl_3", 96, 3, strides=2)(self.conv("branch3x3dbl_2", 96, 3, padding=1)(bd))
        return jnp.concatenate([b3, bd, _max_pool_reduce(x)], axis=-1)


class FIDInceptionC(_Block):
    """17 x 17 block (Mixed_6b..e) with factorised 7x7 convolutions; the pool ignores padding."""
    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))      # (kernel, padding) of the 1x7 and 7x1 convs
        b1 = self.conv("branch1x1", 192, 1)(x)
        b7 = self.conv("branch7x7_1", c7, 1)(x)
        b7 = self.conv("branch7x7_2", c7, row[0], padding=row[1])(b7)
        b7 = self.conv("branch7x7_3", 192, col[0], padding=col[1])(b7)
        bd = self.conv("branch7x7dbl_1", c7, 1)(x)
        bd = self.conv("branch7x7dbl_2", c7, col[0], padding=col[1])(bd)
        bd = self.conv("branch7x7dbl_3", c7, row[0], padding=row[1])(bd)
        bd = self.conv("branch7x7dbl_4", c7, col[0], padding=col[1])(bd)
        bd = self.conv("branch7x7dbl_5", 192, row[0], padding=row[1])(bd)
        bp = self.conv("branch_pool", 192, 1)(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
    """17 -> 8 reduction (Mixed_7a)."""

    @nn.compact
    def __call__(self, x):
        b3 = self.conv("branch3x3_2", 320, 3, strides=2)(self.conv("branch3x3_1", 192, 1)(x))
        b7 = self.conv("branch7x7x3_1", 192, 1)(x)
        b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
        b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
        b7 = self.conv("branch7x7x3_4", 192, 3, strides=2)(b7)
        return jnp.concatenate([b3, b7, _max_pool_reduce(x)], axis=-1)


class FIDInceptionE(_Block):
    """8 x 8 block: Mixed_7b pools by average (ignoring padding), Mixed_7c by max, as the FID graph does."""
    pool: str = "avg"

    @nn.compact
    def __call__(self, x):
        b1 = self.conv("branch1x1", 320, 1)(x)
        b3 = self.conv("branch3x3_1", 384, 1)(x)
        b3 = jnp.concatenate([self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
                              self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)], axis=-1)
        bd = self.conv("branch3x3dbl_2", 384, 3, padding=1)(self.conv("branch3x3dbl_1", 448, 1)(x))
        bd = jnp.concatenate([self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
                              self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd)], axis=-1)
        pooled = _max_pool_same(x) if self.pool == "max" else _avg_pool_same(x)
        bp = self.conv("branch_pool", 192, 1)(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """[-1, 1] NHWC RGB images of any size -> (N, 2048) pool3 features (float32; float64 if dtype is).

    `resize_input` resizes to 299 x 299 as pytorch-fid does (turn it off only for inputs already that
    size); `clip_input` clips to [-1, 1]. `precision` defaults to HIGHEST: on TPU / GPU the default
    float32 conv precision uses bf16 / tf32 passes, which moves FID values; the features are cheap
    next to the model being evaluated.
    """
    resize_input: bool = True
    clip_input: bool = True
    dtype: Any = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, images):
        x = preprocess(images, resize=self.resize_input, clip=self.clip_input).astype(self.dtype)
        kw = dict(dtype=self.dtype, precision=self.precision)
        conv = lambda name, *a, **k: BasicConv2d(*a, **k, **kw, name=name)   # noqa: E731
        x = conv("Conv2d_1a_3x3", 32, 3, strides=2)(x)          # 149 x 149
        x = conv("Conv2d_2a_3x3", 32, 3)(x)                     # 147
        x = conv("Conv2d_2b_3x3", 64, 3, padding=1)(x)          # 147
        x = _max_pool_reduce(x)                                 # 73
        x = conv("Conv2d_3b_1x1", 80, 1)(x)
        x = conv("Conv2d_4a_3x3", 192, 3)(x)                    # 71
        x = _max_pool_reduce(x)                                 # 35
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = FIDInceptionA(pool_features=pool_features, **kw, name=name)(x)
        x = InceptionB(**kw, name="Mixed_6a")(x)                # 17
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = FIDInceptionC(channels_7x7=c7, **kw, name=name)(x)
        x = InceptionD(**kw, name="Mixed_7a")(x)                # 8
        x = FIDInceptionE(pool="avg", **kw, name="Mixed_7b")(x)
        x = FIDInceptionE(pool="max", **kw, name="Mixed_7c")(x)
        # Global average pool (pool3), in float32 at least: a bf16 mean over 64 positions loses digits.
        return jnp.mean(x.astype(jnp.promote_types(self.dtype, jnp.float32)), axis=(1, 2))


# --------------------------------------------------------------------------------------------------
# Weights


def expected_variables(module: FIDInceptionV3 | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """Our variables as 'params/Mixed_5b/branch1x1/conv/kernel' -> abstract array (nothing allocated)."""
    module = module or FIDInceptionV3()
    dummy = jax.ShapeDtypeStruct((1, INCEPTION_SIZE, INCEPTION_SIZE, 3), jnp.float32)
    abstract = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), dummy)
    return {KEY_SEPARATOR.join(path): leaf for path, leaf in traverse_util.flatten_dict(abstract).items()}


def _listing(keys: Sequence[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_tensors(tensors: Mapping[str, Any], expected: Mapping[str, Any], source: str,
                  name_of=lambda key: key, shape_of=tuple, hint: str = CONVERT_HINT) -> None:
    """Raises InceptionWeightsError naming every missing, unexpected and mis-shaped tensor.

    `expected` maps our keys to abstract arrays; `name_of` / `shape_of` give the name and shape the
    tensor has in `tensors` (identity for our file; torchvision's names and OIHW for the converter).
    """
    wanted = {name_of(k): k for k in expected}
    missing = sorted(set(wanted) - set(tensors))
    unexpected = sorted(set(tensors) - set(wanted))
    mismatched = []
    for name, key in sorted(wanted.items()):
        want = tuple(shape_of(tuple(expected[key].shape)))
        if name in tensors and tuple(np.shape(tensors[name])) != want:
            mismatched.append(f"{name}: file {tuple(np.shape(tensors[name]))}, model {want}")
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors are missing ({_listing(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors are not part of the FID Inception ({_listing(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} tensors have the wrong shape ({'; '.join(mismatched[:8])}"
                        f"{' ...' if len(mismatched) > 8 else ''})")
    if problems:
        raise InceptionWeightsError(f"{source} does not fit the FID Inception-v3: " + "; ".join(problems)
                                    + f". The file is truncated, from another network or an older layout: {hint}.")


def load_inception_params(path: str | os.PathLike, module: FIDInceptionV3 | None = None) -> dict[str, Any]:
    """{'params': ..., 'batch_stats': ...} (float32 jax arrays) from our safetensors file, checked tensor by tensor."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InceptionWeightsError(f"FID Inception weights {path!r} do not exist: {CONVERT_HINT}.")
    if path.endswith((".pth", ".pt", ".bin", ".ckpt")):
        raise InceptionWeightsError(f"{path!r} is a pickled torch file, which is never loaded here: {CONVERT_HINT}.")
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise InceptionWeightsError(f"{path!r} is not a readable safetensors file ({e}): {CONVERT_HINT}.") from e
    expected = expected_variables(module)
    check_tensors(tensors, expected, repr(path))
    flat = {tuple(key.split(KEY_SEPARATOR)): jnp.asarray(tensors[key], expected[key].dtype) for key in expected}
    return traverse_util.unflatten_dict(flat)


def feature_fn(variables: Mapping[str, Any], module: FIDInceptionV3 | None = None):
    """A jitted images -> (N, 2048) pool3 features function over fixed `variables`."""
    module = module or FIDInceptionV3()
    apply = jax.jit(module.apply)   # variables as an argument: 95 MB of constants would bloat the executable
    return lambda images: apply(variables, images)
