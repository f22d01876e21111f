"""The Flax LLaMA against transformers' LlamaForCausalLM: logits, cached decoding, HF load/export, mesh, errors.

The oracle checkpoints are tiny random LlamaForCausalLM models written by transformers itself
(`save_pretrained`, sharded layout), with weights redrawn larger than HF's 0.02 init and random
norm scales, so every tensor moves the logits well past the tolerance if it is misplaced.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from v2flow_jax import sharding  # noqa: E402
from v2flow_jax.convert import hf_checkpoint, hf_llama  # noqa: E402
from v2flow_jax.lm import llama  # noqa: E402

VOCAB, WIDTH = 128, 64
TOL = 1e-4
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32)
SEQ = 48   # > original_max_position_embeddings: the scaled positions are exercised


def _random_llama(seed, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
    kwargs.update(overrides)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()
    with torch.no_grad():
        for p in model.parameters():   # norms around 1, matrices O(0.1): every tensor matters
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if p.ndim == 1 else 0.1 * torch.randn_like(p))
    return model


def _hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def _our_logits(params, config, tokens) -> np.ndarray:
    return np.asarray(jax.jit(llama.Llama(config).apply)({"params": params}, jnp.asarray(tokens, jnp.int32)))


def _tokens(batch, length, seed=0):
    return np.random.RandomState(seed).randint(0, VOCAB, (batch, length)).astype(np.int32)


def _max_diff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """LLaMA-2 style (default RoPE, tied head, kv=1) and LLaMA-3 style (llama3 RoPE, untied, kv=2)."""
    root = tmp_path_factory.mktemp("hf_llama")
    models = {
        "llama2": _random_llama(0, num_key_value_heads=1, tie_word_embeddings=True),
        "llama3": _random_llama(1, rope_scaling=dict(LLAMA3_ROPE), rope_theta=10000.0, tie_word_embeddings=False),
    }
    for name, model in models.items():
        model.generation_config.eos_token_id = None   # greedy references run the full length
        model.save_pretrained(root / name, max_shard_size="50KB")
        assert os.path.isfile(root / name / "model.safetensors.index.json")   # the sharded layout
    return root, models


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])


# ----------------------------------------------------------------------------------------------
# Config


def test_config_from_hf(checkpoints):
    root, _ = checkpoints
    c2 = hf_llama.read_hf_llama_config(root / "llama2")
    assert (c2.num_heads, c2.num_kv_heads, c2.head_dim, c2.tie_word_embeddings, c2.rope_scaling) == (4, 1, 16, True, None)
    c3 = hf_llama.read_hf_llama_config(root / "llama3", scan_layers=True)
    assert c3.rope_scaling == llama.RopeScaling(8.0, 1.0, 4.0, 32) and not c3.tie_word_embeddings and c3.scan_layers
    assert c3.dtype == jnp.bfloat16 and c3.param_dtype == jnp.float32   # the defaults: bf16 compute
    # transformers 4's spelling (rope_theta + rope_scaling with "type") reads the same.
    old = dict(model_type="llama", vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=2, rope_theta=5e5, rope_scaling=dict(LLAMA3_ROPE, type="llama3"))
    del old["rope_scaling"]["rope_type"]
    c_old = llama.LlamaConfig.from_hf_dict(old)
    assert c_old.rope_theta == 5e5 and c_old.rope_scaling.factor == 8.0 and c_old.num_kv_heads == 2


def test_rope_frequencies_match_transformers(checkpoints):
    """All three llama3 bands occur (kept, ramped, slowed), and each frequency equals HF's."""
    root, models = checkpoints
    config = hf_llama.read_hf_llama_config(root / "llama3")
    ours = llama.rope_inverse_frequencies(config)
    np.testing.assert_allclose(ours, models["llama3"].model.rotary_emb.inv_freq.numpy(), rtol=1e-6)
    plain = llama.rope_inverse_frequencies(config.replace(rope_scaling=None))
    ratio = plain / ours
    assert ratio[0] == 1.0 and 1.0 < ratio[1] < 8.0 and np.allclose(ratio[2:], 8.0)


# ----------------------------------------------------------------------------------------------
# Logits


@pytest.mark.parametrize("name", ["llama2", "llama3"])
@pytest.mark.parametrize("scan", [False, True])
def test_logits_match_transformers(checkpoints, name, scan):
    root, models = checkpoints
    remat = "dots_saveable" if scan else "none"
    params, config = hf_llama.load_hf_llama(root / name, dtype=jnp.float32, scan_layers=scan, remat_policy=remat)
    assert ("layers" in params) == scan and ("lm_head" in params) == (name == "llama3")
    tokens = _tokens(2, SEQ)
    diff = _max_diff(_our_logits(params, config, tokens), _hf_logits(models[name], tokens))
    print(f"{name} scan={scan}: max |logit diff| vs transformers = {diff:.2e}")
    assert diff < TOL


