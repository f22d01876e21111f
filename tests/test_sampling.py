"""The masked-AR rectified-flow sampler (REFERENCE section 5) against a plain-Python re-derivation.

`sampling.sample_latent_patches` is one jitted program over the K AR steps, either unrolled with
exact per-step sizes or a `lax.scan` with fixed-size (padded) windows over each sample's random
order; both are checked against the reference. The reference below is written
independently of it: a Python loop over the AR steps, exact (unpadded) per-sample index sets taken
from the orders in NumPy, the encoder given only the patches known so far, its own Euler and
DPM-Solver++(2M) loops on `flow.time_grid`, and CFG with the Muse-style ramp computed here. Only
the random draws are reproduced the way the sampler makes them (same orders, same noise rows), so
the two must agree to float tolerance.

The model is tiny and its variables are random draws made in NumPy (see `host_variables`): the real
initialiser zeroes the AdaLN and output layers of the velocity MLP, and with v = 0 every comparison
would be vacuous.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax
from flax import linen as nn

from v2flow_jax import flow, sampling, sharding
from v2flow_jax.models import masking
from v2flow_jax.models.mar import PRESETS
from v2flow_jax.models.tokenizer import TokenizerConfig, build_tokenizer, init_variables

TINY = TokenizerConfig(latent_size=8, latent_channels=8, preset="tiny", resampler_width=16, resampler_depth=1,
                       token_dim=32, codebook_size=64, velocity_width=32, velocity_depth=2)
BATCH = 3
STEPS = 6          # solver steps: enough to exercise the 2M multistep term, cheap for the eager reference
ATOL = RTOL = 1e-4


def _host_value(path, shape, rng):
    """A random but well-scaled value for one variable, chosen by its name (NumPy, no compilation)."""
    name = path[-1]
    if name in ("codebook", "embed_sum"):                      # unit codes for the cosine quantizer
        x = rng.standard_normal(shape)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)
    if name == "cluster_size":
        return np.zeros(shape)
    if name == "kernel":                                     # every kernel live, the zero-initialised too
        return rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    if name == "scale":
        return 1.0 + 0.1 * rng.standard_normal(shape)
    return 0.1 * rng.standard_normal(shape)                 # biases, position tables, mask/dummy tokens


def abstract_variables(model):
    """The boxed (logically named) variable tree as shapes only: a trace, no compilation."""
    return jax.eval_shape(lambda r: init_variables(model, r), jax.random.key(0))


def host_variables(model, seed=0):
    """Random variables for the tiny model, made in NumPy: the real initialiser zeroes the AdaLN and output
    layers of the velocity MLP (v = 0 would make every comparison vacuous) and jit-compiling it costs
    more than all the sampler tests together on two cores."""
    rng = np.random.default_rng(seed)
    flat = flax.traverse_util.flatten_dict(nn.unbox(abstract_variables(model)))
    flat = {k: _host_value(k, s.shape, rng).astype(s.dtype) for k, s in flat.items()}
    return flax.traverse_util.unflatten_dict(flat)


@pytest.fixture(scope="module")
def model():
    return build_tokenizer(TINY)


@pytest.fixture(scope="module")
def variables(model):
    v = jax.tree.map(jnp.asarray, host_variables(model))
    assert set(v) == {"params", "vq"}
    zero_init = v["params"]["velocity_mlp"]["final"]["kernel"]
    assert float(jnp.abs(zero_init).max()) > 1e-2, "the zero-initialised layers must be live"
    return v


@pytest.fixture(scope="module")
def buffer(model, variables):
    rng = np.random.default_rng(1)
    codes = jnp.asarray(rng.standard_normal((BATCH, TINY.num_tokens, TINY.code_dim)), jnp.float32)
    return jax.jit(lambda v, c: model.apply(v, c, method=model.buffer_from_codes))(variables, codes)


_JITTED = {}
TRACES = {}


def jitted_sampler(model, cfg):
    """The jitted sampler, one compiled function per (model, cfg) reused across tests; counts its traces."""
    key = (id(model), cfg)
    if key not in _JITTED:
        def fn(v, b, r):
            TRACES[key] = TRACES.get(key, 0) + 1
            return sampling.sample_latent_patches(model, v, b, r, cfg)
        _JITTED[key] = jax.jit(fn)
    return _JITTED[key], key


def run_sampler(model, variables, buffer, rng, cfg):
    f, _ = jitted_sampler(model, cfg)
    return np.asarray(f(variables, buffer, rng))


# Network pieces for the reference, jitted one shape at a time (the sampling logic around them is plain
# Python); exact shapes, so every distinct (known, leaving) count compiles once and is cached.
_PIECES = {}


def _pieces(model):
    if id(model) not in _PIECES:
        dec = jax.jit(lambda v, buf, p, idx, valid, drop: model.apply(v, buf, p, idx, valid, drop,
                                                                       method=model.decoder_features))
        vel_fixed = jax.jit(lambda v, x, t, z: model.apply(v, x, t, z, method=model.velocity))
        rows = BATCH * model.config.num_patches

        def vel(v, x, t, z):
            # The MLP acts row by row; zero-padding to one row count compiles it once for every step.
            pad = lambda a: np.pad(np.asarray(a, np.float32), [(0, rows - a.shape[0])] + [(0, 0)] * (a.ndim - 1))
            return np.asarray(vel_fixed(v, pad(x), pad(t), pad(z)))[:x.shape[0]].astype(np.float64)
        _PIECES[id(model)] = (dec, vel)
    return _PIECES[id(model)]


# ----------------------------------------------------------------------------- the reference


def ref_schedule(L, K):
    """MAR's cosine schedule, written out: still-masked counts after each step."""
    out, remaining = [], L
    for k in range(K):
        m = 0 if k == K - 1 else max(1, min(remaining - 1, int(math.floor(L * math.cos(math.pi / 2 * (k + 1) / K)))))
        out.append(m)
        remaining = m
    return out


