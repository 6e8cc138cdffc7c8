"""Model-agnostic diffusion samplers: DDPM and DDIM ("epsilon"), Euler and Heun ("flow").

The model enters as a pure `predict(x_t, t)`: x_t of any shape, t a float32 scalar on the training
time scale (the index in [0, T); for flow t = sigma * T - 1 may be fractional, which the sinusoidal
timestep embedding accepts). It returns eps for "epsilon" and the velocity eps - x0 for "flow".
Schedules are built on the host in float64 and enter one `lax.scan` as constants, so a sampler
traces once, keeps static shapes and never syncs with the host, whatever the number of steps.
"""

import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from transfusion_jax.diffusion import Diffusion

Predict = Callable[[jax.Array, jax.Array], jax.Array]
METHODS = ("ddpm", "ddim", "euler", "heun")


def respaced_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """`num_steps` evenly spaced int timesteps from T-1 down to 0 (improved-diffusion respacing):
    a short schedule still starts at pure noise and ends on the cleanest step."""
    if not 2 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [2, {num_timesteps}], got {num_steps}")
    stride = (num_timesteps - 1) / (num_steps - 1)  # >= 1, so rounding keeps the steps distinct
    return np.round(np.arange(num_steps) * stride).astype(np.int64)[::-1].copy()


def _check_objective(diffusion: Diffusion, objective: str, sampler: str) -> None:
    if diffusion.objective != objective:
        raise ValueError(
            f"{sampler} needs a model trained with objective {objective!r}, "
            f"got diffusion.objective={diffusion.objective!r}"
        )


def _epsilon_schedule(diffusion: Diffusion, num_steps: int):
    """Respaced timesteps with abar at each step and at the next lower one (1 after the last)."""
    ts = respaced_timesteps(diffusion.num_timesteps, num_steps)
    abar = diffusion.alphas_cumprod[ts]
    return ts, abar, np.append(abar[1:], 1.0)


def _x0_coefficients(ts, abar):
    """Constants for x0 = x_t / sqrt(abar) - sqrt(1 / abar - 1) * eps."""
    return {"t": ts, "rsqrt_abar": 1.0 / np.sqrt(abar), "sqrt_recipm1": np.sqrt(1.0 / abar - 1.0)}


def _constants(coefficients: dict) -> dict:
    return {k: jnp.asarray(v, jnp.float32) for k, v in coefficients.items()}


def _scan(step, x_T: jax.Array, xs, final=None):
    """Run `step` over the schedule (then `final`) in float32 at least; return x_T's dtype."""
    dtype = jnp.promote_types(x_T.dtype, jnp.float32)
    x, _ = jax.lax.scan(lambda x, inp: (step(x, inp).astype(dtype), None), x_T.astype(dtype), xs)
    x = x if final is None else final(x).astype(dtype)
    return x.astype(x_T.dtype)


def _clip(x0: jax.Array, clip_x0: float | None) -> jax.Array:
    return x0 if clip_x0 is None else jnp.clip(x0, -clip_x0, clip_x0)


def ddpm_sample(
    predict: Predict,
    x_T: jax.Array,
    rng: jax.Array,
    diffusion: Diffusion,
    num_steps: int = 250,
    clip_x0: float | None = None,
) -> jax.Array:
    """DDPM ancestral sampling (Ho et al.) on a respaced schedule (Nichol & Dhariwal): each step
    draws x_prev from the posterior q(x_prev | x_t, x0 = predicted x0) with the effective beta
    1 - abar_t / abar_prev of the skipped stretch, so fewer steps remain a valid Markov chain, and
    the "fixed small" variance beta_tilde, which is 0 at the last step (abar_prev = 1)."""
    _check_objective(diffusion, "epsilon", "ddpm_sample")
    ts, abar, abar_prev = _epsilon_schedule(diffusion, num_steps)
    beta = 1.0 - abar / abar_prev
    coef = _constants(
        _x0_coefficients(ts, abar)
        | {
            "c_x0": np.sqrt(abar_prev) * beta / (1.0 - abar),
            "c_xt": np.sqrt(1.0 - beta) * (1.0 - abar_prev) / (1.0 - abar),
            "std": np.sqrt(beta * (1.0 - abar_prev) / (1.0 - abar)),
        }
    )

    def step(x, inputs):
        c, key = inputs
        eps = predict(x, c["t"])
        x0 = _clip(c["rsqrt_abar"] * x - c["sqrt_recipm1"] * eps, clip_x0)
        noise = jax.random.normal(key, x.shape, x.dtype)
        return c["c_x0"] * x0 + c["c_xt"] * x + c["std"] * noise

    return _scan(step, x_T, (coef, jax.random.split(rng, num_steps)))