def test_remat_and_scan_give_the_same_gradients(checkpoints):
    """Training-side layouts: scanned + rematerialised layers differentiate like the plain unrolled model."""
    root, _ = checkpoints
    tokens = jnp.asarray(_tokens(2, 16, seed=9))

    def grads(scan, remat):
        params, config = hf_llama.load_hf_llama(root / "llama3", dtype=jnp.float32, scan_layers=scan,
                                                remat_policy=remat)
        model = llama.Llama(config)

        def loss(p):
            logits = model.apply({"params": p}, tokens[:, :-1])
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))
        g = jax.jit(jax.grad(loss))(params)
        return llama.unstack_layers(g, config.num_layers) if scan else g
    plain = grads(False, "none")
    for scan, remat in ((True, "dots_saveable"), (False, "full")):
        other = grads(scan, remat)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
                     other, plain)
    assert float(jnp.abs(plain["layers_0"]["self_attn"]["q_proj"]["kernel"]).max()) > 0


def test_bf16_compute_stays_close(checkpoints):
    """The default bf16 compute path runs and tracks fp32 (loose: bf16 has 8 bits of mantissa)."""
    root, models = checkpoints
    params, config = hf_llama.load_hf_llama(root / "llama3")
    tokens = _tokens(2, 16)
    ours = _our_logits(params, config, tokens)
    ref = _hf_logits(models["llama3"], tokens)
    assert ours.dtype == np.float32
    assert _max_diff(ours, ref) < 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints(tmp_path, dtype):
    model = _random_llama(2).to(dtype)
    model.save_pretrained(tmp_path)
    params, config = hf_llama.load_hf_llama(tmp_path, dtype=jnp.float32)
    assert params["layers_1"]["mlp"]["down_proj"]["kernel"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(params["layers_1"]["mlp"]["down_proj"]["kernel"]),
                                  model.model.layers[1].mlp.down_proj.weight.detach().float().numpy().T)
    # The reference reloads the file in fp32: model.float() would keep RoPE's inv_freq buffer rounded to bf16.
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = _tokens(1, 12)
    assert _max_diff(_our_logits(params, config, tokens), _hf_logits(reference, tokens)) < TOL


# ----------------------------------------------------------------------------------------------
# Cached decoding


def _greedy_with_cache(config, params, prompts, steps, cache_len):
    """Right-padded prefill + one-token greedy steps; returns (tokens (B, steps), logits (B, steps, V))."""
    model = llama.Llama(config)
    lengths = np.array([len(p) for p in prompts], np.int32)
    padded = np.zeros((len(prompts), lengths.max()), np.int32)
    for i, p in enumerate(prompts):
        padded[i, :len(p)] = p
    cache = llama.init_cache(config, len(prompts), cache_len)
    logits, cache = jax.jit(lambda p, c, t, n: llama.prefill(model, p, c, t, n))(params, cache, padded, lengths)
    step = jax.jit(lambda p, c, t, pos: llama.decode_step(model, p, c, t, pos))
    tokens, all_logits = [], []
    positions = jnp.asarray(lengths)
    for _ in range(steps):
        all_logits.append(np.asarray(logits))
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        tokens.append(np.asarray(token))
        logits, cache = step(params, cache, token, positions)
        positions = positions + 1
    return np.stack(tokens, 1), np.stack(all_logits, 1)


@pytest.mark.parametrize("scan", [False, True])
def test_cached_decoding_matches_full_recompute(checkpoints, scan):
    root, models = checkpoints
    params, config = hf_llama.load_hf_llama(root / "llama3", dtype=jnp.float32, scan_layers=scan)
    rng = np.random.RandomState(3)
    prompts = [rng.randint(0, VOCAB, n) for n in (20, 37, 29)]   # decoding crosses position 32 too
    steps = 8
    generated, step_logits = _greedy_with_cache(config, params, prompts, steps, cache_len=48)

    # Full recomputation of each finished sequence: by causality, position len + s - 1 gives step s.
    width = max(len(p) for p in prompts) + steps
    full = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        full[i, :len(p) + steps] = np.concatenate([p, generated[i]])
    full_logits = _our_logits(params, config, full)
    worst = 0.0
    for i, p in enumerate(prompts):
        rows = full_logits[i, len(p) - 1:len(p) - 1 + steps]
        worst = max(worst, _max_diff(step_logits[i], rows))
        np.testing.assert_array_equal(generated[i], rows.argmax(-1))        # greedy from recomputation
        ids = torch.as_tensor(p[None], dtype=torch.long)
        # An explicit mask: generate would otherwise mask every prompt token equal to pad_token_id.
        hf_out = models["llama3"].generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                                           do_sample=False, pad_token_id=0)
        np.testing.assert_array_equal(generated[i], hf_out[0, len(p):].numpy())   # and transformers' greedy
    print(f"cached vs full recompute (scan={scan}): max |logit diff| = {worst:.2e}")
    assert worst < TOL


