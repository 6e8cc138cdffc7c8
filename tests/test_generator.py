"""KV-cached generation against the training forward pass run on the whole sequence."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import SPECIAL, tiny_config
from transfusion_jax import diffusion_solvers
from transfusion_jax.batch import Image, build_batch
from transfusion_jax.diffusion import Diffusion
from transfusion_jax.generator import (
    Generator,
    SamplingOptions,
    predict_image,
    uncached_image_predictor,
)
from transfusion_jax.model import Transfusion

SHAPE = (8, 8, 4)  # 16 patches of 2x2


@functools.cache
def make_setup(kind, image_attention="bidirectional"):
    cfg = tiny_config(patch__kind=kind, image__latent_size=8)
    cfg.model.image_attention = image_attention
    model = Transfusion(cfg, nnx.Rngs(0))
    # The time conditioning must matter for the test to mean anything.
    assert np.abs(np.asarray(model.patching.time.fc2.kernel[...])).sum() > 0
    return model, Generator(model, Diffusion(), SPECIAL, SHAPE)


@pytest.fixture(
    params=[("linear", "bidirectional"), ("unet", "bidirectional"), ("linear", "causal")],
    ids=lambda p: "-".join(p),
)
def setup(request):
    """Both patch layers, and causal image attention (model.image_attention): for the tests that
    compare the cached path with the full forward."""
    return make_setup(*request.param)


@pytest.fixture
def linear_setup():
    return make_setup("linear")


def reference_batch(prefix, given, generated, tail=()):
    """The whole sequence as the training path sees it: `prefix`, the given image, BOI, the
    generated image, EOI, then `tail`."""
    doc = [list(prefix), Image(given), [], Image(generated), list(tail)]
    doc = [part for part in doc if not (isinstance(part, list) and not part)]
    batch = build_batch([[doc]], 80, 2, SHAPE, 2, SPECIAL)
    return jax.tree.map(jnp.asarray, batch)


def test_cached_image_prediction_equals_the_full_forward(setup):
    model, gen = setup
    rng = np.random.default_rng(0)
    given = rng.normal(size=SHAPE).astype(np.float32)
    prompt = [SPECIAL.bos, 10, 11]
    ctx = gen.start([prompt], capacity=64)
    ctx = gen.add_image(ctx, given[None])
    ctx = gen.add_tokens(ctx, [[SPECIAL.boi]])
    batch = reference_batch(prompt, given, np.zeros(SHAPE, np.float32))
    reference = uncached_image_predictor(model, batch, slot=1)
    for t in (0.0, 250.0, 999.0):
        x_t = jnp.asarray(rng.normal(size=(1, *SHAPE)), jnp.float32)
        cached = predict_image(model, ctx, x_t, jnp.full((1,), t))
        np.testing.assert_allclose(cached, reference(x_t, t), atol=2e-4, rtol=2e-4)
    # ...and the time conditioning is live: a different t changes the prediction.
    a = predict_image(model, ctx, x_t, jnp.full((1,), 10.0))
    assert float(jnp.abs(a - predict_image(model, ctx, x_t, jnp.full((1,), 900.0))).max()) > 1e-3


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_cached_generation_equals_uncached(setup, cfg_scale):
    """Image (DDPM, 4 steps, guidance) then greedy text: identical to the uncached reference."""
    model, gen = setup
    rng = np.random.default_rng(1)
    given = rng.normal(size=SHAPE).astype(np.float32)
    prompt = [SPECIAL.bos, 10, 11]
    options = SamplingOptions(max_new_tokens=6, steps=4, cfg_scale=cfg_scale, max_images=1)
    key = jax.random.key(3)

    ctx = gen.start([prompt], capacity=80)
    ctx = gen.add_image(ctx, given[None])
    ctx = gen.add_tokens(ctx, [[SPECIAL.boi]])
    ctx, image = gen.generate_image(ctx, key, options)

    # Reference: the same sampler and noise, every prediction by the full forward pass.
    cond = uncached_image_predictor(model, reference_batch(prompt, given, given), slot=1)
    # the unconditional branch: BOS BOI [image], the dropped-caption training context
    uncond_batch = build_batch([[[[SPECIAL.bos], Image(given)]]], 80, 2, SHAPE, 2, SPECIAL)
    uncond = uncached_image_predictor(model, jax.tree.map(jnp.asarray, uncond_batch), slot=0)
    noise_key, sample_key = jax.random.split(key)
    x_T = jax.random.normal(noise_key, (1, *SHAPE), jnp.float32)
    expected = diffusion_solvers.sample(
        diffusion_solvers.guided(cond, uncond, cfg_scale), x_T, sample_key, Diffusion(), "ddpm", 4
    )
    # Untrained weights make |x| reach 1e4 here, so compare relative to the largest value.
    assert float(jnp.abs(image - expected).max() / jnp.abs(expected).max()) < 1e-5

    # Greedy text after EOI: cached decoding vs argmax of the full forward, token by token.
    ctx, out, count, _ = gen._decode(
        gen.params, ctx, jax.random.key(0), jnp.asarray([6]), options=options
    )
    cached_text = np.asarray(out)[0, : int(count[0])].tolist()
    tail = []  # build_batch writes the EOI after the image itself
    for _ in range(len(cached_text)):
        batch = reference_batch(prompt, given, np.asarray(image[0]), tail)
        logits, _ = model(batch, batch.latents, jnp.zeros((1, 2)))
        last = int(np.flatnonzero(np.asarray(batch.segment_ids[0]))[-1])
        scores = np.where(np.asarray(gen.vocab_mask), np.asarray(logits[0, last]), -np.inf)
        tail.append(int(np.argmax(scores)))
    assert cached_text == tail


def test_guidance_at_scale_one_is_the_conditional_sampler(linear_setup):
    model, gen = linear_setup
    ctx = gen.add_tokens(gen.start([[SPECIAL.bos, 12]], 64), [[SPECIAL.boi]])
    options = SamplingOptions(steps=3, cfg_scale=1.0, sampler="ddim")
    _, image = gen.generate_image(ctx, jax.random.key(5), options)
    noise_key, sample_key = jax.random.split(jax.random.key(5))
    x_T = jax.random.normal(noise_key, (1, *SHAPE), jnp.float32)

    def cond(x, t):
        return predict_image(model, ctx, x, jnp.full((1,), t))

    expected = diffusion_solvers.sample(cond, x_T, sample_key, Diffusion(), "ddim", 3)
    np.testing.assert_allclose(image, expected, atol=1e-5)


def test_fixed_seeds_reproduce_and_batches_are_independent(linear_setup):
    _, gen = linear_setup
    options = SamplingOptions(max_new_tokens=4, steps=3, cfg_scale=2.0)
    prompts = [[SPECIAL.bos, 10], [SPECIAL.bos, 20, 21, 22]]
    a = gen.generate(prompts, jax.random.key(0), options, force_image=True)
    b = gen.generate(prompts, jax.random.key(0), options, force_image=True)
    c = gen.generate(prompts, jax.random.key(1), options, force_image=True)
    assert a.tokens == b.tokens
    np.testing.assert_array_equal(a.images[0][0], b.images[0][0])
    assert np.abs(a.images[0][0] - c.images[0][0]).max() > 1e-3
    assert all(row[0] == SPECIAL.boi and SPECIAL.eoi in row for row in a.tokens)
    # Ragged prompts: a row's context in a batch equals the row's context alone.
    ctx_batch = gen.start(prompts, 64)
    ctx_alone = gen.start(prompts[1:], 64)
    np.testing.assert_allclose(ctx_batch.logits[1], ctx_alone.logits[0], atol=1e-5)


def test_captioning_returns_text_after_the_given_image(linear_setup):
    _, gen = linear_setup
    images = np.random.default_rng(2).normal(size=(2, *SHAPE)).astype(np.float32)
    result = gen.generate(
        [[SPECIAL.bos]] * 2,
        jax.random.key(0),
        SamplingOptions(max_new_tokens=5, max_images=0),
        images=images,
    )
    assert all(1 <= len(row) <= 5 for row in result.tokens)
    assert result.images == [[], []]


def test_token_sampling_respects_temperature_top_k_and_top_p():
    from transfusion_jax.generator import sample_token

    logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.3, 0.15]]))
    assert int(sample_token(jax.random.key(0), logits, 0.0, 0, 1.0)[0]) == 1  # greedy
    keys = jax.random.split(jax.random.key(1), 4000)
    draw = jax.vmap(
        lambda k, top_k, top_p: sample_token(k, logits, 1.0, top_k, top_p)[0],
        in_axes=(0, None, None),
    )
    for top_k, top_p, allowed, probs in [
        (0, 1.0, {0, 1, 2, 3}, [0.05, 0.5, 0.3, 0.15]),
        (2, 1.0, {1, 2}, [0, 0.5 / 0.8, 0.3 / 0.8, 0]),
        (0, 0.7, {1, 2}, [0, 0.5 / 0.8, 0.3 / 0.8, 0]),  # smallest set with mass >= 0.7
        (1, 1.0, {1}, [0, 1, 0, 0]),
    ]:
        tokens = np.asarray(jax.jit(draw, static_argnums=(1, 2))(keys, top_k, top_p))
        assert set(np.unique(tokens)) == allowed, (top_k, top_p)
        freq = np.bincount(tokens, minlength=4) / len(tokens)
        np.testing.assert_allclose(freq, probs, atol=0.03)


def test_rows_that_ended_stay_ended_while_others_draw_images(linear_setup, monkeypatch):
    """Row 0 ends with EOS while row 1 opens an image: row 0 must get no budget afterwards."""
    _, gen = linear_setup
    budgets = []

    def decode(params, ctx, rng, budget, options):
        budgets.append(np.asarray(budget).tolist())
        out = np.full((2, options.max_new_tokens), -1, np.int32)
        if len(budgets) == 1:
            out[0, :2], out[1, :3] = [30, SPECIAL.eos], [40, 41, SPECIAL.boi]
        else:
            out[1, :1] = [SPECIAL.eos]
        count = (out >= 0).sum(axis=1)
        return ctx, jnp.asarray(out), jnp.asarray(count), jnp.asarray([False, len(budgets) == 1])

    monkeypatch.setattr(gen, "_decode", decode)
    options = SamplingOptions(max_new_tokens=6, max_images=2, steps=2)
    result = gen.generate([[SPECIAL.bos], [SPECIAL.bos]], jax.random.key(0), options)
    assert budgets == [[6, 6], [0, 3]]
    assert result.tokens[0] == [30, SPECIAL.eos]
    assert result.tokens[1] == [40, 41, SPECIAL.boi, SPECIAL.eoi, SPECIAL.eos]
    assert len(result.images[0]) == 0 and len(result.images[1]) == 1


def test_a_full_context_is_refused(linear_setup):
    _, gen = linear_setup
    ctx = gen.start([[SPECIAL.bos, 5, 6]], capacity=4)
    with pytest.raises(ValueError, match="needs 5 positions but holds 4"):
        gen.add_tokens(ctx, [[7, 8]])
