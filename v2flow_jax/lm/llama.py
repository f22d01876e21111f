"""LLaMA decoder (LLaMA-2, LLaMA-3, SmolLM2 and kin) in Flax linen, with a fixed-shape KV cache.

The network as Hugging Face transformers' `LlamaForCausalLM` computes it: token embedding ->
N x [RMSNorm -> grouped-query attention with rotary positions -> residual, RMSNorm -> SwiGLU MLP ->
residual] -> RMSNorm -> output head (its own matrix, or the embedding table when tied).

Parameter names follow HF's module paths (`self_attn.q_proj`, `mlp.gate_proj`, ...) so the
converters in `v2flow_jax/convert/` are a table. Kernels are (in, out) with heads split out, e.g.
q_proj (embed, heads, head_dim), so heads shard over the 'tensor' mesh axis and widths over 'fsdp'.
With `scan_layers` the layers are one `nn.scan` over parameters stacked on a leading 'layers' axis
(one compiled layer however deep the model), rematerialised with `remat_policy` when training.

Precision: parameters in `param_dtype` (float32); matmul inputs in `dtype` (bfloat16 by default)
with float32 accumulation; RMSNorm, RoPE angles, softmax and the residual stream in float32.

Decoding: `init_cache` gives zeros for the "cache" collection, fixed length; `prefill` runs a
right-padded batch of prompts, `decode_step` one token per row, each at its row's own position.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from v2flow_jax import sharding as shd
from v2flow_jax.models.layers import MASKED_LOGIT, accumulating_dot, named

Dtype = Any

weight_init = nn.initializers.normal(0.02)   # HF's initializer_range default; loaded weights replace it

# config.remat_policy -> the jax.checkpoint policy of each layer ("none": no rematerialisation).
REMAT_POLICIES = {
    "full": None,                     # save nothing: recompute the whole layer in the backward pass
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's architecture is not the LLaMA this module implements."""


