"""The whole V2Flow tokenizer on tiny configs: sizes, encode/decode plumbing, masking, training,
sharding and bf16 (REFERENCE.md sections 3-4).

XLA compiles dominate the cost on CPU, so the tiny model is initialised once (sharded, on the
2 x 2 x 2 mesh) and a single jitted loss-and-gradient serves the overfitting, mesh and bf16 tests.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from v2flow_jax import sharding
from v2flow_jax.models import masking
from v2flow_jax.models import tokenizer as tok

# XLA's CPU backend spends most of these tests compiling; LLVM at -O0 halves that and leaves the
# HLO (hence every numerical result up to float rounding) as it is.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

TINY = dict(latent_size=4, latent_channels=8, preset="tiny", resampler_width=16, resampler_depth=1,
            token_dim=32, codebook_size=64, velocity_width=32, velocity_depth=2)
TINY_CFG = tok.TokenizerConfig(**TINY)
BATCH = 8


def count(tree):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def latents(batch=BATCH, seed=0, cfg=TINY_CFG):
    shape = (batch, cfg.latent_size, cfg.latent_size, cfg.latent_channels)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ----------------------------------------------------------------------------- (a) sizes


def abstract_params(cfg):
    model = tok.V2FlowTokenizer(cfg)
    return nn.unbox(jax.eval_shape(lambda r: tok.init_variables(model, r), jax.random.key(0)))


def split_mar(mar):
    enc = {k: v for k, v in mar.items()
           if k.startswith("z_proj") or k.startswith("encoder_") or k == "fake_latent"}
    dec = {k: v for k, v in mar.items() if k not in enc}
    return count(enc), count(dec)


def assert_close_m(got, want_millions, what):
    assert abs(got / 1e6 - want_millions) <= 0.005 * want_millions, f"{what}: {got / 1e6:.3f} M vs {want_millions} M"


def test_parameter_counts_match_the_release_large_preset():
    v = abstract_params(tok.TokenizerConfig())  # large, 8x8x32 latent, no vocabulary
    p = v["params"]
    assert sorted(p) == ["mar", "projector", "resampler", "velocity_mlp"]
    enc, dec = split_mar(p["mar"])
    assert_close_m(enc, 201.7, "MAR encoder")
    assert_close_m(dec, 202.8, "MAR decoder")
    assert_close_m(count(p["velocity_mlp"]), 103.6, "velocity MLP")
    assert_close_m(count(p["resampler"]), 5.48, "resampler + readout")
    assert_close_m(count(p["projector"]), 1.05, "projector")
    assert_close_m(count(p), 515.0, "total")  # REFERENCE section 9: 515 M
    # the codebook is state, not a parameter: K x d_code plus its EMA statistics
    assert jax.tree.map(lambda a: a.shape, v["vq"]["quantizer"]) == {
        "codebook": (16384, 1024), "embed_sum": (16384, 1024), "cluster_size": (16384,)}


def test_parameter_counts_match_the_release_llama_vocabulary():
    cfg = tok.TokenizerConfig(vocab_size=32000, vocab_dim=4096, latent_size=32)
    assert cfg.num_tokens == 1024
    v = abstract_params(cfg)
    assert_close_m(count(v["params"]["resampler"]), 1045.4, "resampler incl. G")
    assert_close_m(count(v["params"]["projector"]), 4.20, "projector")
    assert [a.shape for a in jax.tree.leaves(v["frozen"])] == [(32000, 4096)]
    assert "frozen" not in v["params"]
    assert v["vq"]["quantizer"]["codebook"].shape == (16384, 4096)


@pytest.mark.parametrize("rank", [0, 8])
def test_vocabulary_mode_generator_shapes(rank):
    cfg = tok.TokenizerConfig(**TINY, vocab_size=64, vocab_dim=32, generator_rank=rank)
    gen = abstract_params(cfg)["params"]["resampler"]["generator"]
    shapes = jax.tree.map(lambda a: a.shape, gen)
    if rank:
        assert shapes == {"fc1": {"kernel": (16, 64), "bias": (64,)}, "fc2_down": {"kernel": (64, 8)},
                          "fc2_up": {"kernel": (8, 64), "bias": (64,)}}
    else:
        assert shapes == {"fc1": {"kernel": (16, 64), "bias": (64,)}, "fc2": {"kernel": (64, 64), "bias": (64,)}}


# ----------------------------------------------------------------------------- shared tiny model


MESH_SHAPE = [("data", 2), ("fsdp", 2), ("tensor", 2)]


@functools.lru_cache(maxsize=None)
def tiny():
    """(model, mesh, sharded variables, host copies): one sharded init for the whole file."""
    model = tok.V2FlowTokenizer(TINY_CFG)
    mesh = sharding.make_mesh(MESH_SHAPE)
    variables, _ = sharding.sharded_init(lambda r: tok.init_variables(model, r), mesh,
                                         sharding.DEFAULT_RULES, jax.random.key(0))
    host = jax.tree.map(np.asarray, variables)
    return model, mesh, variables, host


def make_loss_fn(model):
    def loss_fn(params, vq, x, rng):
        sample, dropout = jax.random.split(rng)
        (loss, aux), new = model.apply({"params": params, "vq": vq}, x, train=True,
                                       rngs={"sample": sample, "dropout": dropout}, mutable=["vq"])
        return loss, (aux, new["vq"])
    return loss_fn


@functools.lru_cache(maxsize=None)
def grad_fn(model):
    return jit(jax.value_and_grad(make_loss_fn(model), has_aux=True))


# ----------------------------------------------------------------------------- (b, c) encode


def test_deterministic_encode_and_buffers_from_indices():
    model, _, _, host = tiny()
    x = latents(seed=1)

    @jit
    def run(variables, x, rng):
        enc = model.apply(variables, x, rngs={"sample": rng}, method=tok.V2FlowTokenizer.encode)
        from_codes = model.apply(variables, enc["codes"], method=tok.V2FlowTokenizer.buffer_from_codes)
        from_ids = model.apply(variables, enc["indices"], method=tok.V2FlowTokenizer.buffer_from_indices)
        return enc, from_codes, from_ids

    enc1, buf_codes, buf_ids = run(host, x, jax.random.key(1))
    enc2, _, _ = run(host, x, jax.random.key(2))   # another 'sample' rng: must not matter
    n = TINY_CFG.num_tokens
    assert enc1["indices"].shape == (BATCH, n) and enc1["indices"].dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(enc1["indices"]), np.asarray(enc2["indices"]))
    np.testing.assert_array_equal(np.asarray(enc1["codes"]), np.asarray(enc2["codes"]))
    # the forward value of the quantised tokens is the codebook row of their index
    codebook = np.asarray(host["vq"]["quantizer"]["codebook"])
    np.testing.assert_allclose(np.asarray(enc1["codes"]), codebook[np.asarray(enc1["indices"])], atol=1e-5)
    # decoding from token ids (the LLM path) gives the same buffer as from the encoder's codes
    assert buf_ids.shape == (BATCH, n, 64)
    np.testing.assert_allclose(np.asarray(buf_ids), np.asarray(buf_codes), atol=1e-5, rtol=1e-5)
    # projector = Linear(d -> D_enc) applied to the codebook rows, checked in numpy
    proj = host["params"]["projector"]
    want = codebook[np.asarray(enc1["indices"])] @ np.asarray(proj["kernel"], np.float64) + proj["bias"]
    np.testing.assert_allclose(np.asarray(buf_ids), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pool", [1, 2])
def test_token_readout_loss_matches_numpy(pool):
    """token_recon_weight: the training-only linear readout of each quantized token, scored against the
    latent pixels of its cell. Re-derived in numpy with the cell of each patch taken from the decoder's
    own patch -> token map (mar.patch_to_token), and the loss term added with its weight."""
    from v2flow_jax.models.mar import patch_to_token
    cfg = dataclasses.replace(TINY_CFG, pool=pool, token_recon_weight=0.5)
    model = tok.V2FlowTokenizer(cfg)
    x = latents(seed=3, cfg=cfg)
    rngs = {"params": jax.random.key(0), "sample": jax.random.key(1), "dropout": jax.random.key(2)}
    variables = nn.unbox(model.init(rngs, x, train=False))
    readout = variables["params"]["token_readout"]
    assert readout["kernel"].shape == (cfg.code_dim, pool * pool * cfg.latent_channels)

    enc = model.apply(variables, x, method=tok.V2FlowTokenizer.encode)
    got = model.apply(variables, enc["codes"], x, method=tok.V2FlowTokenizer.token_recon_loss)
    pred = np.asarray(enc["codes"], np.float64) @ np.asarray(readout["kernel"], np.float64) + readout["bias"]
    pred = pred.reshape(BATCH, cfg.num_tokens, pool * pool, cfg.latent_channels)
    owner = patch_to_token(cfg.num_patches, cfg.num_tokens)
    patches = x.reshape(BATCH, cfg.num_patches, cfg.latent_channels)
    err = []
    for t in range(cfg.num_tokens):
        cell = patches[:, owner == t]                 # the token's patches in raster order
        err.append((pred[:, t] - cell) ** 2)
    np.testing.assert_allclose(float(got), np.mean(np.concatenate(err, axis=1)), rtol=1e-5)

    (loss, aux), _ = model.apply(variables, x, train=True, mutable=["vq"], rngs=rngs)
    without = float(aux["flow_loss"]) + cfg.commit_weight * float(aux["commit_loss"])
    np.testing.assert_allclose(float(loss), without + 0.5 * float(aux["token_recon_loss"]), rtol=1e-5)
    assert "token_readout" not in tok.V2FlowTokenizer(TINY_CFG).init(rngs, x, train=False)["params"]


VOCAB = dict(vocab_size=64, vocab_dim=32)


def test_vocabulary_mode_encode_deterministic_and_noisy(rank=8):
    cfg = tok.TokenizerConfig(**TINY, **VOCAB, generator_rank=rank)
    model = tok.V2FlowTokenizer(cfg)
    x = latents(seed=4, cfg=cfg)
    # init through `encode` only: creates the resampler, vocabulary and codebook, not the MAR
    variables = nn.unbox(jit(lambda r: model.init({"params": r}, x, method=tok.V2FlowTokenizer.encode))(
        jax.random.key(3)))
    assert sorted(variables) == ["frozen", "params", "vq"]
    assert sorted(variables["params"]) == ["resampler"]
    assert [a.shape for a in jax.tree.leaves(variables["frozen"])] == [(64, 32)]

    @jit
    def run(variables, x, r1, r2):
        enc = lambda r, noisy: model.apply(variables, x, noisy=noisy, rngs={"sample": r},
                                           method=tok.V2FlowTokenizer.encode)
        return enc(r1, False), enc(r2, False), enc(r1, True), enc(r2, True), enc(r1, True)

    d1, d2, n1, n2, n1_again = run(variables, x, jax.random.key(5), jax.random.key(6))
    assert d1["codes"].shape == (BATCH, cfg.num_tokens, 32)
    np.testing.assert_array_equal(np.asarray(d1["indices"]), np.asarray(d2["indices"]))
    np.testing.assert_array_equal(np.asarray(d1["codes"]), np.asarray(d2["codes"]))
    np.testing.assert_array_equal(np.asarray(n1["indices"]), np.asarray(n1_again["indices"]))
    # Gumbel noise: other 'sample' rngs give other soft mixtures, hence other tokens
    assert np.abs(np.asarray(n1["codes"]) - np.asarray(n2["codes"])).max() > 0
    assert (np.asarray(n1["indices"]) != np.asarray(n2["indices"])).any()
    assert (np.asarray(n1["indices"]) != np.asarray(d1["indices"])).any()
    # config.noisy_encode=True makes the release's noisy encode the default (noisy=None)
    noisy_model = tok.V2FlowTokenizer(dataclasses.replace(cfg, noisy_encode=True))
    by_config = jit(lambda v, x, r: noisy_model.apply(v, x, rngs={"sample": r}, method=tok.V2FlowTokenizer.encode))
    c1, c2 = by_config(variables, x, jax.random.key(5)), by_config(variables, x, jax.random.key(6))
    np.testing.assert_array_equal(np.asarray(c1["indices"]), np.asarray(n1["indices"]))
    np.testing.assert_array_equal(np.asarray(c2["indices"]), np.asarray(n2["indices"]))


# ----------------------------------------------------------------------------- (d) masking


def np_tokens_per_step(L, K):
    """MAR cosine schedule, from REFERENCE section 5: mask_len_k = floor(L cos(pi/2 (k+1)/K))
    clamped to [1, remaining - 1], the last step unmasks everything."""
    remaining, out = L, []
    for k in range(K):
        if k == K - 1:
            nxt = 0
        else:
            nxt = min(max(math.floor(L * math.cos(math.pi / 2 * (k + 1) / K)), 1), remaining - 1)
        out.append(remaining - nxt)
        remaining = nxt
    return out


def test_cosine_schedule_counts():
    assert masking.tokens_per_step(64, 4) == [5, 14, 21, 24]
    assert masking.cosine_schedule(64, 4) == [59, 45, 24, 0]
    for L, K in [(16, 4), (64, 1), (64, 8), (256, 4), (256, 16), (1024, 64), (10, 10), (16, 3)]:
        steps = masking.tokens_per_step(L, K)
        assert len(steps) == K and sum(steps) == L, (L, K, steps)
        assert all(s >= 1 for s in steps), (L, K, steps)
        assert steps == np_tokens_per_step(L, K), (L, K)
        still = masking.cosine_schedule(L, K)
        assert still[-1] == 0 and all(a > b for a, b in zip([L] + still, still))


@pytest.mark.parametrize("L,min_ratio", [(64, 0.7), (10, 0.7), (16, 0.5)])
def test_mask_window_invariants(L, min_ratio):
    B = 16
    max_vis = masking.max_visible(L, min_ratio)
    assert max_vis == L - math.ceil(round(L * min_ratio, 9))
    rng = np.random.default_rng(L)
    ratios = np.concatenate([[min_ratio, 1.0, min_ratio + 1e-3], rng.uniform(min_ratio, 1.0, B - 3)]).astype(np.float32)

    @jit
    def run(key, ratios):
        orders = masking.random_orders(key, B, L)
        num_masked = jax.vmap(lambda r: masking.num_masked_for(r, L, max_vis))(ratios)
        mask = masking.mask_from_order(orders, num_masked)
        idx, valid = masking.visible_window(orders, num_masked, max_vis)
        return orders, num_masked, mask, idx, valid

    orders, num_masked, mask, idx, valid = map(np.asarray, run(jax.random.key(L), ratios))
    want_masked = np.array([min(L, max(L - max_vis, math.ceil(round(float(r) * L, 5)))) for r in ratios])
    np.testing.assert_array_equal(num_masked, want_masked)
    assert num_masked[0] == L - max_vis and num_masked[1] == L
    for b in range(B):
        assert sorted(orders[b].tolist()) == list(range(L))              # a permutation
        masked = set(orders[b, :num_masked[b]].tolist())                 # the first num_masked of the order
        assert set(np.flatnonzero(mask[b]).tolist()) == masked
        assert valid[b].sum() == L - num_masked[b]
        visible = set(idx[b][valid[b]].tolist())
        assert visible == set(np.flatnonzero(~mask[b]).tolist())        # window covers every visible patch
        assert not mask[b][idx[b][valid[b]]].any()                      # and only unmasked ones
    assert len(set(map(tuple, orders))) == B                             # orders differ per sample


def test_mask_ratio_distribution():
    ratios = np.asarray(jit(jax.vmap(masking.sample_mask_ratio))(jax.random.split(jax.random.key(0), 20000)))
    assert ratios.min() >= 0.7 and ratios.max() <= 1.0
    # normal(1, 0.25) truncated to [0.7, 1], i.e. to [a, b] = [-1.2, 0] in standard units:
    # mean = 1 + 0.25 (phi(a) - phi(b)) / (Phi(b) - Phi(a))
    phi = lambda z: math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    big_phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    mean = 1 + 0.25 * (phi(-1.2) - phi(0.0)) / (big_phi(0.0) - big_phi(-1.2))
    assert abs(mean - 0.867) < 1e-3
    assert abs(ratios.mean() - mean) < 0.003


# ----------------------------------------------------------------------------- (e) overfitting


def test_overfits_one_batch():
    model, _, _, host = tiny()
    step_grad = grad_fn(model)
    opt = optax.adam(1e-3)

    @jit
    def update(grads, state, params):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    x = latents(seed=7)
    rng = jax.random.key(100)  # one batch AND one draw of masks, times, noise and dropout
    params, vq = host["params"], host["vq"]
    state = opt.init(params)
    losses = []
    for i in range(150):
        (loss, (aux, vq)), grads = step_grad(params, vq, x, rng)
        if i == 149:
            # the token path is trained: flow-loss gradients reach the projector and the resampler
            # (through the rotation trick). Not at step 0: the velocity MLP's zero-initialised
            # output layer makes every gradient upstream of it vanish there.
            for part in ("resampler", "projector", "mar", "velocity_mlp"):
                g = np.concatenate([np.ravel(a) for a in jax.tree.leaves(grads[part])])
                assert np.isfinite(g).all() and np.abs(g).max() > 0, part
        params, state = update(grads, state, params)
        losses.append(float(loss))
    first, last = np.mean(losses[:5]), np.mean(losses[-20:])
    # measured last/first ~0.01-0.02 over 4 data seeds (with fresh noise every step it is only
    # ~0.6-0.67 after 150 steps: the flow loss has a noise floor, too close to a threshold)
    assert np.isfinite(losses).all()
    assert last < 0.2 * first, (first, last, losses[::10])


# ----------------------------------------------------------------------------- (f) mesh


def test_loss_and_gradients_on_mesh_equal_single_device():
    model, mesh, variables, host = tiny()
    x = latents(seed=8)
    rng = jax.random.key(9)
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        (loss, (aux, vq)), grads = jit(jax.value_and_grad(make_loss_fn(model), has_aux=True))(
            variables["params"], variables["vq"], sharding.put_batch(x, mesh), rng)
    (loss1, (aux1, vq1)), grads1 = grad_fn(model)(host["params"], host["vq"], x, rng)
    # parameters really are distributed
    specs = {str(a.sharding.spec) for a in jax.tree.leaves(variables["params"])}
    assert any("tensor" in s for s in specs) and any("fsdp" in s for s in specs)

    np.testing.assert_allclose(float(loss), float(loss1), rtol=1e-5)
    for k in aux1:
        np.testing.assert_allclose(float(aux[k]), float(aux1[k]), rtol=1e-5, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), vq, vq1)
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    flat1 = jax.tree.leaves(grads1)
    bad = []
    for (path, g), g1 in zip(flat, flat1):
        g, g1 = np.asarray(g), np.asarray(g1)
        scale = max(np.abs(g1).max(), 1e-6)
        if np.abs(g - g1).max() > 1e-4 * scale + 1e-7:
            bad.append(f"{jax.tree_util.keystr(path)}: max|diff| {np.abs(g - g1).max():.3g}, max|g| {scale:.3g}")
    assert not bad, "gradients differ on the mesh:\n" + "\n".join(bad)


# ----------------------------------------------------------------------------- (g) bf16


def test_bfloat16_compute_runs_and_is_close_to_float32():
    model, _, _, host = tiny()
    model16 = tok.V2FlowTokenizer(dataclasses.replace(TINY_CFG, dtype="bfloat16"))
    assert model16.config.compute_dtype == jnp.bfloat16
    x = latents(seed=10)
    rng = jax.random.key(11)
    (loss32, (aux32, _)), _ = grad_fn(model)(host["params"], host["vq"], x, rng)
    loss16, (aux16, _) = jit(make_loss_fn(model16))(host["params"], host["vq"], x, rng)
    assert loss16.dtype == jnp.float32
    assert np.isfinite(float(loss16))
    np.testing.assert_allclose(float(loss16), float(loss32), rtol=0.05)
    np.testing.assert_allclose(float(aux16["flow_loss"]), float(aux32["flow_loss"]), rtol=0.05)
    np.testing.assert_allclose(float(aux16["mask_ratio"]), float(aux32["mask_ratio"]))  # same rngs, same masks


# ----------------------------------------------------------------------------- (h) config


def test_from_config_accepts_a_valid_dict():
    cfg = tok.TokenizerConfig.from_config(dict(TINY, vocab_size=64, vocab_dim=32, generator_rank=8))
    assert cfg == tok.TokenizerConfig(**TINY, vocab_size=64, vocab_dim=32, generator_rank=8)
    assert cfg.num_patches == 16 and cfg.num_tokens == 16 and cfg.code_dim == 32
    assert tok.TokenizerConfig.from_config(dict(TINY, pool=2)).num_tokens == 4


def test_from_config_rejects_unknown_field():
    with pytest.raises(ValueError, match="codebok_size"):
        tok.TokenizerConfig.from_config(dict(TINY, codebok_size=64))


@pytest.mark.parametrize("field,value", [("preset", "gigantic"), ("dtype", "float16"), ("pool", 3),
                                         ("mask_ratio_min", 0.0), ("codebook_size", 1), ("gumbel_tau", 0.0),
                                         ("vocab_size", -1), ("buffer_drop", 1.0)])
def test_from_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        tok.TokenizerConfig.from_config(dict(TINY, **{field: value}))
