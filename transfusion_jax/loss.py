"""The Transfusion objective: L = L_LM + lambda * L_diffusion.

Reduction (the paper leaves it open; ours):
- L_LM is the mean next-token cross-entropy over every text target in the batch (each token counts
  once, whatever row or document it is in). `batch.text_target_mask` says which positions have one.
- L_diffusion is the MSE of each image (mean over its h * w * c elements), then the mean over the
  used image slots of the batch (each image counts once, whatever its size in tokens).
Either term is 0 when the batch has no text target or no image.
"""

import jax
import jax.numpy as jnp
import optax

from transfusion_jax.batch import Batch, image_slots, text_target_mask
from transfusion_jax.diffusion import Diffusion


def next_token_ce(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """float32 [B, L]: the cross-entropy of the logits at q against the token at q + 1 (the last
    position against 0: mask it)."""
    next_tokens = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    return optax.softmax_cross_entropy_with_integer_labels(logits, next_tokens)


def loss_terms(model, batch: Batch, t: jax.Array, noise: jax.Array, diffusion: Diffusion) -> dict:
    """Unreduced terms for given timesteps t [B, M] and noise [B, M, h, w, c].

    Returns token_ce [B, L] (0 where there is no target), token_mask [B, L], image_mse [B, M]
    (0 for unused slots) and image_mask [B, M].
    """
    noisy, target = diffusion.add_noise(batch.latents, noise, t)
    logits, prediction = model(batch, noisy, t)
    token_mask = text_target_mask(batch.segment_ids, batch.image_ids)
    token_ce = next_token_ce(logits, batch.tokens)
    _, image_mask = image_slots(batch.image_ids, batch.latents.shape[1])
    image_mse = jnp.mean(jnp.square(prediction - target), axis=(2, 3, 4))
    return dict(
        token_ce=jnp.where(token_mask, token_ce, 0.0),
        token_mask=token_mask,
        image_mse=jnp.where(image_mask, image_mse, 0.0),
        image_mask=image_mask,
    )


def after_an_image(segment_ids: jax.Array, image_ids: jax.Array) -> jax.Array:
    """bool [B, L]: positions with an image earlier in their document (a caption after its
    image: the text whose loss says whether the model reads images)."""
    position = jnp.arange(segment_ids.shape[1])[None, :]
    previous = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    doc_start = jax.lax.cummax(jnp.where(segment_ids != previous, position, 0), axis=1)
    last_image = jax.lax.cummax(jnp.where(image_ids >= 0, position, -1), axis=1)
    return last_image >= doc_start


def batch_counts(batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(text targets, images, text targets after an image) of a batch: the denominators of the
    means."""
    targets = text_target_mask(batch.segment_ids, batch.image_ids)
    num_images = jnp.sum(image_slots(batch.image_ids, batch.latents.shape[1])[1])
    after = targets & after_an_image(batch.segment_ids, batch.image_ids)
    return jnp.sum(targets), num_images, jnp.sum(after)


def transfusion_loss(
    model,
    batch: Batch,
    rng: jax.Array,
    diffusion: Diffusion,
    loss_weight: float = 5.0,
    counts: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, dict]:
    """Draws t and the noise, and returns (total loss, metrics for logging).

    `counts` = `batch_counts` of a whole batch when this is one micro-batch of it: the sums are
    divided by the whole batch's counts, so the micro-batch losses add up to the loss of the
    whole batch (each token and each image still counts once). `lm_loss_after_image`, the LM
    loss of the text that follows an image in its document, is logged, not trained on apart.
    """
    t_rng, noise_rng = jax.random.split(rng)
    t = diffusion.sample_timesteps(t_rng, batch.noise_limited)
    noise = jax.random.normal(noise_rng, batch.latents.shape, jnp.float32)
    terms = loss_terms(model, batch, t, noise, diffusion)
    after = after_an_image(batch.segment_ids, batch.image_ids)
    num_tokens = jnp.sum(terms["token_mask"])
    num_images = jnp.sum(terms["image_mask"])
    num_after = jnp.sum(terms["token_mask"] & after)
    token_denominator, image_denominator, after_denominator = counts or (
        num_tokens,
        num_images,
        num_after,
    )
    lm_loss = jnp.sum(terms["token_ce"]) / jnp.maximum(token_denominator, 1)
    diffusion_loss = jnp.sum(terms["image_mse"]) / jnp.maximum(image_denominator, 1)
    lm_after = jnp.sum(jnp.where(after, terms["token_ce"], 0.0)) / jnp.maximum(after_denominator, 1)
    total = lm_loss + loss_weight * diffusion_loss
    metrics = dict(
        loss=total,
        lm_loss=lm_loss,
        diffusion_loss=diffusion_loss,
        lm_loss_after_image=lm_after,
        num_text_targets=num_tokens,
        num_images=num_images,
    )
    return total, metrics
