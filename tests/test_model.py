"""Whole-model behaviour by perturbation: causality, isolation of packed documents, packing
invariance. Each test changes one input and checks which outputs move."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import SPECIAL, latent, tiny_config
from transfusion_jax.batch import Image, build_batch
from transfusion_jax.diffusion import Diffusion
from transfusion_jax.loss import loss_terms
from transfusion_jax.model import Transfusion

SEQ = 96


@pytest.fixture(scope="module", params=["linear", "unet"])
def setup(request):
    cfg = tiny_config(patch__kind=request.param, image__latent_size=8)  # 16 patches per image
    model = Transfusion(cfg, nnx.Rngs(0))
    return cfg, model


def run(model, cfg, rows, t=None):
    s, c = cfg.image.latent_size, cfg.image.latent_channels
    batch = build_batch(rows, SEQ, cfg.image.max_images, (s, s, c), cfg.image.patch_size, SPECIAL)
    batch = jax.tree.map(jnp.asarray, batch)
    if t is None:
        t = jnp.full(batch.noise_limited.shape, 300, jnp.int32)
    logits, prediction = jax.jit(lambda b, x, tt: model(b, x, tt))(batch, batch.latents, t)
    return batch, np.asarray(logits), np.asarray(prediction)


def two_document_rows(cfg, seed=0, caption=(10, 11, 12, 13), tail=(20, 21, 22)):
    """Row: doc 1 = BOS caption BOI image EOI tail EOS; doc 2 = BOS text EOS."""
    rng = np.random.default_rng(seed)
    doc1 = [[SPECIAL.bos, *caption], Image(latent(rng, cfg)), [*tail, SPECIAL.eos]]
    doc2 = [[SPECIAL.bos, 30, 31, 32, SPECIAL.eos]]
    return [[doc1, doc2]]


def changed(a, b):
    return np.abs(a - b).max(axis=-1) > 1e-6


def test_later_text_does_not_change_earlier_outputs(setup):
    cfg, model = setup
    _, logits_a, pred_a = run(model, cfg, two_document_rows(cfg))
    batch, logits_b, pred_b = run(model, cfg, two_document_rows(cfg, tail=(20, 99, 22)))
    moved = changed(logits_a[0], logits_b[0])
    first_changed = int(np.argmax(np.asarray(batch.tokens[0]) == 99))
    assert not moved[:first_changed].any(), "an earlier position saw a later token"
    assert moved[first_changed], "the changed token itself must matter"
    np.testing.assert_array_equal(pred_a, pred_b)  # the image precedes the change


def test_later_patch_changes_earlier_patches_of_its_image(setup):
    cfg, model = setup
    rows = two_document_rows(cfg)
    _, logits_a, pred_a = run(model, cfg, rows)
    image = rows[0][0][1]
    perturbed = image.latent.copy()
    perturbed[-2:, -2:] += 1.0  # the last patch (raster order) of the image
    rows[0][0][1] = Image(perturbed)
    batch, logits_b, pred_b = run(model, cfg, rows)
    image_pos = np.flatnonzero(np.asarray(batch.image_ids[0]) == 0)
    moved = changed(logits_a[0], logits_b[0])
    assert moved[image_pos[0]], "the first patch must see the last one (bidirectional)"
    assert not moved[: image_pos[0]].any(), "text before the image must not see it"
    # the first patch's prediction changes too (U-Net convs aside, through attention)
    assert np.abs(pred_a[0, 0, :2, :2] - pred_b[0, 0, :2, :2]).max() > 1e-6


@pytest.mark.parametrize("image_attention", ["bidirectional", "causal"])
def test_image_attention_decides_whether_earlier_patches_see_later_ones(image_attention):
    """model.image_attention: with "causal" the last patch of an image changes no output at an
    earlier patch (hidden state, logits, diffusion prediction); with "bidirectional" it does.
    Linear patching only: a U-Net encoder and decoder mix neighbouring patches by convolution."""
    cfg = tiny_config(image__latent_size=8, model__image_attention=image_attention)
    model = Transfusion(cfg, nnx.Rngs(0))
    rows = two_document_rows(cfg)
    _, logits_a, pred_a = run(model, cfg, rows)
    perturbed = rows[0][0][1].latent.copy()
    perturbed[-2:, -2:] += 1.0  # the last patch (raster order) of the image
    rows[0][0][1] = Image(perturbed)
    batch, logits_b, pred_b = run(model, cfg, rows)
    image_pos = np.flatnonzero(np.asarray(batch.image_ids[0]) == 0)
    k, g = cfg.image.patch_size, cfg.image.latent_size // cfg.image.patch_size

    def patches(p):  # the first image's prediction per patch, raster order: [N, k * k * c]
        return p[0, 0].reshape(g, k, g, k, -1).transpose(0, 2, 1, 3, 4).reshape(g * g, -1)

    pred_moved = changed(patches(pred_a), patches(pred_b))
    logits_moved = changed(logits_a[0], logits_b[0])
    assert pred_moved[-1] and logits_moved[image_pos[-1]], "the changed patch itself must matter"
    assert not logits_moved[: image_pos[0]].any(), "text before the image must not see it"
    if image_attention == "causal":
        assert not pred_moved[:-1].any(), "an earlier patch saw a later one"
        assert not logits_moved[image_pos[:-1]].any()
    else:
        assert pred_moved[:-1].all(), "every patch sees the whole image"
        assert logits_moved[image_pos].all()


def test_image_changes_the_text_after_it_and_nothing_in_other_documents(setup):
    cfg, model = setup
    rows = two_document_rows(cfg)
    batch, logits_a, _ = run(model, cfg, rows)
    rows[0][0][1] = Image(rows[0][0][1].latent + 0.5)
    _, logits_b, _ = run(model, cfg, rows)
    moved = changed(logits_a[0], logits_b[0])
    seg, img = np.asarray(batch.segment_ids[0]), np.asarray(batch.image_ids[0])
    after_image = np.flatnonzero((seg == 1) & (np.arange(SEQ) > np.flatnonzero(img == 0)[-1]))
    assert moved[after_image].all(), "text after the image must see it"
    assert not moved[seg == 2].any(), "another document must not see it"


def test_other_document_changes_nothing_in_this_one(setup):
    cfg, model = setup
    rows = two_document_rows(cfg)
    batch, logits_a, pred_a = run(model, cfg, rows)
    rows[0][1] = [[SPECIAL.bos, 77, 78, 79, 80, 81, SPECIAL.eos]]  # longer, other tokens
    _, logits_b, pred_b = run(model, cfg, rows)
    seg = np.asarray(batch.segment_ids[0])
    np.testing.assert_allclose(logits_a[0, seg == 1], logits_b[0, seg == 1], atol=1e-5)
    np.testing.assert_allclose(pred_a, pred_b, atol=1e-5)


def test_packing_invariance_of_outputs_and_losses(setup):
    """A document's token losses and image loss are the same alone and packed behind others."""
    cfg, model = setup
    rng = np.random.default_rng(3)
    target_doc = [[SPECIAL.bos, 40, 41], Image(latent(rng, cfg)), [42, 43, SPECIAL.eos]]
    other_doc = [[SPECIAL.bos, 50], Image(latent(rng, cfg)), [51, SPECIAL.eos]]
    noise_doc = rng.normal(size=(cfg.image.latent_size,) * 2 + (cfg.image.latent_channels,))
    noise_other = rng.normal(size=noise_doc.shape)
    diffusion = Diffusion()
    s, c = cfg.image.latent_size, cfg.image.latent_channels
    shape = (s, s, c)

    def terms(rows, noises, ts):
        batch = build_batch(rows, SEQ, 2, shape, cfg.image.patch_size, SPECIAL)
        batch = jax.tree.map(jnp.asarray, batch)
        noise = np.zeros(batch.latents.shape, np.float32)
        noise[0, : len(noises)] = noises
        t = jnp.asarray([ts + [0] * (2 - len(ts))], jnp.int32)
        out = jax.jit(lambda b, tt, n: loss_terms(model, b, tt, n, diffusion))(
            batch, t, jnp.asarray(noise)
        )
        return batch, jax.tree.map(np.asarray, out)

    alone_batch, alone = terms([[target_doc]], [noise_doc], [123])
    packed_batch, packed = terms([[other_doc, target_doc]], [noise_other, noise_doc], [700, 123])
    alone_positions = np.asarray(alone_batch.segment_ids[0]) == 1
    packed_positions = np.asarray(packed_batch.segment_ids[0]) == 2
    np.testing.assert_allclose(
        alone["token_ce"][0, alone_positions],
        packed["token_ce"][0, packed_positions],
        rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_array_equal(
        alone["token_mask"][0, alone_positions], packed["token_mask"][0, packed_positions]
    )
    np.testing.assert_allclose(alone["image_mse"][0, 0], packed["image_mse"][0, 1], rtol=1e-5)
    assert alone["image_mask"].tolist() == [[True, False]]
