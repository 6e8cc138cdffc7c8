"""The attention mask against a brute-force loop, its key-range form, and the attention kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import random_batch, tiny_config
from transfusion_jax.attention import (
    KeyRanges,
    dot_product_attention,
    key_ranges,
    make_attention_mask,
    mask_from_key_ranges,
    training_mask,
)


def brute_force_mask(segment_ids, image_ids, bidirectional_images=True):
    """The rule, position by position; causal images: the same-image rule is simply gone."""
    b, length = segment_ids.shape
    mask = np.zeros((b, length, length), bool)
    for r in range(b):
        for q in range(length):
            for k in range(length):
                if segment_ids[r, q] == 0:
                    mask[r, q, k] = q == k
                elif segment_ids[r, k] == segment_ids[r, q]:
                    same_image = image_ids[r, q] >= 0 and image_ids[r, q] == image_ids[r, k]
                    mask[r, q, k] = k <= q or (bidirectional_images and same_image)
    return mask


@pytest.mark.parametrize("bidirectional_images", [True, False], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("seed", range(4))
def test_mask_matches_brute_force_on_random_layouts(seed, bidirectional_images):
    rng = np.random.default_rng(seed)
    cfg = tiny_config(image__latent_size=4, image__max_images=3)  # 4 patches per image
    batch = random_batch(rng, cfg, batch_size=3, seq_len=48)
    assert (batch.image_ids >= 0).any() and (batch.segment_ids == 0).any()
    assert batch.segment_ids.max() >= 2, "want several documents in a row"
    expected = brute_force_mask(batch.segment_ids, batch.image_ids, bidirectional_images)
    seg, img = jnp.asarray(batch.segment_ids), jnp.asarray(batch.image_ids)
    got = np.asarray(make_attention_mask(seg, img, bidirectional_images))
    np.testing.assert_array_equal(got, expected)
    start, end = key_ranges(seg, img, bidirectional_images)
    np.testing.assert_array_equal(np.asarray(mask_from_key_ranges(start, end)), expected)
    for implementation in ("xla", "tpu_flash"):  # the dense mask, and the kernels' key ranges
        mask = training_mask(seg, img, implementation, bidirectional_images)
        if isinstance(mask, KeyRanges):
            mask = mask_from_key_ranges(*mask)
        np.testing.assert_array_equal(np.asarray(mask), expected)


def test_mask_on_a_hand_written_row():
    # doc 1: t t [i i] t ; doc 2: t [j j] ; padding
    seg = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 0]])
    img = np.array([[-1, -1, 0, 0, -1, -1, 1, 1, -1]])
    m = np.asarray(make_attention_mask(jnp.asarray(seg), jnp.asarray(img)))[0]
    assert m[2, 3] and m[3, 2], "bidirectional inside an image"
    assert not m[1, 2], "text before an image does not see it"
    assert m[4, 2] and m[4, 3], "text after an image sees it"
    assert not m[5, 4] and not m[6, 0], "documents are isolated"
    assert m[6, 7] and m[6, 5] and not m[6, 8]
    assert m[8].tolist() == [False] * 8 + [True], "padding sees only itself"
    assert not m[:8, 8].any(), "nobody sees padding"


def test_causal_images_attend_like_text_on_a_hand_written_row():
    seg = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 0]])
    img = np.array([[-1, -1, 0, 0, -1, -1, 1, 1, -1]])
    m = np.asarray(make_attention_mask(jnp.asarray(seg), jnp.asarray(img), False))[0]
    text = np.asarray(make_attention_mask(jnp.asarray(seg), jnp.full((1, 9), -1), True))[0]
    np.testing.assert_array_equal(m, text)
    assert m[3, 2] and not m[2, 3], "a patch sees earlier patches of its image, not later ones"
    assert not m[6, 7] and m[7, 6]
    assert m[8].tolist() == [False] * 8 + [True], "padding sees only itself"


def reference_attention(q, k, v, mask):
    """jax.nn.dot_product_attention with KV heads repeated to full multi-head attention."""
    repeat = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2)
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_xla_attention_matches_jax_reference(kv_heads):
    rng = np.random.default_rng(0)
    cfg = tiny_config(image__latent_size=4, image__max_images=2)
    batch = random_batch(rng, cfg, batch_size=2, seq_len=32)
    mask = make_attention_mask(jnp.asarray(batch.segment_ids), jnp.asarray(batch.image_ids))
    q = jnp.asarray(rng.normal(size=(2, 32, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 32, kv_heads, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 32, kv_heads, 8)), jnp.float32)
    np.testing.assert_allclose(
        dot_product_attention(q, k, v, mask),
        reference_attention(q, k, v, mask),
        atol=1e-5,
        rtol=1e-5,
    )
    with pytest.raises(ValueError, match="not one of"):
        dot_product_attention(q, k, v, mask, implementation="nope")