def ref_euler(vel, x, ts):
    for i in range(len(ts) - 1):
        x = x + (ts[i + 1] - ts[i]) * vel(x, ts[i])
    return x


def ref_dpm_solver_pp_2m(vel, x, ts):
    """Lu et al. Alg. 2 with alpha = 1 - t, sigma = t, D = x - t v; first order where h_{i-1} or h_i is infinite."""
    with np.errstate(divide="ignore"):
        lam = np.log(1.0 - ts) - np.log(ts)
    d_prev = None
    n = len(ts) - 1
    for i in range(n):
        s, t = ts[i], ts[i + 1]
        d = x - s * vel(x, s)
        h = lam[i + 1] - lam[i]
        if i == 0 or i == n - 1 or not np.isfinite(lam[i - 1]):
            d_eff = d                                    # DDIM step (no usable history / into t = 0)
        else:
            r = (lam[i] - lam[i - 1]) / h
            d_eff = (1.0 + 1.0 / (2.0 * r)) * d - (1.0 / (2.0 * r)) * d_prev
        # x_t = sigma_t / sigma_s x_s - alpha_t (e^{-h} - 1) D_eff
        coef = -(1.0 - t) * np.expm1(-h) if np.isfinite(h) else (1.0 - t)
        x = (t / s) * x + coef * d_eff
        d_prev = d
    return x


REF_SOLVERS = {"euler": ref_euler, "dpm_solver_pp_2m": ref_dpm_solver_pp_2m}


