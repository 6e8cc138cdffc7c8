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


def loss_terms(model, batch: Batch, t: jax.Array, noise: jax.Array, diffusion: Diffusion) -> dict:
    """Unreduced terms for given timesteps t [B, M] and noise [B, M, h, w, c].

    Returns token_ce [B, L] (0 where there is no target), token_mask [B, L], image_mse [B, M]
    (0 for unused slots) and image_mask [B, M].
    """
    noisy, target = diffusion.add_noise(batch.latents, noise, t)
    logits, prediction = model(batch, noisy, t)
    token_mask = text_target_mask(batch.segment_ids, batch.image_ids)
    next_tokens = jnp.pad(batch.tokens[:, 1:], ((0, 0), (0, 1)))
    token_ce = optax.softmax_cross_entropy_with_integer_labels(logits, next_tokens)
    _, image_mask = image_slots(batch.image_ids, batch.latents.shape[1])
    image_mse = jnp.mean(jnp.square(prediction - target), axis=(2, 3, 4))
    return dict(
        token_ce=jnp.where(token_mask, token_ce, 0.0),
        token_mask=token_mask,
        image_mse=jnp.where(image_mask, image_mse, 0.0),
        image_mask=image_mask,
    )


def batch_counts(batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(text targets, images) of a batch: the denominators of the two means."""
    num_tokens = jnp.sum(text_target_mask(batch.segment_ids, batch.image_ids))
    num_images = jnp.sum(image_slots(batch.image_ids, batch.latents.shape[1])[1])
    return num_tokens, num_images


def transfusion_loss(
    model,
    batch: Batch,
    rng: jax.Array,
    diffusion: Diffusion,
    loss_weight: float = 5.0,
    counts: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, dict]:
    """Draws t and the noise, and returns (total loss, metrics for logging).

    `counts` = (text targets, images) of a whole batch when this is one micro-batch of it: the
    sums are divided by the whole batch's counts, so the micro-batch losses add up to the loss
    of the whole batch (each token and each image still counts once).
    """
    t_rng, noise_rng = jax.random.split(rng)
    t = diffusion.sample_timesteps(t_rng, batch.noise_limited)
    noise = jax.random.normal(noise_rng, batch.latents.shape, jnp.float32)
    terms = loss_terms(model, batch, t, noise, diffusion)
    num_tokens = jnp.sum(terms["token_mask"])
    num_images = jnp.sum(terms["image_mask"])
    token_denominator, image_denominator = counts or (num_tokens, num_images)
    lm_loss = jnp.sum(terms["token_ce"]) / jnp.maximum(token_denominator, 1)
    diffusion_loss = jnp.sum(terms["image_mse"]) / jnp.maximum(image_denominator, 1)
    total = lm_loss + loss_weight * diffusion_loss
    metrics = dict(
        loss=total,
        lm_loss=lm_loss,
        diffusion_loss=diffusion_loss,
        num_text_targets=num_tokens,
        num_images=num_images,
    )
    return total, metrics