# ----------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """LLaMA-3.1's "llama3" RoPE scaling: low frequencies slowed by `factor`, a smooth ramp between."""
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None          # None: hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | Mapping | None = None   # a mapping is converted to RopeScaling
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    dtype: Dtype = jnp.bfloat16          # matmul inputs
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"           # "none" or a key of REMAT_POLICIES

    def __post_init__(self):
        # Frozen (hashable, usable as a static jit argument): normalise through object.__setattr__.
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", _rope_scaling_from_dict(self.rope_scaling))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}.")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (RoPE rotates pairs of dimensions).")
        if self.remat_policy != "none" and self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}: use 'none' or one of {sorted(REMAT_POLICIES)}.")

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, hf: Mapping, **overrides) -> "LlamaConfig":
        """From a Hugging Face `config.json` dict (transformers 4 or 5 spelling of the RoPE fields).

        `overrides` set the fields HF does not have (dtype, scan_layers, remat_policy, ...).
        Raises UnsupportedArchitectureError naming the field for anything this model does not compute.
        """
        _check_hf_architecture(hf)
        theta, scaling = _rope_from_hf(hf)
        heads = _required(hf, "num_attention_heads")
        fields = dict(
            vocab_size=_required(hf, "vocab_size"),
            hidden_size=_required(hf, "hidden_size"),
            intermediate_size=_required(hf, "intermediate_size"),
            num_layers=_required(hf, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=hf.get("head_dim") or None,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf_dict(self) -> dict:
        """The `config.json` fields transformers' LlamaConfig reads (transformers 5 spelling)."""
        rope = {"rope_type": "default", "rope_theta": float(self.rope_theta)}
        if self.rope_scaling is not None:
            rope.update(rope_type="llama3", **dataclasses.asdict(self.rope_scaling))
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "rope_theta": float(self.rope_theta),   # transformers 4 reads these two
            "rope_scaling": None if self.rope_scaling is None else dict(rope),
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
        }


def _required(hf: Mapping, key: str) -> int:
    if key not in hf:
        raise UnsupportedArchitectureError(f"the config has no {key!r}, which a LLaMA config must give.")
    return int(hf[key])


def _check_hf_architecture(hf: Mapping):
    def refuse(field, value, expected):
        raise UnsupportedArchitectureError(
            f"unsupported architecture: {field}={value!r}; this LLaMA implementation needs {expected}.")

    if hf.get("model_type") != "llama":
        refuse("model_type", hf.get("model_type"), "model_type='llama'")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        refuse("hidden_act", hf.get("hidden_act"), "hidden_act='silu' (SwiGLU)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag, False):
            refuse(flag, hf[flag], f"{flag}=false (no biases)")


def _rope_from_hf(hf: Mapping) -> tuple[float, RopeScaling | None]:
    # transformers 5 writes rope_parameters (with rope_theta inside); 4 wrote rope_theta + rope_scaling.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedArchitectureError(
            f"unsupported architecture: {field}.partial_rotary_factor={params['partial_rotary_factor']}; "
            "RoPE here rotates the whole head.")
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        return theta, _rope_scaling_from_dict(params)
    raise UnsupportedArchitectureError(
        f"unsupported architecture: {field}.rope_type={rope_type!r}; supported: 'default', 'llama3'.")


def _rope_scaling_from_dict(d: Mapping) -> RopeScaling:
    rope_type = d.get("rope_type", d.get("type", "llama3"))
    if rope_type != "llama3":
        raise UnsupportedArchitectureError(f"rope_scaling type {rope_type!r} is not supported; only 'llama3'.")
    try:
        return RopeScaling(float(d["factor"]), float(d["low_freq_factor"]), float(d["high_freq_factor"]),
                           int(d["original_max_position_embeddings"]))
    except KeyError as e:
        raise UnsupportedArchitectureError(f"rope_scaling 'llama3' lacks {e.args[0]!r}.") from e


# ----------------------------------------------------------------------------------------------
# Rotary position embedding


def rope_inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """(head_dim // 2,) float32 inverse frequencies, with LLaMA-3 scaling when configured.

    Computed in float32 like the reference, so a frequency on a band edge falls on the same side.
    """
    dim = config.head_dim
    inv_freq = 1.0 / (np.float32(config.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    s = config.rope_scaling
    if s is None:
        return inv_freq.astype(np.float32)
    wavelength = 2 * np.pi / inv_freq
    low_freq_wavelength = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelength = s.original_max_position_embeddings / s.high_freq_factor
    # Long wavelengths (beyond the original context) are slowed by `factor`, short ones kept, and the
    # band between interpolates linearly in original_context / wavelength.
    scaled = np.where(wavelength > low_freq_wavelength, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelength - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    ramp = (1 - smooth) * scaled / s.factor + smooth * scaled
    middle = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
    return np.where(middle, ramp, scaled).astype(np.float32)


def apply_rope(x, positions, inv_freq):
    """Rotates x (B, T, heads, head_dim) by positions (B, T), HF's "rotate_half" layout.

    Dimension i pairs with i + head_dim/2. llama.cpp pairs neighbours (2i, 2i+1) instead; its GGUF
    files store q/k rows permuted to match, which gguf_llama.py undoes.
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)    # (B, T, head_dim/2)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    x = x.astype(jnp.float32)
    first, second = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return x * jnp.cos(angles) + rotated * jnp.sin(angles)


# ----------------------------------------------------------------------------------------------
# Layers


class Projection(nn.Module):
    """A bias-free linear map contracting the last `in_dims` axes: kernel (*in, *features).

    Not nn.DenseGeneral: that initialises a multi-axis kernel flat and reshapes it, so under a mesh
    its 2-D value meets the 3-D logical names (embed, heads, head_dim) and the constraint fails.
    """
    features: tuple[int, ...]
    names: tuple[str, ...]
    in_dims: int = 1
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel_shape = (*x.shape[x.ndim - self.in_dims:], *self.features)
        kernel = self.param("kernel", named(weight_init, self.names), kernel_shape, self.param_dtype)
        contract = (tuple(range(x.ndim - self.in_dims, x.ndim)), tuple(range(self.in_dims)))
        dot = accumulating_dot(self.dtype) or jax.lax.dot_general
        return dot(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))


def _dense(config: LlamaConfig, features, names, *, in_dims=1, name=None) -> Projection:
    features = tuple(features) if isinstance(features, (tuple, list)) else (features,)
    return Projection(features, tuple(names), in_dims, config.dtype, config.param_dtype, name=name)


class RMSNorm(nn.Module):
    eps: float
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", named(nn.initializers.ones, ("embed",)), (x.shape[-1],), self.param_dtype)
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return x * scale.astype(jnp.float32)


def grouped_query_attention(q, k, v, query_positions, key_positions, dtype):
    """Causal attention by position: query (b, t) sees key (b, s) iff key_positions[b, s] <= query_positions[b, t].

    q (B, T, H, hd); k, v (B, S, KV, hd) with H a multiple of KV: query head h reads kv head h // (H / KV).
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = (q * (1.0 / math.sqrt(d))).reshape(b, t, kv, h // kv, d).astype(dtype)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(dtype), preferred_element_type=jnp.float32)
    visible = key_positions[:, None, :] <= query_positions[:, :, None]                 # (B, T, S)
    logits = jnp.where(visible[:, None, None], logits, MASKED_LOGIT)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", weights.astype(dtype), v.astype(dtype), preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d)


def _write_rows(cache, new, positions):
    """cache (B, L, ...) with new (B, T, ...) written at slots positions (B, T), one scatter per row.

    Slots past the cache length are dropped (JAX scatter semantics): callers keep positions < L.
    """
    return jax.vmap(lambda c, n, p: c.at[p].set(n))(cache, new.astype(cache.dtype), positions)


class LlamaAttention(nn.Module):
    config: LlamaConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x, positions):
        cfg = self.config
        q = _dense(cfg, (cfg.num_heads, cfg.head_dim), ("embed", "heads", "head_dim"), name="q_proj")(x)
        k = _dense(cfg, (cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"), name="k_proj")(x)
        v = _dense(cfg, (cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"), name="v_proj")(x)
        inv_freq = rope_inverse_frequencies(cfg)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        key_positions = positions
        if self.decode:
            k, v, key_positions = self._through_cache(k, v, positions)
        out = grouped_query_attention(q, k, v, positions, key_positions, cfg.dtype)
        out = nn.with_logical_constraint(out, ("batch", "seq", "heads", "head_dim"))
        return _dense(cfg, cfg.hidden_size, ("heads", "head_dim", "embed"), in_dims=2, name="o_proj")(out)

    def _through_cache(self, k, v, positions):
        """Writes this chunk's keys/values at their positions; attention then reads the whole cache.

        Slot = position, so the causal test on positions also hides slots not yet written (or holding
        the padding of a right-padded prompt): they all sit at positions after the query.
        """
        if not self.has_variable("cache", "key"):
            raise ValueError("decode=True needs the KV cache: pass init_cache(config, batch_size, cache_len) as "
                             "the 'cache' collection and apply with mutable=['cache'].")
        cached_key = self.variable("cache", "key", lambda: None)
        cached_value = self.variable("cache", "value", lambda: None)
        cached_key.value = _write_rows(cached_key.value, k, positions)
        cached_value.value = _write_rows(cached_value.value, v, positions)
        b, cache_len = cached_key.value.shape[:2]
        slots = jnp.broadcast_to(jnp.arange(cache_len, dtype=positions.dtype), (b, cache_len))
        return cached_key.value, cached_value.value, slots


class LlamaMLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate = _dense(cfg, cfg.intermediate_size, ("embed", "mlp"), name="gate_proj")(x)
        up = _dense(cfg, cfg.intermediate_size, ("embed", "mlp"), name="up_proj")(x)
        h = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "seq", "mlp"))
        return _dense(cfg, cfg.hidden_size, ("mlp", "embed"), name="down_proj")(h)


class LlamaBlock(nn.Module):
    """Pre-norm decoder layer; returns (x, None) so that it is also an `nn.scan` body."""
    config: LlamaConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x, positions):
        cfg = self.config
        h = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="input_layernorm")(x)
        x = x + LlamaAttention(cfg, self.decode, name="self_attn")(h, positions)
        h = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="post_attention_layernorm")(x)
        x = x + LlamaMLP(cfg, name="mlp")(h)
        return nn.with_logical_constraint(x, ("batch", "seq", "embed")), None


class Llama(nn.Module):
    """tokens (B, T) int, positions (B, T) (default 0..T-1) -> float32 logits (B, T, vocab_size).

    With `decode=True` the "cache" collection (from `init_cache`) must be passed and mutable: the
    chunk's keys and values are written at cache slots `positions` and attention reads the cache.
    """
    config: LlamaConfig

    @nn.compact
    def __call__(self, tokens, positions=None, *, decode: bool = False):
        cfg = self.config
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=cfg.param_dtype,
                         embedding_init=named(weight_init, ("vocab", "embed")), name="embed_tokens")
        # The lookup reads the table whole along its width (FSDP's all-gather): a gather from a table
        # split over fsdp cannot hand rows to a batch split over fsdp without replicating them.
        table = nn.with_logical_constraint(embed.embedding, ("vocab", None))
        x = jnp.take(table, tokens, axis=0).astype(jnp.float32)
        x = nn.with_logical_constraint(x, ("batch", "seq", "embed"))

        block = LlamaBlock
        if cfg.remat_policy != "none" and not decode:   # decoding computes no gradients
            # prevent_cse=False inside scan, as jax.checkpoint advises: scan already stops the CSE.
            block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            stack = nn.scan(block, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True},
                            in_axes=(nn.broadcast,), length=cfg.num_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = stack(cfg, decode, name="layers")(x, positions)
        else:
            for i in range(cfg.num_layers):
                x, _ = block(cfg, decode, name=f"layers_{i}")(x, positions)

        x = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="norm")(x)
        if cfg.tie_word_embeddings:
            logits = jnp.einsum("btd,vd->btv", x.astype(cfg.dtype), embed.embedding.astype(cfg.dtype),
                                preferred_element_type=jnp.float32)
        else:
            logits = _dense(cfg, cfg.vocab_size, ("embed", "vocab"), name="lm_head")(x)
        return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "seq", "vocab"))