def reference_sample(model, variables, buffer, rng, cfg: sampling.SamplerConfig):
    """Eager re-derivation of the sampler.

    Returns (patches (B, L, C), how often each patch was written (B, L), stats: per step the mean
    |x_0 - x_1| the ODE moved the noise and the mean |v_c - v_u| of the guided evaluations).
    """
    mc = model.config
    L, C, b = mc.num_patches, mc.latent_channels, buffer.shape[0]
    K = cfg.num_ar_steps
    after = ref_schedule(L, K)
    before = [L] + after[:-1]
    max_leaving = max(x - y for x, y in zip(before, after))

    # The sampler's random draws, regenerated the way it makes them.
    order_rng, noise_rng = jax.random.split(rng)
    orders = np.asarray(masking.random_orders(order_rng, b, L))
    keys = jax.random.split(noise_rng, K)

    ts = flow.time_grid(cfg.solver_steps, cfg.time_shift)
    solve = REF_SOLVERS[cfg.solver]
    dec, velocity = _pieces(model)
    patches = np.zeros((b, L, C), np.float32)
    written = np.zeros((b, L), np.int64)
    stats = {"moved": [], "guidance": []}
    for k in range(K):
        m_before, m_after = before[k], after[k]
        # exact index sets, per sample, from the order
        known = np.stack([orders[i, m_before:] for i in range(b)]).astype(np.int32)     # (B, L - m_before)
        leaving = np.stack([orders[i, m_after:m_before] for i in range(b)]).astype(np.int32)
        n_known, n_leave = known.shape[1], leaving.shape[1]
        assert n_leave == m_before - m_after

        def features(drop):
            z = dec(variables, buffer, jnp.asarray(patches), jnp.asarray(known), jnp.ones((b, n_known), bool),
                    jnp.full((b,), drop))
            z = np.asarray(z)
            return np.stack([z[i, leaving[i]] for i in range(b)]).reshape(b * n_leave, -1)

        z_c = features(False)
        w = cfg.cfg_scale
        if cfg.cfg_schedule == "linear":
            w = 1.0 + (cfg.cfg_scale - 1.0) * (L - m_after) / L
        z_u = features(True) if cfg.cfg_scale != 1.0 else None

        def vel(x, t):
            tt = np.full((x.shape[0],), t, np.float32)
            v_c = velocity(variables, x, tt, z_c)
            if z_u is None:
                return v_c
            v_u = velocity(variables, x, tt, z_u)
            stats["guidance"].append(np.abs(v_c - v_u).mean())
            return v_u + w * (v_c - v_u)

        # Noise: normal(key_k, (B * max_leaving, C)) over a window of order positions ending at m_before.
        noise = np.asarray(jax.random.normal(keys[k], (b * max_leaving, C), jnp.float32)).reshape(b, max_leaving, C)
        start = max(m_before - max_leaving, 0)
        rows = np.arange(m_after, m_before) - start
        x1 = cfg.temperature * noise[:, rows].astype(np.float64).reshape(b * n_leave, C)
        x0 = solve(vel, x1, ts)
        stats["moved"].append(np.abs(x0 - x1).mean())
        x0 = x0.reshape(b, n_leave, C)
        for i in range(b):
            patches[i, leaving[i]] = x0[i]
            written[i, leaving[i]] += 1
    return patches, written, stats


_C = dict(solver_steps=STEPS)
EULER_GUIDED = sampling.SamplerConfig(solver="euler", cfg_scale=2.9, cfg_schedule="linear", **_C)
DPM_GUIDED = sampling.SamplerConfig(solver="dpm_solver_pp_2m", cfg_scale=2.9, cfg_schedule="linear", **_C)
EULER_UNGUIDED = sampling.SamplerConfig(solver="euler", cfg_scale=1.0, **_C)
DPM_UNGUIDED_WARM = sampling.SamplerConfig(solver="dpm_solver_pp_2m", cfg_scale=1.0, temperature=0.7, **_C)
EULER_CONSTANT = sampling.SamplerConfig(solver="euler", cfg_scale=2.9, cfg_schedule="constant", **_C)
DPM_K3 = sampling.SamplerConfig(solver="dpm_solver_pp_2m", cfg_scale=2.0, num_ar_steps=3, **_C)
REF_CASES = [EULER_GUIDED, DPM_GUIDED, EULER_UNGUIDED, DPM_UNGUIDED_WARM, EULER_CONSTANT, DPM_K3]


_REF = {}


def cached_reference(model, variables, buffer, rng, cfg):
    key = (cfg, str(jax.random.key_data(rng)))
    if key not in _REF:
        _REF[key] = reference_sample(model, variables, buffer, rng, cfg)
    return _REF[key]


@pytest.mark.parametrize("loop", ["unrolled", "scan"])
@pytest.mark.parametrize("cfg", REF_CASES, ids=lambda c: f"{c.solver}-w{c.cfg_scale}-{c.cfg_schedule}-K{c.num_ar_steps}"
                                                        f"-T{c.temperature}")
def test_matches_plain_python_reference(model, variables, buffer, cfg, loop):
    rng = jax.random.key(7)
    want, written, stats = cached_reference(model, variables, buffer, rng, cfg)
    got = run_sampler(model, variables, buffer, rng, dataclasses.replace(cfg, ar_loop=loop))
    assert got.shape == (BATCH, TINY.num_patches, TINY.latent_channels)
    assert np.all(written == 1)
    # not a vacuous comparison: the velocity moves the noise, and the two guidance passes differ
    assert min(stats["moved"]) > 0.1, stats["moved"]
    assert (cfg.cfg_scale == 1.0) == (not stats["guidance"])
    assert not stats["guidance"] or min(stats["guidance"]) > 1e-2
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)


