"""RoPE, patchify and the stacked transformer against independent recomputations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import tiny_config
from transfusion_jax.layers import apply_rope
from transfusion_jax.model_config import ModelSpec
from transfusion_jax.patching import patchify, unpatchify
from transfusion_jax.transformer import Transformer


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

    def score(pq, pk):
        rq = apply_rope(q, jnp.asarray([[pq]]), 10_000.0)
        rk = apply_rope(k, jnp.asarray([[pk]]), 10_000.0)
        return float(jnp.sum(rq * rk))

    for offset in (0, 1, 7, 100):
        scores = [score(p + offset, p) for p in (0, 3, 50, 1000)]
        np.testing.assert_allclose(scores, scores[0], rtol=1e-4, atol=1e-4)
    assert abs(score(5, 0) - score(0, 0)) > 1e-3, "the score must depend on the offset"
    # rotation keeps norms
    np.testing.assert_allclose(
        jnp.linalg.norm(apply_rope(q, jnp.asarray([[42]]), 1e4)), jnp.linalg.norm(q), rtol=1e-5
    )


def test_patchify_is_raster_order_of_windows():
    x = np.arange(4 * 6 * 3).reshape(4, 6, 3).astype(np.float32)
    p = np.asarray(patchify(jnp.asarray(x), 2))
    assert p.shape == (6, 12)
    for i in range(2):
        for j in range(3):
            np.testing.assert_array_equal(
                p[i * 3 + j], x[2 * i : 2 * i + 2, 2 * j : 2 * j + 2].ravel()
            )
    np.testing.assert_array_equal(unpatchify(jnp.asarray(p), 2, 4, 6, 3), x)


def unrolled(transformer, x, positions, mask):
    """The same blocks applied one by one in a Python loop (independent of scan and remat)."""
    graphdef, stacked = nnx.split(transformer.blocks)
    for i in range(jax.tree.leaves(stacked)[0].shape[0]):
        block = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], stacked))
        x, _ = block(x, positions, mask)
    return transformer.final_norm(x)


@pytest.mark.parametrize("policy", ["none", "full", "dots_with_no_batch_dims"])
def test_scanned_layers_equal_a_python_loop(policy):
    cfg = tiny_config(model__remat_policy=policy, model__num_kv_heads=2)
    spec = ModelSpec.from_config(cfg).transformer
    transformer = Transformer(spec, nnx.Rngs(1))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 12, spec.d_model)), jnp.float32)
    positions = jnp.tile(jnp.arange(12), (2, 1))
    mask = jnp.tril(jnp.ones((2, 12, 12), bool))
    np.testing.assert_allclose(
        transformer(x, positions, mask),
        unrolled(transformer, x, positions, mask),
        atol=1e-5,
        rtol=1e-5,
    )

    def loss(t):
        return jnp.sum(t(x, positions, mask) ** 2)

    grads = nnx.grad(loss)(transformer)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
