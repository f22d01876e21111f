"""Cosine EMA codebook with the rotation trick, against numpy re-derivations (REFERENCE.md section 3).

The EMA oracle is the vector-quantize-pytorch cosine rule written out by hand:
    cluster_size = d cs + (1 - d) counts
    embed_sum    = d es + (1 - d) onehot^T x_unit
    smoothed     = (cs + eps) / (sum cs + K eps) * sum cs
    codebook     = l2norm(embed_sum / smoothed)
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from v2flow_jax import sharding
from v2flow_jax.models import quantizer as vq

# XLA's CPU backend spends most of these tests compiling; LLVM at -O0 halves that and leaves the
# HLO (hence every numerical result up to float rounding) as it is.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

K, D = 16, 8          # codes, code width (K divisible by 'tensor', D by 'fsdp')
DECAY, EPS = 0.8, 1e-5


# ----------------------------------------------------------------------------- numpy oracle


def np_unit(x, eps=1e-6):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def np_nearest(x, codebook):
    return np.argmax(np_unit(x) @ codebook.T, axis=-1)


def np_ema(state, x, decay=DECAY, eps=EPS):
    """One EMA step of the cosine codebook, float64; returns (new_state, indices)."""
    flat = np_unit(x.reshape(-1, x.shape[-1]).astype(np.float64))
    idx = np.argmax(flat @ state["codebook"].T, axis=-1)
    k = state["codebook"].shape[0]
    onehot = np.eye(k)[idx]
    cs = decay * state["cluster_size"] + (1 - decay) * onehot.sum(0)
    es = decay * state["embed_sum"] + (1 - decay) * onehot.T @ flat
    total = cs.sum()
    smoothed = (cs + eps) / (total + k * eps) * total
    return {"codebook": np_unit(es / smoothed[:, None]), "cluster_size": cs, "embed_sum": es}, idx


def plane_rotation(u, v):
    """The rotation taking unit u to unit v that is the identity off span(u, v) (Givens form)."""
    e1 = u
    e2 = v - (v @ u) * u
    e2 = e2 / np.linalg.norm(e2)
    c, s = v @ e1, v @ e2
    eye = np.eye(len(u))
    return eye + (c - 1) * (np.outer(e1, e1) + np.outer(e2, e2)) + s * (np.outer(e2, e1) - np.outer(e1, e2))


# ----------------------------------------------------------------------------- helpers


def make(**kw):
    return vq.CosineQuantizer(K, D, decay=DECAY, eps=EPS, **kw)


def rand(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _init(seed=0, **kw):
    qz = make(**kw)
    variables = nn.unbox(jit(qz.init)(jax.random.key(seed), jnp.zeros((2, 3, D))))
    return qz, variables


def as_np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


@functools.lru_cache(maxsize=None)
def _train_step(qz):
    def step(variables, x, rng):
        (out, idx, aux), new = qz.apply(variables, x, update=True, mutable=["vq"], rngs={"sample": rng})
        return out, idx, aux, new
    return jit(step)


def state_of(variables):
    return as_np(variables["vq"])


# ----------------------------------------------------------------------------- tests


def test_init_codebook_is_unit_and_stats_start_from_it():
    _, v = _init()
    s = state_of(v)
    assert s["codebook"].shape == (K, D)
    np.testing.assert_allclose(np.linalg.norm(s["codebook"], axis=-1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(s["cluster_size"], 0.0)
    np.testing.assert_allclose(s["embed_sum"], s["codebook"])
    assert "params" not in v  # the codebook is never an optimizer parameter


def test_ema_update_matches_numpy_over_three_steps():
    qz, v = _init()
    step = _train_step(qz)
    want = state_of(v)
    for i in range(3):
        x = rand((4, 6, D), seed=10 + i) * (1 + i)  # norms differ per step: only directions count
        _, idx, _, new = step(v, x, jax.random.key(i))
        want, want_idx = np_ema(want, x)
        np.testing.assert_array_equal(np.asarray(idx).reshape(-1), want_idx)
        got = state_of(new)
        np.testing.assert_allclose(got["cluster_size"], want["cluster_size"], atol=1e-6)
        np.testing.assert_allclose(got["embed_sum"], want["embed_sum"], atol=1e-5)
        np.testing.assert_allclose(got["codebook"], want["codebook"], atol=1e-5)
        v = {"vq": new["vq"]}
    assert np.abs(want["codebook"] - state_of(_init()[1])["codebook"]).max() > 1e-2  # it did move


def test_no_update_without_flag_or_mutable():
    qz, v = _init()
    x = rand((2, 5, D), seed=3)
    _, new = jit(lambda v, x: qz.apply(v, x, update=False, mutable=["vq"]))(v, x)
    jax.tree.map(np.testing.assert_array_equal, state_of(new), state_of(v))
    jit(lambda v, x: qz.apply(v, x, update=True))(v, x)  # 'vq' immutable: no update, no error


def test_nearest_is_argmax_cosine_similarity():
    qz, v = _init()
    x = rand((3, 7, D), seed=4)
    scales = np.random.default_rng(5).uniform(0.01, 50.0, (3, 7, 1)).astype(np.float32)
    codebook = state_of(v)["codebook"]
    want = np_nearest(x.astype(np.float64), codebook)
    idx, unit = jit(lambda v, x: qz.apply(v, x, method=vq.CosineQuantizer.nearest))(v, x * scales)
    np.testing.assert_array_equal(np.asarray(idx), want)
    np.testing.assert_allclose(np.asarray(unit), np_unit(x.astype(np.float64)), atol=1e-6)


def test_forward_outputs_lookup_commit_and_usage():
    qz, v = _init()
    x = rand((4, 6, D), seed=6) * 3.0
    out, idx, aux = jit(lambda v, x: qz.apply(v, x))(v, x)
    codebook = state_of(v)["codebook"]
    idx = np.asarray(idx)
    want_idx = np_nearest(x.astype(np.float64), codebook)
    np.testing.assert_array_equal(idx, want_idx)
    # forward value of the rotation trick is exactly the selected (unit) code
    np.testing.assert_allclose(np.asarray(out), codebook[want_idx], atol=2e-6)
    # lookup(indices) returns codebook rows, any index shape
    ids = np.array([[0, 5, K - 1], [3, 3, 7]])
    rows = jit(lambda v, i: qz.apply(v, i, method=vq.CosineQuantizer.lookup))(v, ids)
    np.testing.assert_allclose(np.asarray(rows), codebook[ids], atol=0)
    # commitment loss = MSE between the unit input and the (stop-grad) code
    commit = np.mean((np_unit(x.astype(np.float64)) - codebook[want_idx]) ** 2)
    np.testing.assert_allclose(float(aux["commit_loss"]), commit, rtol=1e-5)
    # usage = fraction of codes hit, perplexity = exp(entropy of the empirical code distribution)
    counts = np.bincount(want_idx.reshape(-1), minlength=K)
    p = counts / counts.sum()
    nz = p[p > 0]
    np.testing.assert_allclose(float(aux["codebook_usage"]), (counts > 0).mean(), rtol=1e-6)
    np.testing.assert_allclose(float(aux["codebook_perplexity"]), np.exp(-(nz * np.log(nz)).sum()), rtol=1e-5)


def test_commit_loss_gradient_reaches_input_only_through_the_unit_vector():
    qz, v = _init()
    x = rand((2, 3, D), seed=7)
    g = jit(jax.grad(lambda x: qz.apply(v, x)[2]["commit_loss"]))(x)
    codebook = state_of(v)["codebook"]
    x64 = x.reshape(-1, D).astype(np.float64)
    n = np.linalg.norm(x64, axis=-1, keepdims=True)
    u = x64 / n
    c = codebook[np_nearest(x64, codebook)]
    dl_du = 2 * (u - c) / x64.size
    want = (dl_du - (dl_du * u).sum(-1, keepdims=True) * u) / n  # d(x/|x|)/dx = (I - u u^T)/|x|
    np.testing.assert_allclose(np.asarray(g).reshape(-1, D), want, atol=1e-7, rtol=1e-4)


def test_rotate_to_forward_and_jacobian():
    rng = np.random.default_rng(8)
    x = rng.standard_normal(D).astype(np.float32) * 2.5
    q = rng.standard_normal(D).astype(np.float32) * 0.7
    fwd, jac, jq = jit(lambda x, q: (vq.rotate_to(x, q), jax.jacobian(vq.rotate_to)(x, q),
                                     jax.jacobian(vq.rotate_to, argnums=1)(x, q)))(x, q)
    np.testing.assert_allclose(np.asarray(fwd), q, atol=2e-6)
    jac = np.asarray(jac, np.float64)
    x64, q64 = x.astype(np.float64), q.astype(np.float64)
    s = np.linalg.norm(q64) / np.linalg.norm(x64)
    r = jac / s
    u, q_hat = x64 / np.linalg.norm(x64), q64 / np.linalg.norm(q64)
    np.testing.assert_allclose(r.T @ r, np.eye(D), atol=1e-5)           # orthogonal
    np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-5)         # a rotation, not a reflection
    np.testing.assert_allclose(r @ u, q_hat, atol=1e-5)                  # maps x/|x| onto q/|q|
    np.testing.assert_allclose(r, plane_rotation(u, q_hat), atol=1e-5)   # the minimal (plane) rotation
    assert np.abs(jac - np.eye(D)).max() > 0.1                           # not straight-through
    # the Jacobian does not depend on q's gradient path: q gets no gradient at all
    np.testing.assert_array_equal(np.asarray(jq), 0.0)


def test_quantizer_gradient_is_rotated_not_straight_through():
    qz, v = _init()
    x = rand((2, 3, D), seed=9) * 2.0
    g = rand((2, 3, D), seed=10)
    grad = np.asarray(jit(jax.grad(lambda x: jnp.sum(qz.apply(v, x)[0] * g)))(x)).reshape(-1, D)
    codebook = state_of(v)["codebook"]
    x64 = x.reshape(-1, D).astype(np.float64)
    for i, (xi, gi) in enumerate(zip(x64, g.reshape(-1, D).astype(np.float64))):
        qi = codebook[np_nearest(xi, codebook)]
        s = np.linalg.norm(qi) / np.linalg.norm(xi)
        r = plane_rotation(xi / np.linalg.norm(xi), qi / np.linalg.norm(qi))
        np.testing.assert_allclose(grad[i], s * r.T @ gi, atol=1e-5)
    assert np.abs(grad - g.reshape(-1, D)).max() > 0.1


def test_dead_codes_restart_onto_distinct_batch_inputs_with_a_grace_size():
    thr, noise = 0.5, 0.1
    qz, v = _init(dead_code_threshold=thr, restart_noise=noise)
    codebook0 = state_of(v)["codebook"]
    rng = np.random.default_rng(11)
    # 24 inputs near codes 0 and 1 only: after one step those have cs = 0.2 * 12 = 2.4 > thr,
    # every other code has cs = 0 < thr and must be restarted
    x = np.concatenate([codebook0[0] + 0.01 * rng.standard_normal((12, D)),
                        codebook0[1] + 0.01 * rng.standard_normal((12, D))]).astype(np.float32) * 3.0
    x = x.reshape(4, 6, D)
    _, _, aux, new = _train_step(qz)(v, x, jax.random.key(3))
    ema, idx = np_ema(state_of(v), x)
    assert sorted(set(idx.tolist())) == [0, 1]
    dead = ema["cluster_size"] < thr
    assert dead.sum() == K - 2
    assert int(aux["restarted_codes"]) == K - 2
    got = state_of(new)
    unit_inputs = np_unit(x.reshape(-1, D).astype(np.float64))
    # alive codes: the plain EMA result
    np.testing.assert_allclose(got["codebook"][~dead], ema["codebook"][~dead], atol=1e-5)
    np.testing.assert_allclose(got["cluster_size"][~dead], ema["cluster_size"][~dead], atol=1e-6)
    np.testing.assert_allclose(got["embed_sum"][~dead], ema["embed_sum"][~dead], atol=1e-5)
    # dead codes: unit vectors within the jitter of a batch input
    fresh = got["codebook"][dead]
    np.testing.assert_allclose(np.linalg.norm(fresh, axis=-1), 1.0, atol=1e-5)
    dist = np.linalg.norm(fresh[:, None] - unit_inputs[None], axis=-1)
    assert dist.min(-1).max() < 3 * noise and dist.min(-1).min() > 1e-4
    # without jitter each sits exactly on an input, each on a different one (drawn without replacement)
    qz_exact, _ = _init(dead_code_threshold=thr, restart_noise=0.0)
    exact = state_of(_train_step(qz_exact)(v, x, jax.random.key(3))[3])["codebook"][dead]
    dist0 = np.linalg.norm(exact[:, None] - unit_inputs[None], axis=-1)
    np.testing.assert_allclose(dist0.min(-1), 0.0, atol=1e-6)
    assert len(set(dist0.argmin(-1).tolist())) == dead.sum()
    # they get the codebook's mean cluster size (not the threshold, which the next decay loses)
    grace = max(ema["cluster_size"].mean(), thr)
    np.testing.assert_allclose(got["cluster_size"][dead], grace, rtol=1e-6)
    np.testing.assert_allclose(got["embed_sum"][dead], grace * fresh, atol=1e-6)
    # and without a threshold nothing is restarted (the release)
    qz0, v0 = _init()
    _, _, aux0, new0 = _train_step(qz0)(v0, x, jax.random.key(3))
    assert "restarted_codes" not in aux0
    np.testing.assert_allclose(state_of(new0)["codebook"], ema["codebook"], atol=1e-5)


def test_identical_inputs_keep_distinct_codes_after_restarts():
    """A collapsed encoder (every input the same vector) must not pull the codebook onto one point.

    Without jitter every restarted code would copy that input exactly (all K codes equal, argmax ties);
    with it they stay distinct, and restarts stop churning once each has its grace size.
    """
    qz, v = _init(dead_code_threshold=0.5, restart_noise=0.1)
    x = np.broadcast_to(rand((D,), seed=5), (4, 6, D)).astype(np.float32)
    step = _train_step(qz)
    restarted = []
    for i in range(6):
        _, _, aux, new = step(v, x, jax.random.key(10 + i))
        v = {**v, "vq": new["vq"]}
        restarted.append(int(aux["restarted_codes"]))
    codes = state_of(v)["codebook"]
    cos = codes @ codes.T
    np.fill_diagonal(cos, -1.0)
    assert cos.max() < 0.9999, "two codes coincide"
    assert restarted[0] == K - 1 and min(restarted[1:]) < K - 1, restarted


def test_soft_assignment_information_matches_numpy():
    sim = rand((5, 7, K), seed=21) * 0.3
    t = 0.05
    q = np.exp(sim.reshape(-1, K) / t)
    q /= q.sum(-1, keepdims=True)
    h = lambda p: -(p * np.log(p + 1e-12)).sum(-1)
    want = h(q.mean(0)) - h(q).mean()
    np.testing.assert_allclose(float(vq.soft_assignment_information(jnp.asarray(sim), t)), want, rtol=1e-4)
    same = np.broadcast_to(sim[:1, :1], sim.shape)   # every input alike: no information
    assert abs(float(vq.soft_assignment_information(jnp.asarray(same), t))) < 1e-5


@pytest.mark.parametrize("mesh_shape", [[("data", 8)], [("data", 2), ("fsdp", 2), ("tensor", 2)]])
def test_ema_statistics_on_a_mesh_equal_single_device(mesh_shape):
    qz, v_single = _init()
    mesh = sharding.make_mesh(mesh_shape)
    rules = sharding.DEFAULT_RULES
    x = rand((8, 6, D), seed=12)
    v, shardings = sharding.sharded_init(qz.init, mesh, rules, jax.random.key(0), jnp.zeros((2, 3, D)))
    # the same rng gives the same codebook, however it is laid out
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), v, v_single)
    if dict(mesh_shape).get("tensor"):
        assert v["vq"]["codebook"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
        assert len(v["vq"]["codebook"].addressable_shards[0].data) == K // 2

    xs = sharding.put_batch(x, mesh)
    assert len(xs.addressable_shards[0].data) == 8 // sharding.data_parallel_size(mesh)
    with sharding.use_mesh(mesh, rules):
        step = jit(lambda v, x: qz.apply(v, x, update=True, mutable=["vq"]))
        (out, idx, aux), new = step(v, xs)
    (out1, idx1, aux1), new1 = jit(lambda v, x: qz.apply(v, x, update=True, mutable=["vq"]))(v_single, x)

    got, want = state_of(new), state_of(new1)
    np.testing.assert_allclose(got["cluster_size"], want["cluster_size"], atol=1e-6)
    np.testing.assert_allclose(got["embed_sum"], want["embed_sum"], atol=1e-6)
    np.testing.assert_allclose(got["codebook"], want["codebook"], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(idx1))
    # the counts come from the whole global batch (all 48 vectors), not one shard's 6 or 12
    np.testing.assert_allclose(got["cluster_size"].sum(), (1 - DECAY) * 48, rtol=1e-6)
    # and against the numpy oracle, for good measure
    ema, _ = np_ema(state_of(v_single), x)
    np.testing.assert_allclose(got["codebook"], ema["codebook"], atol=1e-5)
    for k in ("commit_loss", "codebook_usage", "codebook_perplexity"):
        np.testing.assert_allclose(float(aux[k]), float(aux1[k]), rtol=1e-6)
