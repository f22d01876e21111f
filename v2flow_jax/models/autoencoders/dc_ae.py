"""DC-AE (Deep Compression Autoencoder, MIT Han Lab) in Flax linen, NHWC.

The configuration is the one diffusers' `AutoencoderDC` stores in its `config.json`, so a diffusers
checkpoint loads without translation (see `v2flow_jax/convert/dc_ae.py`). Module and parameter names
mirror the diffusers state-dict paths (`down_blocks_3_1` <-> `down_blocks.3.1`) so the converter is a
rename plus a kernel transpose, and the structure is read off the module instead of re-described.

Blocks:
  ResBlock           conv3x3 -> act -> conv3x3 (no bias) -> norm, residual.
  EfficientViTBlock  LiteMLA (ReLU linear attention over multi-scale qkv) then GLU-MBConv, both residual.
  down/up blocks     strided conv or conv + pixel-unshuffle / nearest-interpolate or conv + pixel-shuffle,
                     plus a parameter-free space-to-channel shortcut (channel-group mean / repeat).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import einops
import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any

# Fields of diffusers' `AutoencoderDC.__init__` with its defaults (diffusers 0.42).
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "latent_channels": 32,
    "attention_head_dim": 32,
    "encoder_block_types": "ResBlock",
    "decoder_block_types": "ResBlock",
    "encoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "decoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "encoder_layers_per_block": (2, 2, 2, 3, 3, 3),
    "decoder_layers_per_block": (3, 3, 3, 3, 3, 3),
    "encoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "decoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "upsample_block_type": "pixel_shuffle",
    "downsample_block_type": "pixel_unshuffle",
    "decoder_norm_types": "rms_norm",
    "decoder_act_fns": "silu",
    "encoder_out_shortcut": True,
    "decoder_in_shortcut": True,
    "decoder_conv_act_fn": "relu",
    "scaling_factor": 1.0,
}

BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
NORM_TYPES = ("rms_norm", "batch_norm")
ACTIVATIONS = {
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": lambda x: nn.gelu(x, approximate=False),  # torch nn.GELU() is the exact erf form
    "mish": lambda x: x * jnp.tanh(nn.softplus(x)),
}
NORM_EPS = 1e-5       # diffusers' RMSNorm / BatchNorm2d eps in every DC-AE norm
ATTENTION_EPS = 1e-15  # LiteMLA's normaliser eps


def sana_f32c32_config() -> dict[str, Any]:
    """`mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers` (same architecture as sana-1.0; 1.1 retrained the decoder)."""
    stages = ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3
    return {
        "in_channels": 3,
        "latent_channels": 32,
        "attention_head_dim": 32,
        "encoder_block_types": list(stages),
        "decoder_block_types": list(stages),
        "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
        "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
        "encoder_layers_per_block": [2, 2, 2, 3, 3, 3],
        "decoder_layers_per_block": [3, 3, 3, 3, 3, 3],
        "encoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
        "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
        "upsample_block_type": "interpolate",
        "downsample_block_type": "Conv",
        "decoder_norm_types": "rms_norm",
        "decoder_act_fns": "silu",
        "encoder_out_shortcut": True,
        "decoder_in_shortcut": True,
        "decoder_conv_act_fn": "relu",
        "scaling_factor": 0.41407,
    }


# --------------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class DCAEConfig:
    """A validated AutoencoderDC config: per-stage fields expanded to tuples (hashable for linen)."""
    in_channels: int
    latent_channels: int
    attention_head_dim: int
    encoder_block_types: tuple[str, ...]
    decoder_block_types: tuple[str, ...]
    encoder_block_out_channels: tuple[int, ...]
    decoder_block_out_channels: tuple[int, ...]
    encoder_layers_per_block: tuple[int, ...]
    decoder_layers_per_block: tuple[int, ...]
    encoder_qkv_multiscales: tuple[tuple[int, ...], ...]
    decoder_qkv_multiscales: tuple[tuple[int, ...], ...]
    upsample_block_type: str
    downsample_block_type: str
    decoder_norm_types: tuple[str, ...]
    decoder_act_fns: tuple[str, ...]
    encoder_out_shortcut: bool
    decoder_in_shortcut: bool
    decoder_conv_act_fn: str
    scaling_factor: float

    @property
    def stride(self) -> int:
        return 2 ** (len(self.encoder_block_out_channels) - 1)


def _per_stage(value, n: int, field: str) -> tuple:
    """diffusers accepts one string for all stages or one entry per stage."""
    if isinstance(value, str):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"DC-AE config field {field!r} has {len(value)} entries, expected one per stage ({n}).")
    return value


def _check_choice(values: Sequence[str], allowed, field: str) -> None:
    for v in values:
        if v not in allowed:
            raise ValueError(f"DC-AE config field {field!r}: {v!r} is not supported; use one of {sorted(allowed)}.")


def make_config(config: dict[str, Any] | DCAEConfig) -> DCAEConfig:
    """Validates a diffusers-style dict (missing fields take diffusers' defaults; `_`-keys are ignored)."""
    if isinstance(config, DCAEConfig):
        return config
    fields = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = sorted(set(fields) - set(DIFFUSERS_DEFAULTS))
    if unknown:
        raise ValueError(f"DC-AE config has unknown fields {unknown}; known fields: {sorted(DIFFUSERS_DEFAULTS)}.")
    c = {**DIFFUSERS_DEFAULTS, **fields}
    out = {}
    for side in ("encoder", "decoder"):
        widths = tuple(int(w) for w in c[f"{side}_block_out_channels"])
        n = len(widths)
        out[f"{side}_block_out_channels"] = widths
        out[f"{side}_layers_per_block"] = tuple(int(x) for x in _per_stage(c[f"{side}_layers_per_block"], n,
                                                                            f"{side}_layers_per_block"))
        out[f"{side}_block_types"] = _per_stage(c[f"{side}_block_types"], n, f"{side}_block_types")
        _check_choice(out[f"{side}_block_types"], BLOCK_TYPES, f"{side}_block_types")
        scales = _per_stage(c[f"{side}_qkv_multiscales"], n, f"{side}_qkv_multiscales")
        out[f"{side}_qkv_multiscales"] = tuple(tuple(int(k) for k in s) for s in scales)
    n_dec = len(out["decoder_block_out_channels"])
    if n_dec != len(out["encoder_block_out_channels"]):
        raise ValueError("DC-AE config: encoder_block_out_channels and decoder_block_out_channels need the same "
                         "number of stages (the strides must match).")
    out["decoder_norm_types"] = _per_stage(c["decoder_norm_types"], n_dec, "decoder_norm_types")
    _check_choice(out["decoder_norm_types"], NORM_TYPES, "decoder_norm_types")
    out["decoder_act_fns"] = _per_stage(c["decoder_act_fns"], n_dec, "decoder_act_fns")
    _check_choice(out["decoder_act_fns"] + (c["decoder_conv_act_fn"],), ACTIVATIONS, "decoder_act_fns")
    for k in ("in_channels", "latent_channels", "attention_head_dim"):
        out[k] = int(c[k])
    for k in ("upsample_block_type", "downsample_block_type", "decoder_conv_act_fn"):
        out[k] = str(c[k])
    out["encoder_out_shortcut"] = bool(c["encoder_out_shortcut"])
    out["decoder_in_shortcut"] = bool(c["decoder_in_shortcut"])
    out["scaling_factor"] = float(c["scaling_factor"])
    return DCAEConfig(**out)


# --------------------------------------------------------------------------------------------------
# Parameter-free rearrangements (NHWC; channel orders follow torch's NCHW ops exactly)


def pixel_unshuffle(x, r: int = 2):
    """torch F.pixel_unshuffle: output channel c*r*r + i*r + j holds pixel (h*r+i, w*r+j) of channel c."""
    return einops.rearrange(x, "b (h i) (w j) c -> b h w (c i j)", i=r, j=r)


def pixel_shuffle(x, r: int = 2):
    """torch F.pixel_shuffle, the inverse of `pixel_unshuffle`."""
    return einops.rearrange(x, "b h w (c i j) -> b (h i) (w j) c", i=r, j=r)


def channel_group_mean(x, out_channels: int):
    """Averages consecutive channel groups down to `out_channels` (torch `unflatten(1, (-1, g)).mean(2)`)."""
    return einops.reduce(x, "b h w (o g) -> b h w o", "mean", o=out_channels)


def repeat_channels(x, out_channels: int):
    """Repeats each channel in place up to `out_channels` (torch `repeat_interleave(dim=1)`)."""
    return jnp.repeat(x, out_channels // x.shape[-1], axis=-1)


def upsample_nearest(x, r: int = 2):
    return jnp.repeat(jnp.repeat(x, r, axis=1), r, axis=2)


# --------------------------------------------------------------------------------------------------
# Layers

# torch's default conv/linear init (kaiming_uniform, a=sqrt(5)) is U(+-1/sqrt(fan_in)), variance 1/(3 fan_in):
# random-init activations then have the scale of diffusers' model (used by tests and benchmarks).
_torch_like_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _named(init, names):
    return nn.with_logical_partitioning(init, tuple(names))


def depthwise_conv(x, kernel):
    """Depthwise stride-1 'same' conv as a sum of shifted products, kernel (k, k, C).

    XLA:CPU runs feature_group_count == C convolutions ~10x slower than this fused elementwise loop;
    accumulated in float32 so a bfloat16 model sums its k*k taps exactly enough.
    """
    k, (h, w) = kernel.shape[0], x.shape[1:3]
    p = k // 2
    xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (p, p), (p, p), (0, 0)))
    kernel = kernel.astype(jnp.float32)
    out = jnp.zeros(x.shape, jnp.float32)
    for i in range(k):
        for j in range(k):
            out = out + xp[:, i:i + h, j:j + w, :] * kernel[i, j]
    return out.astype(x.dtype)


