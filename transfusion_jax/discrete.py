"""Images as discrete tokens: the Chameleon baseline on the same transformer.

A discrete run (`model.image_repr = "discrete"`) reads the same packed rows as a Transfusion run:
each image is `BOI`, N positions, `EOI`, in caption-first or image-first documents with the same
80/20 order and caption drop; the image slots carry pixels. The train step turns every slot into
the VQ tokenizer's code ids (one id per patch_size x patch_size window, so N = codes per image),
writes code c at its position as token `image_token_offset + c`, and marks every position as text.
From there it is a language model: causal attention everywhere and the next-token loss over every
target, text and image alike (`discrete_loss`), as Chameleon trains.

    BOS a red circle BOI c0 c1 ... c63 EOI EOS      (ids of c: text vocabulary + code)
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from transfusion_jax.batch import Batch, patch_index, text_target_mask
from transfusion_jax.loss import after_an_image, next_token_ce


def with_image_tokens(batch: Batch, codes: jax.Array, offset: int) -> Batch:
    """The batch with code ids codes [B, M, N] (int, raster order per slot) written as tokens at
    the image positions and every position marked text (image_ids = -1). Unused slots' codes are
    never read."""
    b, m, n = codes.shape
    index = patch_index(batch.image_ids, m, n)
    image_tokens = jnp.take_along_axis(codes.reshape(b, m * n), index, axis=1) + offset
    is_image = batch.image_ids >= 0
    return batch.replace(
        tokens=jnp.where(is_image, image_tokens, batch.tokens).astype(jnp.int32),
        image_ids=jnp.full_like(batch.image_ids, -1),
    )


class TargetMasks(NamedTuple):
    """bool [B, L] masks of a batch holding its image tokens (image positions: tokens >=
    offset), each target counted where its input position is True."""

    all: jax.Array  # every next-token target of the document, text and image code alike
    image: jax.Array  # the target is an image code
    text: jax.Array  # neither input nor target is a code: what a continuous run calls text
    after_image: jax.Array  # text targets with an image earlier in their document


def target_masks(batch: Batch, offset: int) -> TargetMasks:
    """The masks of `TargetMasks`; the last-code -> EOI target is in `all` only."""
    targets = text_target_mask(batch.segment_ids, batch.image_ids)
    is_image = batch.tokens >= offset
    next_is_image = jnp.pad(is_image[:, 1:], ((0, 0), (0, 1)))
    text = targets & ~is_image & ~next_is_image
    after = after_an_image(batch.segment_ids, jnp.where(is_image, 0, -1))
    return TargetMasks(targets, targets & next_is_image, text, text & after)


def text_targets(batch: Batch, offset: int) -> jax.Array:
    """bool [B, L]: the text targets (`TargetMasks.text`): what text metrics score, so they mean
    the same for both kinds of run."""
    return target_masks(batch, offset).text


def discrete_counts(batch: Batch, offset: int) -> TargetMasks:
    """Each mask's count over a whole batch: the denominators of its micro-batches' means."""
    return TargetMasks(*(jnp.sum(mask) for mask in target_masks(batch, offset)))


def discrete_loss(model, batch: Batch, offset: int, counts=None):
    """(loss, metrics) of a batch holding its image tokens (`with_image_tokens`): the mean
    next-token cross-entropy over every target, text and image code alike. The logs split it
    into image-code targets, text targets (`text_targets`) and the text after an image
    (`lm_loss_after_image`, a caption read from its image). `counts` = `discrete_counts` of the
    whole batch when this is one of its micro-batches."""
    logits, _ = model(batch, None, None)
    ce = next_token_ce(logits, batch.tokens)
    masks = target_masks(batch, offset)
    totals = counts or TargetMasks(*(jnp.sum(mask) for mask in masks))

    def mean(which: str):
        where, total = getattr(masks, which), getattr(totals, which)
        return jnp.sum(jnp.where(where, ce, 0.0)) / jnp.maximum(total, 1)

    loss = mean("all")
    metrics = dict(
        loss=loss,
        lm_loss=loss,
        image_token_loss=mean("image"),
        text_token_loss=mean("text"),
        lm_loss_after_image=mean("after_image"),
        num_text_targets=jnp.sum(masks.text),
        num_image_targets=jnp.sum(masks.image),
    )
    return loss, metrics