# ----------------------------------------------------------------------------------------------
# Parameters and their shardings


def abstract_params(config: LlamaConfig):
    """The parameter tree as ShapeDtypeStructs inside their LogicallyPartitioned boxes (nothing allocated)."""
    model = Llama(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]


def fit_sharding(sharding: NamedSharding, shape) -> NamedSharding:
    """`sharding` without the mesh axes that do not divide their dimension (those dimensions replicate).

    Real models do not always divide the mesh (SmolLM2-135M has 3 kv heads, 9 heads); jax refuses
    uneven shards, so such a dimension is kept whole rather than failing the load.
    """
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    fitted = []
    for size, axes in zip(shape, spec):
        names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        fitted.append(axes if size % math.prod(sharding.mesh.shape[a] for a in names) == 0 else None)
    return NamedSharding(sharding.mesh, P(*fitted))


def strip_boxes(tree):
    """The values inside LogicallyPartitioned boxes. Unlike nn.unbox it adds no sharding constraint:
    that constraint would be the unfitted one (see fit_sharding), and on abstract values it fails."""
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
    return jax.tree.map(lambda x: x.value if is_box(x) else x, tree, is_leaf=is_box)


def _fitted_shardings(boxed_abstract, mesh, rules):
    shardings = shd.logical_shardings(boxed_abstract, mesh, rules)
    return jax.tree.map(lambda s, a: fit_sharding(s, a.shape), shardings, strip_boxes(boxed_abstract))


