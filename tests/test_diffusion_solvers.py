"""The samplers against an independent reference: the exact optimal predictor of Gaussian data.

For x0 ~ N(mu, s^2) elementwise and x_t = a x0 + b eps, the posterior is Gaussian and
E[eps | x_t] = b (x_t - a mu) / (a^2 s^2 + b^2), E[x0 | x_t] = mu + a s^2 (x_t - a mu) / (same),
so a correct sampler driven by it must return samples of N(mu, s^2). Tolerances are 4 standard
errors of the sample statistic plus a stated discretisation allowance on the std. Every sampler
here under-disperses (DDPM most: its "fixed small" variance omits the uncertainty of x0), so the
allowance is one-sided: the std may fall short of s by 2 (1 + s) / num_steps for first-order
samplers (DDPM, DDIM, Euler) and 5 (1 + s) / num_steps^2 for Heun (the biases measured on 2M
samples are at most 70% of that), never exceed it. The mean is exact in expectation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transfusion_jax.diffusion import Diffusion
from transfusion_jax.diffusion_solvers import (
    ddim_sample,
    ddpm_sample,
    euler_sample,
    guided,
    heun_sample,
    respaced_timesteps,
    sample,
)

EPS = Diffusion(objective="epsilon")
FLOW = Diffusion(objective="flow")
N = 20_000
# Scalar case: every element from N(0.7, 0.4^2). Vector case: 4 dimensions with their own mu, s.
CASES = {
    "scalar": (np.float32(0.7), np.float32(0.4), (N,)),
    "vector": (
        np.array([-1.0, 0.0, 0.5, 2.0], np.float32),
        np.array([0.1, 0.5, 1.0, 1.5], np.float32),
        (N // 4, 4),
    ),
}


def gaussian_predictor(diffusion, mu, s):
    """Exact eps (epsilon) or velocity eps - x0 (flow) for x0 ~ N(mu, s^2)."""

    def predict(x_t, t):
        if diffusion.objective == "epsilon":
            a, b = diffusion.coefficients(t.astype(jnp.int32))  # t holds integer values
        else:
            sigma = (t + 1.0) / diffusion.num_timesteps  # own closed form, fractional t allowed
            a, b = 1.0 - sigma, sigma
        var = a**2 * s**2 + b**2
        eps = b * (x_t - a * mu) / var
        x0 = mu + a * s**2 * (x_t - a * mu) / var
        return eps if diffusion.objective == "epsilon" else eps - x0

    return predict


def noise(shape, seed=1):
    return jax.random.normal(jax.random.key(seed), shape)


def run(method, case, num_steps, seed=2, **kw):
    mu, s, shape = CASES[case]
    diffusion = FLOW if method in ("euler", "heun") else EPS
    predict = gaussian_predictor(diffusion, mu, s)
    x = sample(predict, noise(shape), jax.random.key(seed), diffusion, method, num_steps, **kw)
    return np.asarray(x, np.float64)


def moment_errors(x, mu, s):
    """mean - mu and std - s per dimension, with 4 standard errors of each."""
    n = x.shape[0]
    return x.mean(0) - mu, x.std(0) - s, 4 * s / np.sqrt(n), 4 * s / np.sqrt(2 * n)


@pytest.mark.parametrize("case", ["scalar", "vector"])
@pytest.mark.parametrize(
    "method, num_steps, kw, order",
    [
        ("ddpm", 250, {}, 1),
        ("ddpm", 50, {}, 1),
        ("ddim", 50, {"eta": 0.0}, 1),
        ("ddim", 50, {"eta": 1.0}, 1),
        ("euler", 100, {}, 1),
        ("heun", 30, {}, 2),
    ],
)
def test_sampler_recovers_gaussian(method, num_steps, kw, order, case):
    mu, s, _ = CASES[case]
    mean_err, std_err, mean_tol, std_tol = moment_errors(run(method, case, num_steps, **kw), mu, s)
    allowance = (2.0 if order == 1 else 5.0) * (1 + s) / num_steps**order
    assert np.all(np.abs(mean_err) < mean_tol), (mean_err, mean_tol)
    assert np.all((-std_tol - allowance < std_err) & (std_err < std_tol)), (
        std_err,
        std_tol,
        allowance,
    )


def test_ddpm_bias_shrinks_with_steps():
    """The std allowance is discretisation: it must fall as steps are added."""
    mu, s, _ = CASES["scalar"]
    err = {k: moment_errors(run("ddpm", "scalar", k), mu, s)[1] for k in (25, 250)}
    assert abs(err[250]) < abs(err[25]) / 3, err


@pytest.mark.parametrize(
    "method, expected",
    [
        ("ddpm", [999, 666, 333, 0]),
        ("ddim", [999, 666, 333, 0]),
        ("euler", [999, 749, 499, 249]),  # sigma = 1, 3/4, 1/2, 1/4: t = sigma * T - 1
        ("heun", [999, 749, 749, 499, 499, 249, 249]),  # last step Euler: never sigma = 0
    ],
)
def test_model_times(method, expected):
    """The times predict sees, on the training scale, as float32 scalars (jit off to read them)."""
    diffusion = FLOW if method in ("euler", "heun") else EPS
    seen = []

    def predict(x_t, t):
        assert t.shape == () and t.dtype == jnp.float32
        seen.append(float(t))
        return 0.01 * x_t

    with jax.disable_jit():
        sample(predict, noise((4,)), jax.random.key(0), diffusion, method, 4)
    assert seen == expected


@pytest.mark.parametrize("method, kw", [("ddpm", {}), ("ddim", {}), ("ddim", {"eta": 1.0})])
def test_clip_x0(method, kw):
    """The last step returns the clipped x0, so the clip bounds the output; a loose one is inert."""
    free = run(method, "scalar", 20, **kw)
    np.testing.assert_allclose(run(method, "scalar", 20, clip_x0=100.0, **kw), free, atol=1e-5)
    clipped = run(method, "scalar", 20, clip_x0=0.5, **kw)
    assert np.abs(clipped).max() <= 0.5 and np.mean(clipped == 0.5) > 0.1


def test_ddim_eta0_is_deterministic():
    a, b = run("ddim", "scalar", 20, seed=2), run("ddim", "scalar", 20, seed=3)
    np.testing.assert_array_equal(a, b)


def test_ddim_eta1_is_ddpm():
    """Same sigma^2 = beta_tilde and the same per-step keys: the same path, up to rounding; with
    other keys, the same distribution (two samples, so sqrt(2) x the standard errors)."""
    ddpm = run("ddpm", "scalar", 50)
    np.testing.assert_allclose(run("ddim", "scalar", 50, eta=1.0), ddpm, atol=2e-4)
    other = run("ddim", "scalar", 50, seed=7, eta=1.0)
    mean_tol, std_tol = moment_errors(ddpm, *CASES["scalar"][:2])[2:]
    assert abs(other.mean() - ddpm.mean()) < np.sqrt(2) * mean_tol
    assert abs(other.std() - ddpm.std()) < np.sqrt(2) * std_tol


def test_heun_beats_euler_at_equal_steps():
    """The exact flow map of Gaussian data is x0 = mu + s x_T; Heun is 2nd order, Euler 1st."""
    mu, s, shape = CASES["vector"]
    exact = mu + s * np.asarray(noise(shape))
    err = {m: np.abs(run(m, "vector", 10) - exact).max() for m in ("euler", "heun")}
    assert err["heun"] < err["euler"] / 3, err


@pytest.mark.parametrize("method", ["ddpm", "euler"])
def test_wrong_predictor_gives_wrong_mean(method):
    """A predictor for mu = -0.5 must not pass as the mu = 0.7 one: the test can fail."""
    mu, s, shape = CASES["scalar"]
    diffusion = FLOW if method == "euler" else EPS
    wrong = gaussian_predictor(diffusion, np.float32(-0.5), s)
    x = np.asarray(sample(wrong, noise(shape), jax.random.key(2), diffusion, method, 50))
    assert abs(x.mean() - mu) > 1.0
    assert abs(x.mean() + 0.5) < 0.02


def test_guided():
    def uncond_raises(x_t, t):
        raise AssertionError("the unconditional branch ran at scale 1")

    cond = lambda x_t, t: 2.0 * x_t + t
    uncond = lambda x_t, t: x_t - t
    assert guided(cond, uncond_raises, 1.0) is cond
    assert guided(cond, uncond_raises, 1) is cond
    x, t = jnp.arange(6.0).reshape(2, 3), jnp.float32(3.0)
    c, u = cond(x, t), uncond(x, t)
    for scale in (0.0, 3.0, 7.5):
        np.testing.assert_allclose(guided(cond, uncond, scale)(x, t), u + scale * (c - u))


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_fixed_seed_reproduces(method):
    kw = {"eta": 1.0} if method == "ddim" else {}
    a, b = run(method, "scalar", 10, seed=5, **kw), run(method, "scalar", 10, seed=5, **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, run(method, "scalar", 10, seed=6, **kw))


@pytest.mark.parametrize(
    "T, k", [(1000, 250), (1000, 50), (1000, 1000), (1000, 999), (10, 2), (7, 3)]
)
def test_respaced_timesteps(T, k):
    ts = respaced_timesteps(T, k)
    assert ts.shape == (k,) and np.issubdtype(ts.dtype, np.integer)
    assert ts[0] == T - 1 and ts[-1] == 0
    assert np.all(np.diff(ts) < 0) and len(np.unique(ts)) == k
    stride = (T - 1) / (k - 1)
    assert np.all(np.abs(-np.diff(ts) - stride) <= 1)  # evenly spaced up to rounding


@pytest.mark.parametrize("k", [0, 1, 1001])
def test_respaced_timesteps_rejects_bad_counts(k):
    with pytest.raises(ValueError, match="num_steps"):
        respaced_timesteps(1000, k)


@pytest.mark.parametrize(
    "method, calls_per_trace", [("ddpm", 1), ("ddim", 1), ("euler", 1), ("heun", 3)]
)
def test_samplers_jit_and_trace_once(method, calls_per_trace):
    """Under jit with a static num_steps, predict is traced a fixed number of times (no Python
    loop over the 40 steps) and a second call with new values does not retrace."""
    diffusion = FLOW if method in ("euler", "heun") else EPS
    exact = gaussian_predictor(diffusion, 0.7, 0.4)
    traces = []

    def predict(x_t, t):
        traces.append(t.dtype)
        return exact(x_t, t)

    jitted = jax.jit(
        functools.partial(sample, predict, diffusion=diffusion, method=method),
        static_argnames="num_steps",
    )
    x1 = jitted(noise((64,), 1), jax.random.key(1), num_steps=40)
    assert len(traces) == calls_per_trace and all(dtype == jnp.float32 for dtype in traces)
    x2 = jitted(noise((64,), 2), jax.random.key(2), num_steps=40)
    assert len(traces) == calls_per_trace
    assert np.all(np.isfinite(x1)) and not np.array_equal(x1, x2)


def test_wrong_objective_and_method_raise():
    predict = gaussian_predictor(EPS, 0.7, 0.4)
    x, key = noise((8,)), jax.random.key(0)
    with pytest.raises(ValueError, match="epsilon"):
        ddpm_sample(predict, x, key, FLOW)
    with pytest.raises(ValueError, match="epsilon"):
        ddim_sample(predict, x, key, FLOW)
    with pytest.raises(ValueError, match="flow"):
        euler_sample(predict, x, EPS)
    with pytest.raises(ValueError, match="flow"):
        heun_sample(predict, x, EPS)
    with pytest.raises(ValueError, match="ddpm, ddim, euler, heun"):
        sample(predict, x, key, EPS, "dpm++", 10)
