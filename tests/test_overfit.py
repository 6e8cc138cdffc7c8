"""End to end: a tiny model memorises one fixed batch (fixed t and noise) in a few hundred steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests.helpers import random_batch, tiny_config
from transfusion_jax.diffusion import Diffusion
from transfusion_jax.loss import transfusion_loss
from transfusion_jax.model import Transfusion


@pytest.mark.parametrize("kind", ["linear", "unet"])
def test_tiny_model_overfits_one_batch(kind):
    cfg = tiny_config(patch__kind=kind, image__latent_size=8)
    model = Transfusion(cfg, nnx.Rngs(0))
    batch = jax.tree.map(jnp.asarray, random_batch(np.random.default_rng(0), cfg, 2, 64))
    diffusion = Diffusion()
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    rng = jax.random.key(0)  # the same t and noise every step: a memorisable target

    @nnx.jit
    def step(model, optimizer):
        (loss, metrics), grads = nnx.value_and_grad(
            lambda m: transfusion_loss(m, batch, rng, diffusion), has_aux=True
        )(model)
        optimizer.update(model, grads)
        return metrics

    first = step(model, optimizer)
    for _ in range(150):
        last = step(model, optimizer)
    for key in ("lm_loss", "diffusion_loss"):
        assert float(last[key]) < 0.1 * float(first[key]), (key, first[key], last[key])