def test_auto_loop_choice():
    assert sampling.SamplerConfig(num_ar_steps=4).unrolled
    assert sampling.SamplerConfig(num_ar_steps=sampling.UNROLL_MAX_STEPS).unrolled
    assert not sampling.SamplerConfig(num_ar_steps=sampling.UNROLL_MAX_STEPS + 1).unrolled
    assert sampling.SamplerConfig(num_ar_steps=64, ar_loop="unrolled").unrolled
    assert not sampling.SamplerConfig(num_ar_steps=2, ar_loop="scan").unrolled
    with pytest.raises(ValueError, match="ar_loop"):
        sampling.SamplerConfig(ar_loop="while").validate()


@pytest.mark.parametrize("L,K", [(64, 4), (9, 16), (1, 3)])
def test_unrolled_equals_scan_beyond_the_auto_limit_and_when_steps_are_empty(L, K):
    """K > L gives steps with nothing to sample (skipped by the unrolled loop, all-padding in the scan)."""
    cfg = TokenizerConfig(latent_size=int(math.isqrt(L)), latent_channels=4, preset="tiny", resampler_width=8,
                          resampler_depth=1, token_dim=8, codebook_size=8, velocity_width=16, velocity_depth=1)
    m = build_tokenizer(cfg)
    v = jax.tree.map(jnp.asarray, host_variables(m, seed=L + K))
    width = PRESETS[cfg.preset][0]
    buf = jnp.asarray(np.random.default_rng(K).standard_normal((2, cfg.num_tokens, width)), jnp.float32)
    outs = [np.asarray(jax.jit(lambda v, b, r, c=sampling.SamplerConfig(num_ar_steps=K, solver_steps=3, ar_loop=loop):
                               sampling.sample_latent_patches(m, v, b, r, c))(v, buf, jax.random.key(1)))
            for loop in ("unrolled", "scan")]
    assert np.abs(outs[0]).min() > 0 or L == 1
    np.testing.assert_allclose(outs[0], outs[1], atol=ATOL, rtol=RTOL)


def test_reference_is_sensitive_to_the_second_order_term(model, variables, buffer):
    """Guards the DPM comparison: first-order (DDIM) stepping is measurably different from 2M here."""
    cfg = sampling.SamplerConfig(solver="dpm_solver_pp_2m", solver_steps=STEPS, cfg_scale=1.0)
    rng = jax.random.key(7)
    want, _, _ = reference_sample(model, variables, buffer, rng, cfg)
    saved = REF_SOLVERS["dpm_solver_pp_2m"]

    def ddim(vel, x, ts):
        for i in range(len(ts) - 1):
            s, t = ts[i], ts[i + 1]
            d = x - s * vel(x, s)
            x = (t / s) * x + ((1.0 - t) - (1.0 - s) * t / s) * d
        return x
    try:
        REF_SOLVERS["dpm_solver_pp_2m"] = ddim
        first_order, _, _ = reference_sample(model, variables, buffer, rng, cfg)
    finally:
        REF_SOLVERS["dpm_solver_pp_2m"] = saved
    assert np.abs(first_order - want).max() > 100 * ATOL


# ----------------------------------------------------------------------------- coverage and plan


@functools.partial(jax.jit, static_argnums=(3, 4))
def _windows(orders, mask_before, mask_after, max_leaving, max_known):
    return (sampling.leaving_window(orders, mask_before, mask_after, max_leaving)
            + masking.visible_window(orders, mask_before, max_known))


@pytest.mark.parametrize("L,K", [(64, 4), (64, 1), (64, 8), (16, 3), (9, 16), (2, 2), (1, 3)])
def test_leaving_windows_partition_every_patch(L, K):
    """The valid rows of the leaving windows partition range(L) in every sample; the known window holds
    exactly the patches of earlier steps."""
    cfg = sampling.SamplerConfig(num_ar_steps=K)
    plan = sampling.make_plan(L, cfg)
    b = 5
    orders = np.asarray(masking.random_orders(jax.random.key(L * 100 + K), b, L))
    assert all(sorted(o) == list(range(L)) for o in orders)
    seen = np.zeros((b, L), np.int64)
    for mb, ma in zip(plan.mask_before, plan.mask_after):
        idx, valid, vis, vvalid = map(np.asarray, _windows(orders, np.int32(mb), np.int32(ma), plan.max_leaving,
                                                           plan.max_known))
        assert idx.shape == (b, plan.max_leaving)
        assert np.all(valid.sum(1) == mb - ma)
        for i in range(b):
            np.add.at(seen[i], idx[i][valid[i]], 1)
            assert sorted(idx[i][valid[i]]) == sorted(orders[i, ma:mb])
            assert sorted(vis[i][vvalid[i]]) == sorted(orders[i, mb:])
    assert np.all(seen == 1)


