"""The noise schedule against its closed form, the objectives against a perfect predictor, and
timestep sampling with noise limiting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from tests.helpers import SPECIAL
from transfusion_jax.batch import Image, build_batch
from transfusion_jax.diffusion import Diffusion, cosine_alphas_cumprod
from transfusion_jax.loss import loss_terms, transfusion_loss


def test_cosine_schedule_matches_closed_form():
    T, s = 1000, 0.008
    abar = cosine_alphas_cumprod(T)
    f = np.cos((np.arange(T + 1) / T + s) / (1 + s) * np.pi / 2) ** 2
    closed = f[1:] / f[0]  # abar(t) = f(t) / f(0), paper index t+1
    # Only the last beta (f(T) = 0 gives beta = 1) is clipped to 0.999.
    np.testing.assert_allclose(abar[:-1], closed[:-1], rtol=1e-10)
    np.testing.assert_allclose(abar[-1], abar[-2] * (1 - 0.999), rtol=1e-10)
    assert np.all(np.diff(abar) < 0) and 0.999 < abar[0] < 1


@pytest.mark.parametrize("objective", ["epsilon", "flow"])
def test_add_noise_coefficients(objective):
    d = Diffusion(objective=objective)
    t = jnp.asarray([[0, 499, 999]])
    x0 = jnp.ones((1, 3, 2, 2, 1)) * 2.0
    eps = jnp.ones((1, 3, 2, 2, 1)) * -1.0
    x_t, target = d.add_noise(x0, eps, t)
    if objective == "epsilon":
        abar = cosine_alphas_cumprod(1000)[[0, 499, 999]]
        expected = 2 * np.sqrt(abar) - np.sqrt(1 - abar)
        np.testing.assert_allclose(target, eps)
    else:
        sigma = np.array([1, 500, 1000]) / 1000
        expected = 2 * (1 - sigma) - sigma
        np.testing.assert_allclose(target, eps - x0)
    np.testing.assert_allclose(x_t[0, :, 0, 0, 0], expected, rtol=1e-6)


@pytest.mark.parametrize("objective", ["epsilon", "flow"])
def test_loss_is_zero_for_a_perfect_predictor(objective):
    """A 'model' that inverts the forward process from the clean latent gets zero diffusion loss."""
    d = Diffusion(objective=objective)
    rng = np.random.default_rng(0)
    latents = [rng.normal(size=(4, 4, 2)).astype(np.float32) for _ in range(3)]
    rows = [
        [[[1, 5], Image(latents[0]), [2]], [[1], Image(latents[1]), [6, 2]]],
        [[[1, 7], Image(latents[2]), [2]]],
    ]
    batch = jax.tree.map(jnp.asarray, build_batch(rows, 40, 2, (4, 4, 2), 2, SPECIAL))

    def perfect(b, noisy, t):
        a, s = d.coefficients(t)
        a, s = a[..., None, None, None], s[..., None, None, None]
        eps = (noisy - a * b.latents) / s
        prediction = eps if objective == "epsilon" else eps - b.latents
        return jnp.zeros(b.tokens.shape + (16,)), prediction

    t = jnp.asarray([[10, 900], [500, 0]])
    noise = jnp.asarray(rng.normal(size=batch.latents.shape), jnp.float32)
    terms = loss_terms(perfect, batch, t, noise, d)
    assert terms["image_mask"].tolist() == [[True, True], [True, False]]
    np.testing.assert_allclose(terms["image_mse"], 0.0, atol=1e-8)
    _, metrics = transfusion_loss(perfect, batch, jax.random.key(1), d)
    assert float(metrics["diffusion_loss"]) < 1e-8 and float(metrics["num_images"]) == 3
    # ...while predicting zeros costs E[target^2] > 0: the check can fail.
    zero = lambda b, x, tt: (jnp.zeros(b.tokens.shape + (16,)), jnp.zeros_like(x))
    assert float(transfusion_loss(zero, batch, jax.random.key(1), d)[1]["diffusion_loss"]) > 0.5


def test_noise_limited_images_draw_small_timesteps():
    d = Diffusion(num_timesteps=1000, noise_limit=500)
    flags = jnp.asarray(np.arange(20000).reshape(100, 200) % 2 == 0)
    t = np.asarray(d.sample_timesteps(jax.random.key(0), flags))
    limited, free = t[np.asarray(flags)], t[~np.asarray(flags)]
    assert limited.min() >= 0 and limited.max() == 499
    assert free.max() == 999 and free.min() == 0
    assert abs(limited.mean() - 249.5) < 5 and abs(free.mean() - 499.5) < 10


def test_logit_normal_timesteps_follow_their_closed_form_cdf():
    """t = floor(sigmoid(n) * high), n ~ N(0, 1): P(t < k) = Phi(logit(k / high)), for the free
    range and the noise-limited one."""
    d = Diffusion(num_timesteps=1000, noise_limit=500, timestep_sampling="logit_normal")
    flags = np.arange(40000).reshape(200, 200) % 2 == 0
    t = np.asarray(d.sample_timesteps(jax.random.key(1), jnp.asarray(flags)))
    for drawn, high in ((t[~flags], 1000), (t[flags], 500)):
        assert drawn.min() >= 0 and drawn.max() < high
        k = np.array([0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95]) * high
        expected = stats.norm.cdf(special.logit(k / high))
        empirical = (drawn[:, None] < k).mean(0)
        np.testing.assert_allclose(empirical, expected, atol=0.015)  # 20000 draws: sd <= 0.0035
    # Against uniform: the middle noise levels are drawn about 1.5 times as often.
    middle = ((t[~flags] >= 400) & (t[~flags] < 600)).mean()
    assert 0.28 < middle < 0.34  # Phi(logit(.6)) - Phi(logit(.4)) = 0.315; uniform: 0.2