class Conv2d(nn.Module):
    """torch's Conv2d (zero padding k//2 on each side), NHWC, kernel (k, k, in/groups, out) as in nn.Conv.

    `names` are the logical names of the (in, out) channel dims, distinct (linen rejects a repeated name);
    tiny dims (RGB, latent, per-group) get None or 'latent' so they never need to divide a mesh axis.
    The spatial taps are never sharded. Depthwise and pointwise convs take faster paths on XLA:CPU.
    """
    features: int
    kernel_size: int
    names: tuple
    stride: int = 1
    groups: int = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        k, cin = self.kernel_size, x.shape[-1]
        kernel = self.param("kernel", _named(_torch_like_init, (None, None) + tuple(self.names)),
                            (k, k, cin // self.groups, self.features), self.param_dtype).astype(self.dtype)
        x = x.astype(self.dtype)
        if self.groups == cin == self.features and self.stride == 1:
            y = depthwise_conv(x, kernel[:, :, 0, :])
        elif k == 1 and self.groups == 1 and self.stride == 1:
            y = jnp.dot(x, kernel[0, 0])
        else:
            pad = ((k // 2, k // 2),) * 2
            y = jax.lax.conv_general_dilated(x, kernel, (self.stride, self.stride), pad,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                             feature_group_count=self.groups)
        if self.use_bias:
            bias = self.param("bias", _named(nn.initializers.zeros, self.names[1:]), (self.features,),
                              self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def conv(features: int, kernel: int, names: tuple, *, stride: int = 1, groups: int = 1, use_bias: bool = True,
         dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, name: str | None = None) -> Conv2d:
    return Conv2d(features, kernel, tuple(names), stride, groups, use_bias, dtype, param_dtype, name=name)


def dense(features: int, names: tuple, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
          name: str | None = None) -> nn.Dense:
    """A bias-free Linear (LiteMLA's projections)."""
    return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=_named(_torch_like_init, names), name=name)


class RMSNorm(nn.Module):
    """diffusers RMSNorm over channels with scale and bias; statistics in float32."""
    axis_name: str = "channels"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", _named(nn.initializers.ones, (self.axis_name,)), (c,), self.param_dtype)
        bias = self.param("bias", _named(nn.initializers.zeros, (self.axis_name,)), (c,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + NORM_EPS)
        return (x32 * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class FrozenBatchNorm(nn.Module):
    """BatchNorm2d as used at inference: the running statistics live in the `batch_stats` collection."""
    axis_name: str = "channels"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        names = (self.axis_name,)
        scale = self.param("scale", _named(nn.initializers.ones, names), (c,), self.param_dtype)
        bias = self.param("bias", _named(nn.initializers.zeros, names), (c,), self.param_dtype)
        mean = self.variable("batch_stats", "mean", _named(nn.initializers.zeros, names), None, (c,), jnp.float32)
        var = self.variable("batch_stats", "var", _named(nn.initializers.ones, names), None, (c,), jnp.float32)
        mult = scale.astype(jnp.float32) * jax.lax.rsqrt(var.value + NORM_EPS)
        return (x.astype(jnp.float32) * mult + (bias.astype(jnp.float32) - mean.value * mult)).astype(self.dtype)


def _dt(module: nn.Module) -> dict[str, Dtype]:
    """A module's compute and parameter dtypes, passed on to its children."""
    return {"dtype": module.dtype, "param_dtype": module.param_dtype}


def norm_layer(norm_type: str, *, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Module:
    if norm_type == "rms_norm":
        return RMSNorm(dtype=dtype, param_dtype=param_dtype, name=name)
    if norm_type == "batch_norm":
        return FrozenBatchNorm(dtype=dtype, param_dtype=param_dtype, name=name)
    raise ValueError(f"norm type {norm_type!r} is not supported; use one of {NORM_TYPES}.")


# --------------------------------------------------------------------------------------------------
# Blocks


class ResBlock(nn.Module):
    norm_type: str = "rms_norm"
    act_fn: str = "silu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        h = conv(c, 3, ("channels", "mlp"), **_dt(self), name="conv1")(x)
        h = ACTIVATIONS[self.act_fn](h)
        h = conv(c, 3, ("mlp", "channels"), use_bias=False, **_dt(self), name="conv2")(h)
        return norm_layer(self.norm_type, **_dt(self), name="norm")(h) + x


class MultiscaleProjection(nn.Module):
    """Depthwise k x k conv then a per-head grouped 1x1 conv over the stacked q|k|v channels."""
    kernel_size: int
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, qkv):
        c = qkv.shape[-1]
        h = conv(c, self.kernel_size, (None, "heads"), groups=c, use_bias=False, **_dt(self),
                 name="proj_in")(qkv)
        return conv(c, 1, (None, "heads"), groups=3 * self.num_heads, use_bias=False, **_dt(self),
                    name="proj_out")(h)


def relu_linear_attention(q, k, v):
    """sum_m v_m (k_m . q_n) / (sum_m k_m . q_n + eps), O(N d^2); q, k, v: (B, N, G, d), float32."""
    kv = jnp.einsum("bmgd,bmge->bgde", k, v)
    num = jnp.einsum("bngd,bgde->bnge", q, kv)
    den = jnp.einsum("bngd,bgd->bng", q, k.sum(axis=1))
    return num / (den[..., None] + ATTENTION_EPS)


def relu_quadratic_attention(q, k, v):
    """The same map as `relu_linear_attention`, evaluated via the N x N scores (diffusers does so for N <= d)."""
    scores = jnp.einsum("bmgd,bngd->bgmn", k, q)
    scores = scores / (scores.sum(axis=2, keepdims=True) + ATTENTION_EPS)
    return jnp.einsum("bmge,bgmn->bnge", v, scores)


class LiteMLA(nn.Module):
    """Multi-scale ReLU linear attention (diffusers SanaMultiscaleLinearAttention), residual."""
    head_dim: int
    kernel_sizes: tuple[int, ...]
    norm_type: str = "rms_norm"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        heads = c // self.head_dim
        inner = heads * self.head_dim
        qkv = jnp.concatenate([dense(inner, ("channels", "heads"), **_dt(self), name=n)(x)
                               for n in ("to_q", "to_k", "to_v")], axis=-1)
        scales = [qkv] + [MultiscaleProjection(k, heads, **_dt(self), name=f"to_qkv_multiscale_{i}")(qkv)
                          for i, k in enumerate(self.kernel_sizes)]
        # Heads are consecutive runs of 3*head_dim channels of the stacked tensor (EfficientViT's layout,
        # which the checkpoints were trained with), split into q, k, v of head_dim each.
        qkv = jnp.concatenate(scales, axis=-1).astype(jnp.float32)  # normaliser divides: keep it in f32
        qkv = qkv.reshape(b, h * w, -1, 3 * self.head_dim)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        q, k = nn.relu(q), nn.relu(k)
        attend = relu_linear_attention if h * w > self.head_dim else relu_quadratic_attention
        out = attend(q, k, v).reshape(b, h, w, -1).astype(self.dtype)
        out = dense(c, ("heads", "channels"), **_dt(self), name="to_out")(out)
        return norm_layer(self.norm_type, **_dt(self), name="norm_out")(out) + x


class GLUMBConv(nn.Module):
    """Inverted 1x1 -> SiLU -> depthwise 3x3 -> gated (x * silu(gate)) -> 1x1 -> RMSNorm, residual."""
    expand_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        hidden = int(self.expand_ratio * c)
        h = conv(2 * hidden, 1, ("channels", "mlp"), **_dt(self), name="conv_inverted")(x)
        h = nn.silu(h)
        h = conv(2 * hidden, 3, (None, "mlp"), groups=2 * hidden, **_dt(self), name="conv_depth")(h)
        h, gate = jnp.split(h, 2, axis=-1)
        h = h * nn.silu(gate)
        h = conv(c, 1, ("mlp", "channels"), use_bias=False, **_dt(self), name="conv_point")(h)
        return RMSNorm(**_dt(self), name="norm")(h) + x


class EfficientViTBlock(nn.Module):
    head_dim: int
    kernel_sizes: tuple[int, ...]
    norm_type: str = "rms_norm"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = LiteMLA(self.head_dim, self.kernel_sizes, self.norm_type, **_dt(self), name="attn")(x)
        return GLUMBConv(**_dt(self), name="conv_out")(x)


class DownBlock(nn.Module):
    """Halves the resolution: stride-2 conv, or conv to out/4 channels + pixel-unshuffle."""
    out_channels: int
    pixel_unshuffle: bool
    shortcut: bool
    in_names: tuple = ("channels",)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.pixel_unshuffle:
            y = conv(self.out_channels // 4, 3, self.in_names + ("mlp",), **_dt(self), name="conv")(x)
            y = pixel_unshuffle(y)
        else:
            y = conv(self.out_channels, 3, self.in_names + ("mlp",), stride=2, **_dt(self),
                     name="conv")(x)
        if self.shortcut:
            y = y + channel_group_mean(pixel_unshuffle(x), self.out_channels)
        return y


class UpBlock(nn.Module):
    """Doubles the resolution: nearest-interpolate + conv, or conv to 4*out channels + pixel-shuffle."""
    out_channels: int
    interpolate: bool
    shortcut: bool
    out_names: tuple = ("mlp",)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        names = ("channels",) + self.out_names
        if self.interpolate:
            y = conv(self.out_channels, 3, names, **_dt(self), name="conv")(upsample_nearest(x))
        else:
            y = pixel_shuffle(conv(4 * self.out_channels, 3, names, **_dt(self), name="conv")(x))
        if self.shortcut:
            y = y + pixel_shuffle(repeat_channels(x, 4 * self.out_channels))
        return y


def make_block(block_type: str, *, head_dim: int, kernel_sizes, norm_type: str, act_fn: str, dtype, param_dtype,
               name):
    if block_type == "ResBlock":
        return ResBlock(norm_type, act_fn, dtype=dtype, param_dtype=param_dtype, name=name)
    if block_type == "EfficientViTBlock":
        return EfficientViTBlock(head_dim, tuple(kernel_sizes), norm_type, dtype=dtype, param_dtype=param_dtype,
                                 name=name)
    raise ValueError(f"block type {block_type!r} is not supported; use one of {BLOCK_TYPES}.")


# --------------------------------------------------------------------------------------------------
# Encoder / decoder


class Encoder(nn.Module):
    """Images (B, H, W, in) in [-1, 1] -> latents (B, H/s, W/s, latent), unscaled."""
    config: DCAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        widths, depths = cfg.encoder_block_out_channels, cfg.encoder_layers_per_block
        unshuffle = cfg.downsample_block_type == "pixel_unshuffle"
        x = x.astype(self.dtype)
        if depths[0] > 0:
            x = conv(widths[0], 3, (None, "mlp"), **_dt(self), name="conv_in")(x)
        else:  # an empty first stage: the stem itself goes down to the second stage's width
            x = DownBlock(widths[1], unshuffle, shortcut=False, in_names=(None,), **_dt(self),
                          name="conv_in")(x)
        for i, (width, depth) in enumerate(zip(widths, depths)):
            # The encoder always uses RMS norm and SiLU (diffusers hard-codes them).
            for j in range(depth):
                x = make_block(cfg.encoder_block_types[i], head_dim=cfg.attention_head_dim,
                               kernel_sizes=cfg.encoder_qkv_multiscales[i], norm_type="rms_norm", act_fn="silu",
                               **_dt(self), name=f"down_blocks_{i}_{j}")(x)
            if i < len(widths) - 1 and depth > 0:
                x = DownBlock(widths[i + 1], unshuffle, shortcut=True, **_dt(self),
                              name=f"down_blocks_{i}_{depth}")(x)
        y = conv(cfg.latent_channels, 3, ("channels", "latent"), **_dt(self), name="conv_out")(x)
        if cfg.encoder_out_shortcut:
            y = y + channel_group_mean(x, cfg.latent_channels)
        return y


class Decoder(nn.Module):
    """Latents (B, h, w, latent), unscaled -> images (B, h*s, w*s, in), roughly in [-1, 1]."""
    config: DCAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        widths, depths = cfg.decoder_block_out_channels, cfg.decoder_layers_per_block
        interpolate = cfg.upsample_block_type == "interpolate"
        z = z.astype(self.dtype)
        x = conv(widths[-1], 3, ("latent", "mlp"), **_dt(self), name="conv_in")(z)
        if cfg.decoder_in_shortcut:
            x = x + repeat_channels(z, widths[-1])
        for i in reversed(range(len(widths))):
            first = 0
            if i < len(widths) - 1 and depths[i] > 0:
                x = UpBlock(widths[i], interpolate, shortcut=True, **_dt(self), name=f"up_blocks_{i}_0")(x)
                first = 1
            for j in range(depths[i]):
                x = make_block(cfg.decoder_block_types[i], head_dim=cfg.attention_head_dim,
                               kernel_sizes=cfg.decoder_qkv_multiscales[i], norm_type=cfg.decoder_norm_types[i],
                               act_fn=cfg.decoder_act_fns[i], **_dt(self), name=f"up_blocks_{i}_{first + j}")(x)
        x = RMSNorm(**_dt(self), name="norm_out")(x)
        x = ACTIVATIONS[cfg.decoder_conv_act_fn](x)
        if depths[0] > 0:
            x = conv(cfg.in_channels, 3, ("channels", None), **_dt(self), name="conv_out")(x)
        else:
            x = UpBlock(cfg.in_channels, interpolate, shortcut=False, out_names=(None,), **_dt(self),
                        name="conv_out")(x)
        return x


class DCAE(nn.Module):
    """Encoder and decoder under `encoder` / `decoder`; `__call__` (a round trip) initialises both."""
    config: DCAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.encoder = Encoder(self.config, **_dt(self))
        self.decoder = Decoder(self.config, **_dt(self))

    def encode(self, images):
        return self.encoder(images)

    def decode(self, latents):
        return self.decoder(latents)

    def __call__(self, images):
        return self.decoder(self.encoder(images))


# --------------------------------------------------------------------------------------------------
# The shared autoencoder interface


class DCAutoencoder:
    """Frozen DC-AE behind the autoencoder interface shared with `pixels.PixelAutoencoder`.

    `params` below is the variables dict (`{"params": ..., "batch_stats": ...}`; the latter only for
    batch-norm configs) from `init_params` or `v2flow_jax.convert.dc_ae.load_params`. encode/decode are
    pure; wrap them in `jax.jit`. Latents come out unscaled: multiply by `scale` before use.
    `dtype` is the compute dtype (bfloat16 works: norms and attention stay in float32); `param_dtype`
    bfloat16 halves the frozen weights' memory (the converter casts to it).
    """

    def __init__(self, config: dict[str, Any] | DCAEConfig, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32):
        self.config = make_config(config)
        self.dtype, self.param_dtype = dtype, param_dtype
        self.module = DCAE(self.config, dtype=dtype, param_dtype=param_dtype)
        self.stride = self.config.stride
        self.channels = self.config.latent_channels
        self.scale = self.config.scaling_factor

    def encode(self, params, images):
        """images (B, H, W, C) in [-1, 1], H and W multiples of `stride` -> latents (B, H/s, W/s, channels)."""
        return self.module.apply(params, images, method=DCAE.encode)

    def decode(self, params, latents):
        """latents (B, h, w, channels), unscaled -> images (B, h*s, w*s, C) in the compute dtype."""
        return self.module.apply(params, latents, method=DCAE.decode)

    def init_boxed(self, rng):
        """Random variables with their LogicallyPartitioned boxes (for `sharding.sharded_init`)."""
        images = jnp.zeros((1, self.stride, self.stride, self.config.in_channels), jnp.float32)
        return self.module.init(rng, images)

    def init_params(self, rng):
        """Random variables (torch-like init); real weights come from `convert.dc_ae`."""
        return nn.unbox(self.init_boxed(rng))