def test_every_patch_is_written(model, variables, buffer):
    cfg = sampling.SamplerConfig(solver="euler", solver_steps=STEPS)
    out = run_sampler(model, variables, buffer, jax.random.key(3), cfg)
    assert np.all(np.abs(out).max(-1) > 0), "some patch rows were never written"
    assert np.all(np.isfinite(out))


def test_cosine_schedule_counts():
    assert sampling.make_plan(64, sampling.SamplerConfig(num_ar_steps=4)).leaving == (5, 14, 21, 24)
    assert tuple(masking.tokens_per_step(64, 4)) == (5, 14, 21, 24)
    for L in (1, 2, 4, 16, 64, 100, 256):
        for K in (1, 2, 3, 4, 8, 16, 64, 100):
            plan = sampling.make_plan(L, sampling.SamplerConfig(num_ar_steps=K))
            assert sum(plan.leaving) == L
            assert plan.mask_after[-1] == 0 and plan.mask_before[0] == L
            assert list(plan.mask_after) == ref_schedule(L, K)
            assert plan.max_leaving == max(plan.leaving)
            assert plan.max_known >= max(L - b for b in plan.mask_before)
            if K <= L:
                assert min(plan.leaving) >= 1, (L, K, plan.leaving)
            assert all(x >= 0 for x in plan.leaving)


def test_guidance_ramp():
    plan = sampling.make_plan(64, sampling.SamplerConfig(cfg_scale=2.9, cfg_schedule="linear"))
    np.testing.assert_allclose(plan.guidance, [1 + 1.9 * (64 - m) / 64 for m in (59, 45, 24, 0)])
    assert plan.guidance[-1] == pytest.approx(2.9)
    plan = sampling.make_plan(64, sampling.SamplerConfig(cfg_scale=2.9, cfg_schedule="constant"))
    assert plan.guidance == (2.9,) * 4


# ----------------------------------------------------------------------------- guidance, rng, temperature


def test_cfg_one_is_unguided_and_differs_from_guided(model, variables, buffer):
    rng = jax.random.key(11)
    unguided = run_sampler(model, variables, buffer, rng, EULER_UNGUIDED)
    # cfg 1.0 = the conditional pass alone (the reference computes only v_c then)
    want, _, _ = reference_sample(model, variables, buffer, rng, EULER_UNGUIDED)
    np.testing.assert_allclose(unguided, want, atol=ATOL, rtol=RTOL)
    guided = run_sampler(model, variables, buffer, rng, EULER_GUIDED)
    constant = run_sampler(model, variables, buffer, rng, EULER_CONSTANT)
    assert np.abs(guided - unguided).max() > 1e-2
    assert np.abs(constant - guided).max() > 1e-2
    assert sampling.model_evaluations(64, EULER_UNGUIDED) == {"mar_passes": 4, "velocity_nfe": 4 * STEPS}
    assert sampling.model_evaluations(64, EULER_GUIDED) == {"mar_passes": 8, "velocity_nfe": 8 * STEPS}
    heun = dataclasses.replace(EULER_GUIDED, solver="heun")
    assert sampling.model_evaluations(64, heun) == {"mar_passes": 8, "velocity_nfe": 16 * STEPS}


def test_rng_determinism_and_temperature(model, variables, buffer):
    cfg = EULER_UNGUIDED
    a = run_sampler(model, variables, buffer, jax.random.key(5), cfg)
    b = run_sampler(model, variables, buffer, jax.random.key(5), cfg)
    c = run_sampler(model, variables, buffer, jax.random.key(6), cfg)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-2
    cold = dataclasses.replace(cfg, temperature=1e-3)
    d = run_sampler(model, variables, buffer, jax.random.key(5), cold)
    assert np.abs(a - d).max() > 1e-2
    # Colder initial noise, less spread across seeds (what is left comes from the random orders).
    spread = lambda c: np.std(np.stack([run_sampler(model, variables, buffer, jax.random.key(s), c)
                                        for s in range(20, 26)]), axis=0).mean()
    assert spread(cold) < 0.5 * spread(cfg)