def ddim_sample(
    predict: Predict,
    x_T: jax.Array,
    rng: jax.Array | None,
    diffusion: Diffusion,
    num_steps: int = 50,
    eta: float = 0.0,
    clip_x0: float | None = None,
) -> jax.Array:
    """DDIM (Song et al.) on a respaced schedule: x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev
    - sigma^2) eps + sigma z with sigma^2 = eta^2 beta_tilde. eta = 0 is the deterministic sampler
    that stays good at few steps (rng unused, may be None); eta = 1 is DDPM ancestral sampling
    again, with the same per-step noise keys, so the same rng gives the same path."""
    _check_objective(diffusion, "epsilon", "ddim_sample")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    ts, abar, abar_prev = _epsilon_schedule(diffusion, num_steps)
    sigma = eta * np.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
    coef = _constants(
        _x0_coefficients(ts, abar)
        | {
            "sqrt_abar": np.sqrt(abar),
            "sqrt_1m_abar": np.sqrt(1.0 - abar),
            "sqrt_abar_prev": np.sqrt(abar_prev),
            "c_eps": np.sqrt(np.maximum(1.0 - abar_prev - sigma**2, 0.0)),
            "sigma": sigma,
        }
    )
    keys = jax.random.split(rng, num_steps) if eta > 0 else jnp.zeros(num_steps)

    def step(x, inputs):
        c, key = inputs
        eps = predict(x, c["t"])
        x0 = c["rsqrt_abar"] * x - c["sqrt_recipm1"] * eps
        if clip_x0 is not None:  # keep eps consistent with the clipped x0
            x0 = _clip(x0, clip_x0)
            eps = (x - c["sqrt_abar"] * x0) / c["sqrt_1m_abar"]
        x = c["sqrt_abar_prev"] * x0 + c["c_eps"] * eps
        if eta > 0:
            x = x + c["sigma"] * jax.random.normal(key, x.shape, x.dtype)
        return x

    return _scan(step, x_T, (coef, keys))


def _flow_schedule(diffusion: Diffusion, num_steps: int):
    """sigma from 1 to 0 in equal steps, the model time t = sigma * T - 1 and the step sizes."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    sigmas = np.linspace(1.0, 0.0, num_steps + 1)
    return sigmas * diffusion.num_timesteps - 1.0, np.diff(sigmas)


def euler_sample(
    predict: Predict, x_T: jax.Array, diffusion: Diffusion, num_steps: int = 50
) -> jax.Array:
    """Euler integration of the rectified-flow ODE dx/dsigma = v from sigma = 1 (noise) to 0:
    first order, one model call per step."""
    _check_objective(diffusion, "flow", "euler_sample")
    ts, dsigma = _flow_schedule(diffusion, num_steps)
    coef = _constants({"t": ts[:-1], "dsigma": dsigma})
    return _scan(lambda x, c: x + c["dsigma"] * predict(x, c["t"]), x_T, coef)


def heun_sample(
    predict: Predict, x_T: jax.Array, diffusion: Diffusion, num_steps: int = 50
) -> jax.Array:
    """Heun's method (2nd order, Karras et al.) for the rectified-flow ODE: average the velocity at
    both ends of each step. The last step is Euler so the model is never asked about sigma = 0,
    a time it was not trained on; 2 * num_steps - 1 model calls."""
    _check_objective(diffusion, "flow", "heun_sample")
    ts, dsigma = _flow_schedule(diffusion, num_steps)
    coef = _constants({"t": ts[:-2], "t_next": ts[1:-1], "dsigma": dsigma[:-1]})

    def step(x, c):
        d1 = predict(x, c["t"])
        d2 = predict(x + c["dsigma"] * d1, c["t_next"])
        return x + c["dsigma"] * 0.5 * (d1 + d2)

    last = _constants({"t": ts[-2], "dsigma": dsigma[-1]})
    return _scan(step, x_T, coef, final=lambda x: x + last["dsigma"] * predict(x, last["t"]))


def guided(predict_cond: Predict, predict_uncond: Predict, scale: float) -> Predict:
    """Classifier-free guidance (Ho & Salimans): uncond + scale * (cond - uncond). A Python scale of
    1 is the conditional prediction itself, so predict_cond comes back and the unconditional pass
    (half the cost) never runs."""
    if isinstance(scale, numbers.Real) and scale == 1:
        return predict_cond

    def predict(x_t, t):
        uncond = predict_uncond(x_t, t)
        return uncond + scale * (predict_cond(x_t, t) - uncond)

    return predict


def sample(
    predict: Predict,
    x_T: jax.Array,
    rng: jax.Array | None,
    diffusion: Diffusion,
    method: str,
    num_steps: int,
    **kw,
) -> jax.Array:
    """One entry point for generation settings: `method` picks the sampler, `kw` its options (eta,
    clip_x0). The ODE samplers are deterministic and ignore rng."""
    if method == "ddpm":
        return ddpm_sample(predict, x_T, rng, diffusion, num_steps, **kw)
    if method == "ddim":
        return ddim_sample(predict, x_T, rng, diffusion, num_steps, **kw)
    if method == "euler":
        return euler_sample(predict, x_T, diffusion, num_steps, **kw)
    if method == "heun":
        return heun_sample(predict, x_T, diffusion, num_steps, **kw)
    raise ValueError(f"unknown sampler {method!r}; valid methods: {', '.join(METHODS)}")
