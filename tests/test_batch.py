"""The batch builder on a hand-written example, the text targets, and bad input."""

import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import SPECIAL, random_batch, tiny_config
from transfusion_jax.batch import (
    Image,
    build_batch,
    caption_first_document,
    image_first_document,
    image_slots,
    text_target_mask,
    unconditional_prefix,
)
from transfusion_jax.loss import after_an_image

B, E, BOI, EOI = SPECIAL.bos, SPECIAL.eos, SPECIAL.boi, SPECIAL.eoi


def test_hand_written_row():
    img = np.full((4, 4, 1), 7.0, np.float32)  # 2x2 patches -> 4 positions
    rows = [[caption_first_document([10, 11], img, SPECIAL), [[B, 20, E]]]]
    batch = build_batch(rows, 16, 2, (4, 4, 1), 2, SPECIAL)
    assert batch.tokens[0].tolist() == [B, 10, 11, BOI, 0, 0, 0, 0, EOI, E, B, 20, E, 0, 0, 0]
    assert batch.segment_ids[0].tolist() == [1] * 10 + [2] * 3 + [0] * 3
    assert batch.image_ids[0].tolist() == [-1] * 4 + [0] * 4 + [-1] * 8
    assert batch.positions[0].tolist() == list(range(10)) + [0, 1, 2] + [0] * 3
    assert batch.latents[0, 0].max() == 7 and batch.latents[0, 1].max() == 0
    assert batch.noise_limited.tolist() == [[False, False]]
    start, used = image_slots(jnp.asarray(batch.image_ids), 2)
    assert start.tolist() == [[4, 0]] and used.tolist() == [[True, False]]
    targets = text_target_mask(jnp.asarray(batch.segment_ids), jnp.asarray(batch.image_ids))
    # inputs with a target: B->10, 10->11, 11->BOI, EOI->E, B->20, 20->E
    assert np.flatnonzero(np.asarray(targets[0])).tolist() == [0, 1, 2, 8, 10, 11]


def test_text_targets_match_a_loop_on_random_layouts():
    rng = np.random.default_rng(1)
    cfg = tiny_config(image__latent_size=4, image__max_images=3)
    batch = random_batch(rng, cfg, 4, 40)
    got = np.asarray(text_target_mask(jnp.asarray(batch.segment_ids), jnp.asarray(batch.image_ids)))
    seg, img = batch.segment_ids, batch.image_ids
    for r in range(4):
        for q in range(40):
            expected = (
                q + 1 < 40
                and seg[r, q] > 0
                and seg[r, q + 1] == seg[r, q]
                and img[r, q] < 0
                and img[r, q + 1] < 0
            )
            assert got[r, q] == expected, (r, q)


def test_after_an_image_matches_a_loop_on_random_layouts():
    rng = np.random.default_rng(2)
    cfg = tiny_config(image__latent_size=4, image__max_images=3)
    batch = random_batch(rng, cfg, 6, 48)
    got = np.asarray(after_an_image(jnp.asarray(batch.segment_ids), jnp.asarray(batch.image_ids)))
    seg, img = batch.segment_ids, batch.image_ids
    for r in range(6):
        for q in range(48):  # an image position earlier in the same document (or this one)
            expected = any(seg[r, p] == seg[r, q] and img[r, p] >= 0 for p in range(q + 1))
            assert got[r, q] == expected, (r, q)
    # the hand-written row: the caption after the image of an image-first document
    img4 = np.zeros((4, 4, 1), np.float32)
    rows = [[image_first_document(img4, [30, 31], SPECIAL), [[B, 20, E]]]]
    one = build_batch(rows, 16, 2, (4, 4, 1), 2, SPECIAL)
    mask = after_an_image(jnp.asarray(one.segment_ids), jnp.asarray(one.image_ids))[0]
    assert np.flatnonzero(np.asarray(mask)).tolist() == list(range(2, 10))  # patches..EOS


def test_caption_drop_reproduces_the_unconditional_prefix():
    img = np.zeros((4, 4, 1), np.float32)
    dropped = build_batch(
        [[caption_first_document([10, 11], img, SPECIAL, drop_caption=True)]],
        8,
        1,
        (4, 4, 1),
        2,
        SPECIAL,
    )
    boi = int(np.argmax(dropped.tokens[0] == BOI))
    assert dropped.tokens[0, :boi].tolist() == unconditional_prefix(SPECIAL)
    first = build_batch([[image_first_document(img, [10], SPECIAL)]], 9, 1, (4, 4, 1), 2, SPECIAL)
    assert first.tokens[0].tolist() == [B, BOI, 0, 0, 0, 0, EOI, 10, E]
    assert first.noise_limited.tolist() == [[True]]


def test_bad_rows_are_refused_with_the_reason():
    img = np.zeros((4, 4, 1), np.float32)
    with pytest.raises(ValueError, match="does not fit"):
        build_batch([[[[1] * 10]]], 8, 1, (4, 4, 1), 2)
    with pytest.raises(ValueError, match="more than max_images=1"):
        build_batch([[[Image(img), Image(img)]]], 20, 1, (4, 4, 1), 2)
    with pytest.raises(ValueError, match="latent of shape"):
        build_batch([[[Image(np.zeros((2, 2, 1)))]]], 20, 1, (4, 4, 1), 2)