def test_no_recompilation(model, variables, buffer):
    f, key = jitted_sampler(model, EULER_GUIDED)
    f(variables, buffer, jax.random.key(0)).block_until_ready()
    n = TRACES[key]
    f(variables, buffer, jax.random.key(1)).block_until_ready()
    f(variables, buffer + 1.0, jax.random.key(2)).block_until_ready()
    assert TRACES[key] == n == 1
    assert f._cache_size() == 1


# ----------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("loop", ["unrolled", "scan"])
@pytest.mark.parametrize("mesh_shape", [[("data", 8)], [("data", 2), ("fsdp", 2), ("tensor", 2)]],
                         ids=["data8", "d2f2t2"])
def test_sharded_matches_single_device(model, mesh_shape, loop):
    """Variables placed by sharding.sharded_init, the batch by put_batch, jitted under use_mesh: the batch-8
    result equals the single-device one. A mesh without some axis (data8 has no fsdp/tensor) must work
    with the default rules too: their fsdp/tensor entries then mean "replicated"."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 (virtual) devices")
    cfg = sampling.SamplerConfig(solver="dpm_solver_pp_2m", solver_steps=4, ar_loop=loop)
    mesh = sharding.make_mesh(mesh_shape)
    rules = sharding.DEFAULT_RULES
    host = host_variables(model)
    boxed = abstract_variables(model)
    rebox = lambda values: jax.tree.map(lambda box, x: box.replace_boxed(x), boxed, values,
                                        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    v_sharded, _ = sharding.sharded_init(rebox, mesh, rules, host)
    # Some parameter must actually be split, otherwise the sharded run is a replicated one.
    if any(n > 1 for _, n in mesh_shape if _ != "data"):
        assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(v_sharded["params"]))
    rng = np.random.default_rng(2)
    codes = rng.standard_normal((8, TINY.num_tokens, TINY.code_dim)).astype(np.float32)

    f = jax.jit(lambda v, c, r: sampling.decode_codes(model, v, c, r, cfg))
    with sharding.use_mesh(mesh, rules):
        codes_sharded = sharding.put_batch(codes, mesh)
        got = np.asarray(f(v_sharded, codes_sharded, jax.random.key(9)))
    np.testing.assert_array_equal(jax.device_get(v_sharded["params"]["mar"]["mask_token"]),
                                  host["params"]["mar"]["mask_token"])
    v_single = jax.device_put(host, jax.devices()[0])
    want = np.asarray(jax.jit(lambda v, c, r: sampling.decode_codes(model, v, c, r, cfg))(
        v_single, jax.device_put(codes, jax.devices()[0]), jax.random.key(9)))
    assert got.shape == (8, TINY.latent_size, TINY.latent_size, TINY.latent_channels)
    assert np.abs(want).mean() > 0.1
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------- entry points


def test_decode_indices_matches_decode_codes_and_reconstruct(model, variables):
    """reconstruct_latents = encode, then decode_codes(codes) with the second half of the split rng; the LLM
    path decode_indices(ids) must give the same latents (codes are the codebook rows of the ids)."""
    cfg = sampling.SamplerConfig(solver="euler", solver_steps=4)
    latents = jax.random.normal(jax.random.key(4), (BATCH, TINY.latent_size, TINY.latent_size, TINY.latent_channels))
    enc = jax.jit(lambda v, x: model.apply(v, x, method=model.encode))(variables, latents)
    rng = jax.random.key(8)
    recon, ids = jax.jit(lambda v, x, r: sampling.reconstruct_latents(model, v, x, r, cfg))(variables, latents, rng)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(enc["indices"]))
    assert len(np.unique(np.asarray(ids))) > 1
    assert recon.shape == latents.shape

    _, dec_rng = jax.random.split(rng)
    from_ids = jax.jit(lambda v, i, r: sampling.decode_indices(model, v, i, r, cfg))(variables, ids, dec_rng)
    np.testing.assert_allclose(np.asarray(from_ids), np.asarray(recon), atol=ATOL, rtol=RTOL)
    # the codes encode hands to decode_codes are (up to rounding) the codebook rows decode_indices looks up
    codes = jnp.take(variables["vq"]["quantizer"]["codebook"], enc["indices"], axis=0)
    np.testing.assert_allclose(np.asarray(enc["codes"]), np.asarray(codes), atol=1e-5)
