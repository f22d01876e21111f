"""Rectified-flow maths: path, time sampling, grids, and the ODE solvers' convergence orders."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v2flow_jax import flow


# ----------------------------------------------------------------------------- path and time


def test_interpolate_endpoints_and_velocity_is_path_derivative():
    k0, k1 = jax.random.split(jax.random.PRNGKey(0))
    x0 = jax.random.normal(k0, (4, 3))
    eps = jax.random.normal(k1, (4, 3))
    np.testing.assert_allclose(flow.interpolate(x0, eps, 0.0), x0)
    np.testing.assert_allclose(flow.interpolate(x0, eps, 1.0), eps)
    t = jnp.array([0.1, 0.4, 0.7, 0.95])[:, None]
    # The target must be d x_t / dt along the path, which is what the ODE solvers integrate.
    _, dxdt = jax.jvp(lambda tt: flow.interpolate(x0, eps, tt), (t,), (jnp.ones_like(t),))
    np.testing.assert_allclose(dxdt, flow.velocity_target(x0, eps), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(flow.velocity_target(x0, eps), eps - x0)


def test_shift_time_fixed_points_monotone_and_composition():
    t = np.linspace(0.0, 1.0, 101)
    for s in (0.5, 1.0, 3.0, 7.0):
        ts = flow.shift_time(t, s)
        assert ts[0] == 0.0 and ts[-1] == 1.0
        assert np.all(np.diff(ts) > 0)
    np.testing.assert_array_equal(flow.shift_time(t, 1.0), t)
    # s > 1 pushes times toward noise (t = 1); shifts compose multiplicatively.
    assert np.all(flow.shift_time(t[1:-1], 3.0) > t[1:-1])
    np.testing.assert_allclose(flow.shift_time(flow.shift_time(t, 3.0), 2.0), flow.shift_time(t, 6.0))
    np.testing.assert_allclose(flow.shift_time(flow.shift_time(t, 3.0), 1 / 3), t, atol=1e-12)
    np.testing.assert_allclose(flow.shift_time(0.5, 3.0), 0.75)


def test_sample_train_time_matches_shifted_logit_normal():
    n = 200_000
    t = flow.sample_train_time(jax.random.PRNGKey(1), (n,), shift=3.0)
    assert t.shape == (n,) and t.dtype == jnp.float32
    t = np.asarray(t, np.float64)
    assert t.min() > 0.0 and t.max() < 1.0
    # Independent Monte-Carlo of the same law: u = sigmoid(z), t = 3u / (1 + 2u).
    z = np.random.default_rng(0).standard_normal(2_000_000)
    u = 1.0 / (1.0 + np.exp(-z))
    ref = 3.0 * u / (1.0 + 2.0 * u)
    tol = 5 * ref.std() / np.sqrt(n)
    assert abs(t.mean() - ref.mean()) < tol, (t.mean(), ref.mean())
    for q in (0.1, 0.5, 0.9):
        assert abs(np.quantile(t, q) - np.quantile(ref, q)) < 5e-3
    # Unshifted logit-normal is symmetric about 1/2.
    t1 = np.asarray(flow.sample_train_time(jax.random.PRNGKey(2), (n,), shift=1.0))
    assert abs(t1.mean() - 0.5) < 3e-3 and abs(np.median(t1) - 0.5) < 5e-3


def test_time_grid():
    for n, s in ((1, 3.0), (20, 3.0), (7, 1.0), (50, 0.5)):
        g = flow.time_grid(n, s)
        assert g.shape == (n + 1,) and g.dtype == np.float64
        assert g[0] == 1.0 and g[-1] == 0.0
        assert np.all(np.diff(g) < 0)
        np.testing.assert_allclose(g, flow.shift_time(np.linspace(1, 0, n + 1), s), atol=1e-15)
    np.testing.assert_allclose(flow.time_grid(4, 1.0), [1.0, 0.75, 0.5, 0.25, 0.0])
    # With s = 3 the steps crowd near the noise end.
    d = -np.diff(flow.time_grid(20, 3.0))
    assert d[0] < d[-1]
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="num_steps"):
            flow.time_grid(bad, 3.0)
    with pytest.raises(ValueError, match="shift"):
        flow.time_grid(10, 0.0)


# ----------------------------------------------------------------------------- solvers

# Gaussian data x0 ~ N(m, s^2) per dimension. With x_t = (1 - t) x0 + t eps the marginal is
# N(mu_t, sig_t^2), mu_t = (1 - t) m, sig_t^2 = (1 - t)^2 s^2 + t^2, and the optimal velocity
#   v(x, t) = E[eps - x0 | x_t = x] = -m + Cov(eps - x0, x_t) / sig_t^2 (x - mu_t)
#           = dmu/dt + (dsig/dt / sig_t) (x - mu_t),   Cov = t - (1 - t) s^2.
# Its flow keeps (x - mu_t) / sig_t constant, so x1 (mu = 0, sig = 1) maps to x0 = m + s x1.
_M = np.array([0.7, -1.2, 0.0, 2.0, -0.4, 1.1, 0.3, -2.2])
_S = np.linspace(0.3, 1.6, 8)


def _gaussian_velocity(x, t):
    m, s = jnp.asarray(_M, x.dtype), jnp.asarray(_S, x.dtype)
    t = t[:, None]
    var = (1 - t) ** 2 * s**2 + t**2
    return -m + (t - (1 - t) * s**2) / var * (x - (1 - t) * m)


def _gaussian_problem():
    x1 = np.random.default_rng(3).standard_normal((64, len(_M)))
    return x1, _M + _S * x1


# A nonlinear field with a closed-form flow: dx/dt = x^2 from t = 1 gives x(t) = x1 / (1 + x1 (1 - t)).
def _quadratic_velocity(x, t):
    del t
    return x * x


def _quadratic_problem():
    x1 = np.random.default_rng(4).uniform(-0.5, 0.5, (64, 8))
    return x1, x1 / (1 + x1)


def _errors(method, velocity_fn, problem, steps, shift):
    x1, exact = problem
    out = []
    for n in steps:
        x0 = np.asarray(flow.solve(velocity_fn, jnp.asarray(x1), n, method, shift))
        out.append(np.sqrt(np.mean((x0 - exact) ** 2)))
    return np.array(out)


def _slope(steps, errs):
    return -np.polyfit(np.log(steps), np.log(errs), 1)[0]


STEPS = np.array([8, 16, 32, 64])


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("method,order", [("euler", 1.0), ("heun", 2.0)])
def test_one_step_methods_converge_at_their_order(method, order, shift):
    with jax.enable_x64(True):
        for velocity_fn, problem in ((_gaussian_velocity, _gaussian_problem()),
                                     (_quadratic_velocity, _quadratic_problem())):
            errs = _errors(method, velocity_fn, problem, STEPS, shift)
            assert np.all(np.diff(errs) < 0), errs
            assert abs(_slope(STEPS, errs) - order) < 0.2, (errs, _slope(STEPS, errs))


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_dpm_solver_pp_2m_converges_at_second_order(shift):
    # On a grid uniform in t the lambda-steps near t = 0 and t = 1 do not shrink, so the global
    # error is ~ h^2 log(1/h): the raw slope sits a little under 2 (1.5-1.7 here), and dividing out
    # log N recovers 2. A first-order slip (e.g. a lost multistep term) would give ~1 on both.
    with jax.enable_x64(True):
        errs = _errors("dpm_solver_pp_2m", _gaussian_velocity, _gaussian_problem(), STEPS, shift)
        assert np.all(np.diff(errs) < 0), errs
        assert _slope(STEPS, errs) > 1.4, (errs, _slope(STEPS, errs))
        assert abs(_slope(STEPS, errs / np.log(STEPS)) - 2.0) < 0.25, errs
        # Nonlinear field: well past first order (x16 error drop over x16 steps would be order 1).
        quad = _errors("dpm_solver_pp_2m", _quadratic_velocity, _quadratic_problem(), [16, 256], shift)
        assert quad[1] < quad[0] / 40, quad


def test_solvers_exact_on_straight_paths():
    # A constant velocity means straight trajectories: x0 = x1 - c for every solver and any grid.
    c = jnp.array([0.5, -2.0, 1.0])
    x1 = jnp.array([[0.1, 0.2, 0.3], [-1.0, 0.0, 4.0]])
    for method in flow.METHODS:
        for n in (1, 3, 20):
            np.testing.assert_allclose(flow.solve(lambda x, t: jnp.broadcast_to(c, x.shape), x1, n, method),
                                       x1 - c, rtol=1e-5, atol=1e-5)


def test_dpm_final_step_is_data_prediction_and_finite():
    a, b, c = flow._dpm_pp_2m_coefficients(flow.time_grid(20, 3.0))
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b)) and np.all(np.isfinite(c))
    assert a[-1] == 0.0 and b[-1] == 1.0 and c[-1] == 0.0  # x_0 = D = x - t v at the last step
    assert c[0] == 0.0 and c[1] == 0.0 and np.all(c[2:-1] > 0)  # first order until history exists
    # One DPM step from t = 1 is exactly the data prediction x1 - v(x1, 1), i.e. one Euler step.
    x1 = jax.random.normal(jax.random.PRNGKey(5), (4, 8))
    np.testing.assert_allclose(flow.solve(_gaussian_velocity, x1, 1, "dpm_solver_pp_2m"),
                               flow.solve(_gaussian_velocity, x1, 1, "euler"), rtol=1e-6)
    # In float32, a field that blows up as t -> 0 still yields finite samples (v is never taken at 0).
    out = jax.jit(lambda x: flow.dpm_solver_pp_2m(lambda y, t: y / t[:, None], x, 20))(x1)
    assert out.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(out)))


def _paper_dpm_pp_2m(velocity_fn, x, ts):
    """DPM-Solver++(2M), Alg. 2 of arXiv 2211.01095 transcribed in lambda form (float64 NumPy).

    Needs finite lambda at every grid point but the last (t = 0), where it takes x_0 = D."""
    lam = lambda t: np.log((1 - t) / t)
    d_prev = None
    for i in range(len(ts) - 1):
        s, t = ts[i], ts[i + 1]
        d = x - s * velocity_fn(x, np.full(x.shape[:1], s))
        if t == 0.0:
            return d
        h = lam(t) - lam(s)
        if d_prev is not None:
            r = (lam(s) - lam(ts[i - 1])) / h
            d_used = (1 + 1 / (2 * r)) * d - 1 / (2 * r) * d_prev
        else:
            d_used = d
        x = (t / s) * x - (1 - t) * np.expm1(-h) * d_used
        d_prev = d
    return x


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_dpm_matches_paper_transcription(shift):
    # Start just below t = 1 so every lambda but the final one is finite.
    grid = np.concatenate([flow.shift_time(np.linspace(1 - 1e-3, 0.02, 15), shift), [0.0]])
    x1 = np.random.default_rng(7).standard_normal((4, len(_M)))
    with jax.enable_x64(True):
        ours = flow._dpm_solver_pp_2m_on_grid(_gaussian_velocity, jnp.asarray(x1), grid)
        ref = _paper_dpm_pp_2m(lambda x, t: np.asarray(_gaussian_velocity(jnp.asarray(x), jnp.asarray(t))),
                               x1, grid)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_dpm_matches_diffusers_reference():
    # Independent implementation: diffusers' DPMSolverMultistepScheduler (flow sigmas, 2M, zero final).
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction",
        algorithm_type="dpmsolver++", use_flow_sigmas=True, flow_shift=3.0, final_sigmas_type="zero")
    sched.set_timesteps(20)
    grid = sched.sigmas.double().numpy()  # starts at 1 - 1/3000, not 1: compare on their grid
    x1 = np.random.default_rng(6).standard_normal((4, len(_M)))
    x = torch.tensor(x1)
    for i, step_t in enumerate(sched.timesteps):
        v = _gaussian_velocity(jnp.asarray(x.numpy(), jnp.float32), jnp.full((4,), grid[i], jnp.float32))
        x = sched.step(torch.tensor(np.asarray(v, np.float64)), step_t, x).prev_sample.double()
    ours = flow._dpm_solver_pp_2m_on_grid(_gaussian_velocity, jnp.asarray(x1, jnp.float32), grid)
    np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=1e-4, atol=1e-4)


def test_velocity_fn_receives_per_row_time_and_any_shape_works():
    seen = []

    def v(x, t):
        seen.append((x.shape, t.shape, t.dtype))
        return -x

    for shape in ((3, 4, 5), (2,), ()):
        for method in flow.METHODS:
            seen.clear()
            out = flow.solve(v, jnp.ones(shape), 4, method)
            assert out.shape == shape
            assert all(s == (shape, shape[:1], jnp.float32) for s in seen), seen
    # bf16 states are integrated in float32 and handed back in bf16.
    out = flow.solve(v, jnp.ones((2, 3), jnp.bfloat16), 4)
    assert out.dtype == jnp.bfloat16 and seen[-1][2] == jnp.float32


@pytest.mark.parametrize("method", flow.METHODS)
def test_nfe_counts_real_evaluations(method):
    calls = []

    def v(x, t):
        jax.debug.callback(lambda tt: calls.append(float(tt[0])), t)
        return -x

    n = 5
    jax.block_until_ready(jax.jit(lambda x: flow.solve(v, x, n, method))(jnp.ones((2, 3))))
    jax.effects_barrier()
    assert len(calls) == flow.nfe(method, n)
    grid = flow.time_grid(n, 3.0)
    expected = grid[:-1] if method != "heun" else np.stack([grid[:-1], grid[1:]], 1).ravel()
    np.testing.assert_allclose(sorted(calls, reverse=True), sorted(expected, reverse=True), atol=1e-6)


def test_nfe_values_and_unknown_method():
    assert flow.nfe("euler", 20) == 20
    assert flow.nfe("dpm_solver_pp_2m", 20) == 20
    assert flow.nfe("heun", 20) == 40
    with pytest.raises(ValueError, match="unknown ODE method 'rk4'"):
        flow.solve(_gaussian_velocity, jnp.ones((2, 8)), 4, method="rk4")
    with pytest.raises(ValueError, match="unknown ODE method"):
        flow.nfe("ddim", 4)


def test_jit_with_static_steps_traces_once():
    traces = []

    def sample(x, num_steps, method):
        traces.append((num_steps, method))  # runs only while tracing
        return flow.solve(_gaussian_velocity, x, num_steps, method)

    f = jax.jit(sample, static_argnames=("num_steps", "method"))
    k0, k1 = jax.random.split(jax.random.PRNGKey(7))
    a = f(jax.random.normal(k0, (4, 8)), num_steps=10, method="dpm_solver_pp_2m")
    b = f(jax.random.normal(k1, (4, 8)), num_steps=10, method="dpm_solver_pp_2m")
    assert len(traces) == 1 and not np.allclose(a, b)
    f(jax.random.normal(k1, (4, 8)), num_steps=12, method="dpm_solver_pp_2m")
    f(jax.random.normal(k1, (4, 8)), num_steps=12, method="dpm_solver_pp_2m")
    assert len(traces) == 2