def test_decode_without_cache_is_refused(checkpoints):
    root, _ = checkpoints
    params, config = hf_llama.load_hf_llama(root / "llama2", dtype=jnp.float32)
    with pytest.raises(ValueError, match="init_cache"):
        llama.Llama(config).apply({"params": params}, _tokens(1, 4), decode=True, mutable=["cache"])


# ----------------------------------------------------------------------------------------------
# Export


@pytest.mark.parametrize("name,shard_size", [("llama2", "5GB"), ("llama3", "40KB")])
def test_export_reloads_in_transformers(checkpoints, tmp_path, name, shard_size):
    root, _ = checkpoints
    params, config = hf_llama.load_hf_llama(root / name, dtype=jnp.float32, scan_layers=(name == "llama3"))
    written = hf_llama.save_hf_llama(params, config, tmp_path, max_shard_size=shard_size)
    sharded = "model.safetensors.index.json" in written
    assert sharded == (name == "llama3") and ("model.safetensors" in written) != sharded
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert reloaded.config.tie_word_embeddings == config.tie_word_embeddings
    assert reloaded.config.num_key_value_heads == config.num_kv_heads
    tokens = _tokens(2, SEQ, seed=5)
    diff = _max_diff(_hf_logits(reloaded, tokens), _our_logits(params, config, tokens))
    print(f"export {name}: transformers on our export vs ours: max |logit diff| = {diff:.2e}")
    assert diff < TOL
    # And back through our loader (the unrolled layout this time): the same parameters.
    again, config_again = hf_llama.load_hf_llama(tmp_path, dtype=jnp.float32)
    assert config_again.rope_scaling == config.rope_scaling
    flat = llama.unstack_layers(params, config.num_layers) if config.scan_layers else params
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), flat, again)


def test_export_bf16(checkpoints, tmp_path):
    root, _ = checkpoints
    params, config = hf_llama.load_hf_llama(root / "llama2", dtype=jnp.float32)
    hf_llama.save_hf_llama(params, config, tmp_path, dtype=jnp.bfloat16)
    assert json.load(open(tmp_path / "config.json"))["dtype"] == "bfloat16"
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    weight = reloaded.model.layers[0].self_attn.q_proj.weight
    assert weight.dtype == torch.bfloat16
    np.testing.assert_allclose(weight.detach().float().numpy(), np.asarray(params["layers_0"]["self_attn"]["q_proj"]["kernel"])
                               .reshape(WIDTH, -1).T, rtol=1e-2, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# Mesh


def test_sharded_logits_and_decoding_match_single_device(checkpoints, mesh):
    root, _ = checkpoints
    single, config = hf_llama.load_hf_llama(root / "llama3", dtype=jnp.float32, scan_layers=True)
    sharded, _ = hf_llama.load_hf_llama(root / "llama3", dtype=jnp.float32, scan_layers=True, mesh=mesh)
    q = sharded["layers"]["self_attn"]["q_proj"]["kernel"]     # (layers, embed, heads, head_dim)
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert not q.sharding.is_fully_replicated
    assert not sharded["embed_tokens"]["embedding"].sharding.is_fully_replicated
    assert not sharded["layers"]["self_attn"]["k_proj"]["kernel"].sharding.is_fully_replicated   # kv heads split

    tokens = _tokens(4, SEQ, seed=7)
    expected = _our_logits(single, config, tokens)
    model = llama.Llama(config)
    with sharding.use_mesh(mesh):
        batch = sharding.put_batch(tokens, mesh)
        got = jax.jit(model.apply)({"params": sharded}, batch)
    assert _max_diff(got, expected) < 2e-5

    # Prefill and one step with a sharded cache give the single-device logits.
    lengths = np.array([5, 9, 3, 7], np.int32)
    prompt = tokens[:, :9]

    def two_steps(params, cache):
        logits, cache = llama.prefill(model, params, cache, prompt, lengths)
        step_logits, _ = llama.decode_step(model, params, cache, jnp.argmax(logits, -1).astype(jnp.int32), lengths)
        return logits, step_logits
    want = jax.jit(two_steps)(single, llama.init_cache(config, 4, 16))
    with sharding.use_mesh(mesh):
        cache = llama.init_cache(config, 4, 16, mesh=mesh)
        assert not cache["layers"]["self_attn"]["key"].sharding.is_fully_replicated
        got = jax.jit(two_steps)(sharded, cache)
    for a, b in zip(got, want):
        assert _max_diff(a, b) < 2e-5


def test_init_params_sharded_and_uneven_heads_replicate(mesh):
    # 3 kv heads do not split over tensor=2: that dimension replicates instead of failing.
    config = llama.LlamaConfig(vocab_size=VOCAB, hidden_size=96, intermediate_size=64, num_layers=1, num_heads=6,
                               num_kv_heads=3, dtype=jnp.float32)
    params = llama.init_params(config, jax.random.key(0), mesh=mesh)
    k = params["layers_0"]["self_attn"]["k_proj"]["kernel"]
    assert k.shape == (96, 3, 16) and k.sharding.spec == jax.sharding.PartitionSpec("fsdp", None, None)
    assert params["layers_0"]["self_attn"]["q_proj"]["kernel"].sharding.spec[1] == "tensor"


# ----------------------------------------------------------------------------------------------
# Errors


@pytest.fixture()
def single_file(tmp_path):
    _random_llama(4).save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "model.safetensors")
    return tmp_path


