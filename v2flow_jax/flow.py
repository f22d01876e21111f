"""Rectified-flow maths: the path, training-time sampling and ODE solvers.

Convention (V2Flow paper, Eq. 2): t in [0, 1], t = 0 is data and t = 1 is noise,

    x_t = (1 - t) x_0 + t eps,        v = dx_t/dt = eps - x_0.

Sampling integrates dx/dt = v(x, t) from t = 1 (x_1 ~ N(0, I)) down to t = 0.

A solver receives the model as `velocity_fn(x, t) -> v`, where `x` has the shape of the state
(any shape) and `t` is an array of shape `x.shape[:1]` (one time per leading row, all equal, in
the state's working dtype) so it can go straight into a network as a per-example time; a 0-d state
gets a 0-d `t`. Scaling time for the network (V2Flow feeds 1000 t) is the caller's business.

`num_steps`, `method` and `shift` are static (Python values): the time grid and every solver
coefficient are computed in float64 NumPy at trace time, so the traced loop is a plain `lax.scan`
over constant coefficient tables and changing them means a new trace.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]

METHODS = ("euler", "heun", "dpm_solver_pp_2m")


# ----------------------------------------------------------------------------- path and time


def interpolate(x0, eps, t):
    """x_t = (1 - t) x0 + t eps; `t` broadcasts against x0 (e.g. shape (B, 1, ..., 1))."""
    return (1.0 - t) * x0 + t * eps


def velocity_target(x0, eps):
    """d x_t / dt along the straight path: eps - x0."""
    return eps - x0


def shift_time(t, shift: float):
    """Resolution shift t' = s t / (1 + (s - 1) t); keeps 0 and 1 fixed, s > 1 moves mass to noise.

    Plain arithmetic, so it works on NumPy arrays, JAX arrays and Python floats alike.
    """
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def sample_train_time(rng, shape, shift: float = 3.0, *, loc: float = 0.0, scale: float = 1.0,
                      dtype=jnp.float32):
    """Training times: logit-normal u = sigmoid(N(loc, scale^2)), then `shift_time(u, shift)`.

    The values lie strictly inside (0, 1): JAX's normal draws are bounded, so sigmoid never
    saturates to exactly 0 or 1 in float32.
    """
    z = loc + scale * jax.random.normal(rng, shape, dtype)
    return shift_time(jax.nn.sigmoid(z), shift)


def time_grid(num_steps: int, shift: float = 3.0) -> np.ndarray:
    """`num_steps + 1` float64 times from 1.0 (noise) to 0.0 (data): uniform, then shifted.

    This is the release's `linear_flow` grid (s = 3 there); with s > 1 the steps crowd near t = 1.
    Returned as NumPy so it is a trace-time constant inside jit.
    """
    num_steps = _check_steps(num_steps)
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    t = shift_time(np.linspace(1.0, 0.0, num_steps + 1, dtype=np.float64), float(shift))
    t[0], t[-1] = 1.0, 0.0  # exact endpoints whatever the rounding of the shift
    return t


def _check_steps(num_steps) -> int:
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive Python int (static), got {num_steps!r}")
    return int(num_steps)


# ----------------------------------------------------------------------------- solvers


def _work_dtype(x):
    # Integrate in at least float32: accumulating 20+ updates in bf16 loses the fine detail.
    return jnp.promote_types(x.dtype, jnp.float32)


def _time_like(x, t):
    """Per-row time array of shape x.shape[:1] for velocity_fn."""
    return jnp.full(x.shape[:1], t, dtype=x.dtype)


def euler(velocity_fn: VelocityFn, x1, num_steps: int, shift: float = 3.0):
    """Explicit Euler from t = 1 to t = 0 on `time_grid(num_steps, shift)`; 1 NFE per step."""
    x1 = jnp.asarray(x1)
    dtype = _work_dtype(x1)
    ts = time_grid(num_steps, shift)
    t_cur, dt = ts[:-1], np.diff(ts)  # dt < 0: we integrate backwards in time

    def step(x, coef):
        t, h = coef
        return x + h * velocity_fn(x, _time_like(x, t)), None

    x, _ = jax.lax.scan(step, x1.astype(dtype), (jnp.asarray(t_cur, dtype), jnp.asarray(dt, dtype)))
    return x.astype(x1.dtype)


def heun(velocity_fn: VelocityFn, x1, num_steps: int, shift: float = 3.0):
    """Heun's method (explicit trapezoid, 2nd order) on `time_grid(num_steps, shift)`.

    Every step, the last one included, takes an Euler predictor and a trapezoidal corrector, so
    NFE = 2 * num_steps. Unlike EDM's sigma = 0, the flow velocity at t = 0 is well defined, so the
    final corrector evaluation is kept rather than falling back to Euler.
    """
    x1 = jnp.asarray(x1)
    dtype = _work_dtype(x1)
    ts = time_grid(num_steps, shift)
    coefs = tuple(jnp.asarray(a, dtype) for a in (ts[:-1], ts[1:], np.diff(ts)))

    def step(x, coef):
        t, t_next, h = coef
        v = velocity_fn(x, _time_like(x, t))
        x_pred = x + h * v
        v_next = velocity_fn(x_pred, _time_like(x, t_next))
        return x + (0.5 * h) * (v + v_next), None

    x, _ = jax.lax.scan(step, x1.astype(dtype), coefs)
    return x.astype(x1.dtype)


def _dpm_pp_2m_coefficients(ts: np.ndarray):
    """Per-step (a, b, c) of DPM-Solver++(2M) for alpha_t = 1 - t, sigma_t = t, in float64.

    Step i goes from s = ts[i] to t = ts[i+1] with data prediction D_i = x - s v(x, s) and
        x_t = a_i x_s + b_i (D_i + c_i (D_i - D_{i-1})),
    where, with lambda = log(alpha / sigma) and h_i = lambda_t - lambda_s,
        a_i = sigma_t / sigma_s,
        b_i = -alpha_t (e^{-h_i} - 1) = alpha_t - alpha_s sigma_t / sigma_s,
        c_i = h_i / (2 h_{i-1})   (the 2M correction D1/2 with D1 = (D_i - D_{i-1}) / r_i).
    Written with alpha/sigma ratios, b_i needs no lambda and stays finite at both ends: the first
    step (sigma_s = 1, alpha_s = 0) gives b = alpha_t; the last step (t = 0, sigma_t = 0) gives
    a = 0, b = 1, i.e. x_0 = D, the data prediction.
    c_i = 0 on the first step (no history) and on the last one: lambda_0 = +inf makes the
    second-order term inf * 0 there, so it runs first order, as diffusers' `lower_order_final`.
    The second step's history point is t = 1 where lambda = -inf; h_0 = inf makes c_1 = 0 exactly
    (the linear extrapolation in lambda has zero slope), set explicitly rather than via h / inf.
    """
    n = len(ts) - 1
    s, t = ts[:-1], ts[1:]
    a = t / s
    b = (1.0 - t) - (1.0 - s) * t / s
    c = np.zeros(n)
    with np.errstate(divide="ignore"):
        lam = np.log1p(-ts) - np.log(ts)  # -inf at t = 1, +inf at t = 0
    for i in range(1, n - 1):
        h, h_prev = lam[i + 1] - lam[i], lam[i] - lam[i - 1]
        c[i] = 0.0 if not np.isfinite(h_prev) else 0.5 * h / h_prev
    return a, b, c


def dpm_solver_pp_2m(velocity_fn: VelocityFn, x1, num_steps: int, shift: float = 3.0):
    """DPM-Solver++(2M) (Lu et al., arXiv 2211.01095, Alg. 2) in data-prediction form.

    The rectified-flow path is a Gaussian path with alpha_t = 1 - t and sigma_t = t, and the data
    prediction is D = x_t - t v. The first step is first order (DDIM), later ones use the
    two-point multistep correction, and the step into t = 0 is first order and returns the data
    prediction exactly (no inf/nan). One NFE per step.

    Order: the grid is uniform in (shifted) t, so in lambda its steps do not shrink near t = 0 and
    t = 1 (lambda runs off to +-inf); the global error behaves like h^2 log(1/h) rather than h^2.
    """
    return _dpm_solver_pp_2m_on_grid(velocity_fn, x1, time_grid(num_steps, shift))


def _dpm_solver_pp_2m_on_grid(velocity_fn: VelocityFn, x1, ts: np.ndarray):
    """DPM-Solver++(2M) on an explicit decreasing grid ts (ts[0] <= 1, ts[-1] == 0)."""
    x1 = jnp.asarray(x1)
    dtype = _work_dtype(x1)
    a, b, c = _dpm_pp_2m_coefficients(ts)
    coefs = tuple(jnp.asarray(arr, dtype) for arr in (ts[:-1], a, b, c))

    def step(carry, coef):
        x, d_prev = carry
        t, a_i, b_i, c_i = coef
        d = x - t * velocity_fn(x, _time_like(x, t))
        x = a_i * x + b_i * (d + c_i * (d - d_prev))
        return (x, d), None

    x = x1.astype(dtype)
    (x, _), _ = jax.lax.scan(step, (x, jnp.zeros_like(x)), coefs)  # c_0 = 0: d_prev unused at i=0
    return x.astype(x1.dtype)


_SOLVERS = {"euler": euler, "heun": heun, "dpm_solver_pp_2m": dpm_solver_pp_2m}


def _check_method(method: str) -> str:
    if method not in _SOLVERS:
        raise ValueError(f"unknown ODE method {method!r}; expected one of {sorted(_SOLVERS)}")
    return method


def solve(velocity_fn: VelocityFn, x1, num_steps: int, method: str = "dpm_solver_pp_2m",
          shift: float = 3.0):
    """Integrates dx/dt = velocity_fn(x, t) from x1 at t = 1 to t = 0 and returns x_0.

    `num_steps`, `method` and `shift` must be static under jit (e.g. via `static_argnames`, or
    closed over as Python values).
    """
    return _SOLVERS[_check_method(method)](velocity_fn, x1, num_steps, shift=shift)


def nfe(method: str, num_steps: int) -> int:
    """Velocity evaluations one solve costs: euler and dpm_solver_pp_2m 1 per step, heun 2 per step
    (its final step also evaluates the corrector at t = 0). With CFG each evaluation is a
    conditional plus an unconditional model pass; that doubling is the caller's to count."""
    num_steps = _check_steps(num_steps)
    return {"euler": 1, "heun": 2, "dpm_solver_pp_2m": 1}[_check_method(method)] * num_steps