def param_shardings(config: LlamaConfig, mesh, rules=shd.DEFAULT_RULES):
    """NamedSharding per parameter (a plain tree like the params) from the logical names and the rules."""
    return _fitted_shardings(abstract_params(config), mesh, rules)


def stack_layers(params, num_layers: int):
    """Unrolled params (layers_0 ... layers_{n-1}) -> the scanned layout (one 'layers' tree, stacked)."""
    layers = [params[f"layers_{i}"] for i in range(num_layers)]
    rest = {k: v for k, v in params.items() if not k.startswith("layers_")}
    return {**rest, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def unstack_layers(params, num_layers: int):
    """The scanned layout -> unrolled params (layers_0 ... layers_{n-1})."""
    rest = {k: v for k, v in params.items() if k != "layers"}
    return {**rest, **{f"layers_{i}": jax.tree.map(lambda x: x[i], params["layers"]) for i in range(num_layers)}}


def init_params(config: LlamaConfig, rng, mesh=None, rules=shd.DEFAULT_RULES):
    """Random parameters (unboxed), each created directly in its sharding when a mesh is given."""
    model = Llama(config)

    def init(key):
        return strip_boxes(model.init(key, jnp.zeros((1, 1), jnp.int32)))["params"]
    if mesh is None:
        return jax.jit(init)(rng)
    shardings = param_shardings(config, mesh, rules)
    with shd.use_mesh(mesh, rules):
        return jax.jit(init, out_shardings=shardings)(rng)


# ----------------------------------------------------------------------------------------------
# KV cache and decoding steps


def _cache_layout(config: LlamaConfig, batch_size: int, cache_len: int):
    """{path: (shape, logical names)} of the "cache" collection, matching the module's variables."""
    shape = (batch_size, cache_len, config.num_kv_heads, config.head_dim)
    names = ("batch", "seq", "kv_heads", "head_dim")
    if config.scan_layers:
        return {("layers", "self_attn", kind): ((config.num_layers, *shape), ("layers", *names))
                for kind in ("key", "value")}
    return {(f"layers_{i}", "self_attn", kind): (shape, names)
            for i in range(config.num_layers) for kind in ("key", "value")}


def _nest(flat: dict) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def init_cache(config: LlamaConfig, batch_size: int, cache_len: int, dtype=None, mesh=None,
               rules=shd.DEFAULT_RULES):
    """Zero keys and values for `cache_len` positions per row (the "cache" collection).

    dtype: defaults to the compute dtype. With a mesh, rows shard over the data axes and kv heads
    over 'tensor' (where they divide).
    """
    dtype = dtype or config.dtype
    layout = _cache_layout(config, batch_size, cache_len)
    if mesh is None:
        return _nest({path: jnp.zeros(shape, dtype) for path, (shape, _) in layout.items()})
    rules = shd.rules_for_mesh(rules, mesh)
    shardings = {path: fit_sharding(nn.logical_to_mesh_sharding(P(*names), mesh, rules), shape)
                 for path, (shape, names) in layout.items()}
    make = jax.jit(lambda: {path: jnp.zeros(shape, dtype) for path, (shape, _) in layout.items()},
                   out_shardings=shardings)
    return _nest(make())


def prefill(model: Llama, params, cache, tokens, lengths):
    """Runs a right-padded batch of prompts (B, T) through the model, filling cache slots [0, T).

    Right padding keeps slot = position = index in the prompt, so a prompt runs exactly as it would
    alone, and the padding slots [length, T) are overwritten by the first generated tokens instead of
    costing cache room or a separate padding mask (the causal test on positions hides them). Returns
    the logits after each prompt's last real token (B, vocab) and the cache; the next token of row b
    goes to position lengths[b].
    """
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, mutated = model.apply({"params": params, "cache": cache}, tokens, positions, decode=True,
                                  mutable=["cache"])
    last = jnp.take_along_axis(logits, (jnp.asarray(lengths) - 1)[:, None, None].astype(jnp.int32), axis=1)
    return last[:, 0], mutated["cache"]


def decode_step(model: Llama, params, cache, tokens, positions):
    """One token per row, tokens (B,) at positions (B,) (each row's length so far) -> logits (B, vocab), cache."""
    logits, mutated = model.apply({"params": params, "cache": cache}, tokens[:, None],
                                  jnp.asarray(positions, jnp.int32)[:, None], decode=True, mutable=["cache"])
    return logits[:, 0], mutated["cache"]