def _rewrite(path, edit):
    from safetensors.numpy import load_file, save_file
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_error_missing_tensor(single_file):
    _rewrite(single_file / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(hf_checkpoint.CheckpointError) as e:
        hf_llama.load_hf_llama(single_file)
    assert "'model.layers.1.mlp.up_proj.weight' is missing" in str(e.value)
    assert str(single_file / "model.safetensors") in str(e.value)


def test_error_missing_tensor_in_index(checkpoints, tmp_path):
    root, _ = checkpoints
    import shutil
    shutil.copytree(root / "llama3", tmp_path / "ckpt")
    index_path = tmp_path / "ckpt" / "model.safetensors.index.json"
    index = json.load(open(index_path))
    del index["weight_map"]["lm_head.weight"]
    json.dump(index, open(index_path, "w"))
    with pytest.raises(hf_checkpoint.CheckpointError, match=r"'lm_head.weight' is missing from .*index\.json"):
        hf_llama.load_hf_llama(tmp_path / "ckpt")


def test_error_wrong_shape(single_file):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((48, WIDTH), np.float32)
    _rewrite(single_file / "model.safetensors", edit)
    with pytest.raises(hf_checkpoint.CheckpointError) as e:
        hf_llama.load_hf_llama(single_file)
    msg = str(e.value)
    assert "'model.layers.0.self_attn.k_proj.weight'" in msg and "model.safetensors" in msg
    assert "(48, 64)" in msg and "(32, 64)" in msg


def test_error_unexpected_dtype(single_file):
    def edit(t):
        t["model.norm.weight"] = np.ones(WIDTH, np.int8)
    _rewrite(single_file / "model.safetensors", edit)
    with pytest.raises(hf_checkpoint.CheckpointError, match=r"'model.norm.weight' in .*model.safetensors.* dtype int8"):
        hf_llama.load_hf_llama(single_file)


def test_error_tensors_of_another_architecture(single_file):
    def edit(t):
        t["model.layers.0.self_attn.q_norm.weight"] = np.ones(16, np.float32)
    _rewrite(single_file / "model.safetensors", edit)
    with pytest.raises(hf_checkpoint.CheckpointError, match="q_norm"):
        hf_llama.load_hf_llama(single_file)


@pytest.mark.parametrize("field,value", [("model_type", "qwen2"), ("hidden_act", "gelu"), ("attention_bias", True),
                                         ("rope_parameters", {"rope_type": "yarn", "factor": 4.0})])
def test_error_unsupported_architecture(single_file, field, value):
    config_path = single_file / "config.json"
    config = json.load(open(config_path))
    config[field] = value
    json.dump(config, open(config_path, "w"))
    with pytest.raises(hf_checkpoint.CheckpointError) as e:
        hf_llama.load_hf_llama(single_file)
    assert str(config_path) in str(e.value) and field in str(e.value) and "unsupported architecture" in str(e.value)


def test_error_bad_remat_policy():
    with pytest.raises(ValueError, match="remat_policy"):
        llama.LlamaConfig(vocab_size=8, hidden_size=32, intermediate_size=8, num_layers=1, num_heads=2,
                          num_kv_heads=2, remat_policy="sometimes")
