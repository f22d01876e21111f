"""GGUF (llama.cpp) LLaMA files -> the parameters of `v2flow_jax.lm.llama.Llama`, and their embedding table.

Read with the `gguf` package (the format's reference Python reader, from llama.cpp): the
hyper-parameters come from the `llama.*` metadata, every tensor is dequantised on the host with
`gguf.quants.dequantize` (SUPPORTED_TYPES; any other type is refused naming the tensor), mapped onto
the HF tensor table of `hf_llama.py` and placed in its sharding one tensor at a time.

Two differences from a Hugging Face checkpoint:
  - llama.cpp's converter permutes the rows of attn_q / attn_k within each head so that ggml's RoPE
    rotates adjacent pairs (2i, 2i+1); HF's (and our) RoPE rotates (i, i + head_dim/2). The reader
    undoes it (`unpermute_rope_rows`).
  - No `output.weight` means the head is tied to `token_embd.weight`.
Shapes: GGUF lists dimensions innermost first (ne0, ne1); the arrays `gguf` returns are row-major
(ne1, ne0), i.e. torch's (out, in) layout, which is what the HF table expects.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from v2flow_jax import sharding as shd
from v2flow_jax.convert import hf_checkpoint, hf_embeddings
from v2flow_jax.convert.hf_llama import TensorMapping, assemble_params, hf_tensors
from v2flow_jax.lm.llama import LlamaConfig

ARCHITECTURE = "llama"
EMBEDDING_TENSOR = "token_embd.weight"

# HF tensor name -> GGUF tensor name (llama.cpp's gguf-py tensor_mapping, for the LLaMA architecture).
GGUF_NAMES = {
    "model.embed_tokens.weight": EMBEDDING_TENSOR,
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{layer}.input_layernorm.weight": "blk.{layer}.attn_norm.weight",
    "model.layers.{layer}.self_attn.q_proj.weight": "blk.{layer}.attn_q.weight",
    "model.layers.{layer}.self_attn.k_proj.weight": "blk.{layer}.attn_k.weight",
    "model.layers.{layer}.self_attn.v_proj.weight": "blk.{layer}.attn_v.weight",
    "model.layers.{layer}.self_attn.o_proj.weight": "blk.{layer}.attn_output.weight",
    "model.layers.{layer}.post_attention_layernorm.weight": "blk.{layer}.ffn_norm.weight",
    "model.layers.{layer}.mlp.gate_proj.weight": "blk.{layer}.ffn_gate.weight",
    "model.layers.{layer}.mlp.up_proj.weight": "blk.{layer}.ffn_up.weight",
    "model.layers.{layer}.mlp.down_proj.weight": "blk.{layer}.ffn_down.weight",
}


class GGUFError(ValueError):
    """The GGUF file is not a LLaMA this reader can load (names the file and the tensor or key)."""


def _types():
    from gguf import GGMLQuantizationType as T
    return T


def supported_types() -> tuple:
    """The tensor types read: floats, the legacy block quants and the K-quants (all dequantised by gguf)."""
    T = _types()
    return (T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
            T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)


# ----------------------------------------------------------------------------------------------
# File and metadata


def open_gguf(path):
    """A gguf.GGUFReader (memory-mapped: tensors are read when dequantised), shared while the file is unchanged."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist.")
    stat = os.stat(path)
    return _read_header(path, stat.st_ino, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _read_header(path: str, inode: int, mtime_ns: int, size: int):
    # Parsing the metadata is slow (SmolLM2's 49152 tokens and merges: ~3 s) and a run asks several times
    # (check, load, the evaluation's words); the file's identity in the key makes a rewritten file parse afresh.
    import gguf

    try:
        return gguf.GGUFReader(path)
    except ValueError as e:
        raise GGUFError(f"{path!r} is not a readable GGUF file: {e}") from e


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _tensors(reader) -> dict:
    return {t.name: t for t in reader.tensors}


def gguf_llama_config(path, reader=None, **overrides) -> LlamaConfig:
    """The LlamaConfig from a GGUF file's metadata; overrides set dtype, scan_layers, ...

    Raises GGUFError naming the file and the key for an architecture or RoPE variant not computed here.
    """
    path = os.fspath(path)
    reader = reader or open_gguf(path)
    arch = _field(reader, "general.architecture")
    if arch != ARCHITECTURE:
        raise GGUFError(f"{path!r}: unsupported architecture general.architecture={arch!r}; this reader loads "
                        f"{ARCHITECTURE!r} (LLaMA-2/3, SmolLM, TinyLlama, ...).")

    def key(name, default=None, required=False):
        value = _field(reader, f"{arch}.{name}", default)
        if required and value is None:
            raise GGUFError(f"{path!r} has no metadata key {arch}.{name!r}, which a LLaMA GGUF must give.")
        return value

    def refuse(what):
        raise GGUFError(f"{path!r}: unsupported architecture: {what}.")

    if (key("expert_count") or 0) > 0:
        refuse(f"{arch}.expert_count={key('expert_count')} (mixture of experts)")
    scaling = key("rope.scaling.type")
    if scaling not in (None, "none"):
        refuse(f"{arch}.rope.scaling.type={scaling!r} (only unscaled RoPE is read from GGUF)")
    tensors = _tensors(reader)
    if "rope_freqs.weight" in tensors:
        refuse("tensor 'rope_freqs.weight' (LLaMA-3.1 per-frequency RoPE factors); load the Hugging Face "
               "checkpoint instead, whose rope_scaling 'llama3' is supported")
    if EMBEDDING_TENSOR not in tensors:
        raise GGUFError(f"tensor {EMBEDDING_TENSOR!r} is missing from {path!r}.")

    hidden = int(key("embedding_length", required=True))
    heads = int(key("attention.head_count", required=True))
    head_dim = int(key("attention.key_length") or key("rope.dimension_count") or hidden // heads)
    for name in ("attention.value_length", "rope.dimension_count"):
        if key(name) is not None and int(key(name)) != head_dim:
            refuse(f"{arch}.{name}={key(name)} differs from the head size {head_dim} (partial RoPE or "
                   "unequal key/value heads)")
    vocab = int(tensors[EMBEDDING_TENSOR].shape[1])   # ne1 = rows; llama.vocab_size is optional
    if key("vocab_size") is not None and int(key("vocab_size")) != vocab:
        raise GGUFError(f"{path!r}: {arch}.vocab_size={key('vocab_size')} but tensor {EMBEDDING_TENSOR!r} has "
                        f"{vocab} rows.")
    fields = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length", required=True)),
        num_layers=int(key("block_count", required=True)),
        num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensors,
        max_position_embeddings=int(key("context_length", 2048)),
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


# ----------------------------------------------------------------------------------------------
# Tensors


def _check_type(path, tensor):
    if tensor.tensor_type not in supported_types():
        names = ", ".join(t.name for t in supported_types())
        raise GGUFError(f"tensor {tensor.name!r} in {path!r} has type {tensor.tensor_type.name}, which this reader "
                        f"does not dequantise; supported: {names}. Re-quantise the model (llama-quantize) to one "
                        "of these.")


def torch_shape(tensor) -> tuple[int, ...]:
    """A GGUF tensor's shape in row-major (torch) order: (ne1, ne0)."""
    return tuple(int(n) for n in reversed(tensor.shape))


def dequantize(path, tensor, rows: slice | None = None) -> np.ndarray:
    """float32 array of a GGUF tensor in torch layout, or of its `rows` only (blocks run along rows)."""
    from gguf.quants import dequantize as gguf_dequantize

    _check_type(path, tensor)
    shape = torch_shape(tensor)
    data = tensor.data
    if rows is not None:
        data, shape = data[rows], (len(range(*rows.indices(shape[0]))), *shape[1:])
    return np.asarray(gguf_dequantize(data, tensor.tensor_type), np.float32).reshape(shape)


def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation (HF's `rotate_half` layout <- ggml's adjacent pairs).

    Within each head llama.cpp stores row 2i + s at what HF has as row s * head_dim/2 + i.
    """
    head_dim = w.shape[0] // num_heads
    return w.reshape(num_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_heads(config: LlamaConfig, hf_name: str) -> int | None:
    if hf_name.endswith("q_proj.weight"):
        return config.num_heads
    if hf_name.endswith("k_proj.weight"):
        return config.num_kv_heads
    return None


def _check_tensors(path, tensors: dict, config: LlamaConfig):
    """Every tensor present, of the right shape and a supported type; nothing else in the file."""
    wanted = {}
    for m, layer in hf_tensors(config):
        name = GGUF_NAMES[m.hf_name].format(layer=layer)
        wanted[name] = m
        if name not in tensors:
            raise GGUFError(f"tensor {name!r} is missing from {path!r}: a LLaMA with this file's metadata needs "
                            f"it, shape {m.hf_shape} (row-major).")
        tensor = tensors[name]
        if torch_shape(tensor) != m.hf_shape:
            raise GGUFError(f"tensor {name!r} in {path!r} has shape {torch_shape(tensor)} (row-major), but the "
                            f"file's metadata implies {m.hf_shape}.")
        _check_type(path, tensor)
    unexpected = sorted(set(tensors) - set(wanted))
    if unexpected:
        raise GGUFError(f"{path!r} holds tensors a LLaMA does not have: {unexpected[:6]}"
                        f"{' ...' if len(unexpected) > 6 else ''}.")


def load_gguf_llama(path, *, mesh=None, rules=shd.DEFAULT_RULES, **config_overrides):
    """(params, config) from a llama.cpp GGUF file, dequantised to the parameter dtype (float32).

    Args as hf_llama.load_hf_llama. Raises GGUFError naming the file and the tensor on a missing
    tensor, a wrong shape, an unsupported tensor type or an unsupported architecture.
    """
    path = os.fspath(path)
    reader = open_gguf(path)
    config = gguf_llama_config(path, reader, **config_overrides)
    tensors = _tensors(reader)
    _check_tensors(path, tensors, config)

    def read(m: TensorMapping, layer) -> np.ndarray:
        w = dequantize(path, tensors[GGUF_NAMES[m.hf_name].format(layer=layer)])
        heads = _rope_heads(config, m.hf_name)
        return unpermute_rope_rows(w, heads) if heads else w
    return assemble_params(config, read, mesh=mesh, rules=rules), config


# ----------------------------------------------------------------------------------------------
# The embedding table alone (the tokenizer's vocabulary rows)


def _embedding_tensor(path: str, num_tokens: int | None, first_row: int):
    """(token_embd.weight, the (rows, width) asked of it), checked from the header alone (nothing dequantised)."""
    tensors = _tensors(open_gguf(path))
    if EMBEDDING_TENSOR not in tensors:
        raise GGUFError(f"tensor {EMBEDDING_TENSOR!r} is missing from {path!r}; it holds "
                        f"{sorted(tensors)[:6]} ...: is this an LLM's GGUF?")
    tensor = tensors[EMBEDDING_TENSOR]
    if len(tensor.shape) != 2:
        raise GGUFError(f"tensor {EMBEDDING_TENSOR!r} in {path!r} has shape {torch_shape(tensor)}; an embedding "
                        "table is 2-D (vocab_size, hidden_size).")
    _check_type(path, tensor)
    vocab_size, width = torch_shape(tensor)
    rows = hf_embeddings.check_rows(vocab_size, num_tokens, first_row, f"{path}:{EMBEDDING_TENSOR}", GGUFError)
    return tensor, (rows, width)


def check_gguf_embedding_table(path, *, num_tokens: int | None = None, first_row: int = 0) -> tuple[int, int]:
    """The (rows, width) `load_gguf_embedding_table` would return, from the file's header alone; raises
    GGUFError as it would (as hf_embeddings.check_embedding_table for a HF directory)."""
    return _embedding_tensor(os.fspath(path), num_tokens, first_row)[1]


def load_gguf_embedding_table(path, *, sharding=None, dtype=jnp.float32, num_tokens: int | None = None,
                              first_row: int = 0) -> jax.Array:
    """token_embd.weight rows [first_row, first_row + (num_tokens or vocab_size)) as a jax.Array, dequantised.

    As hf_embeddings.load_embedding_table: with a `sharding` each device's block is dequantised on
    its own (quant blocks run along a row, so a row range is read alone); dtype None keeps float32.
    """
    path = os.fspath(path)
    tensor, shape = _embedding_tensor(path, num_tokens, first_row)
    out_dtype = np.dtype(dtype if dtype is not None else np.float32)

    def read_block(index):
        block_rows, cols = hf_checkpoint.full_index(index, shape)
        table = dequantize(path, tensor, slice(block_rows.start + first_row, block_rows.stop + first_row))
        return table[:, cols].astype(out_dtype, copy=False)

    return hf_embeddings.place_table(shape, read_block, sharding, path)


def load_gguf_vocabulary_words(path) -> list[str] | None:
    """The tokenizer's token strings by row (tokenizer.ggml.tokens), None if the file has none."""
    tokens = _field(open_gguf(path), "tokenizer.ggml.tokens")
    return list(tokens) if tokens is not None else None
