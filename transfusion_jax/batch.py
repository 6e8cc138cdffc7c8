"""The packed batch: static-shape rows holding several mixed text/image documents.

A row of length L holds documents back to back, then padding. Per position:
  tokens       text id (PAD where an image patch sits)
  segment_ids  document number in the row, 1, 2, ...; 0 = padding
  image_ids    -1 for text, else the image slot m in [0, M) the patch belongs to
  positions    RoPE position, restarting at 0 with every document
Per image slot m of a row: `latents[b, m]` (the clean latent, [h, w, c]) and `noise_limited[b, m]`
(True for an image that precedes its caption: it is trained with t < diffusion.noise_limit).
An image occupies N = (h/k)*(w/k) consecutive positions, raster order, between a BOI and an EOI
token. Everything else (which slots are used, where they start, which tokens have a target) is
derived from these fields, so they cannot disagree.

`build_batch` packs documents given as Python lists; it is the reference the data pipeline and
the sampler build on, and what the tests and the README use to make batches by hand.
"""

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class Batch:
    tokens: jax.Array  # int32 [B, L]
    segment_ids: jax.Array  # int32 [B, L]
    image_ids: jax.Array  # int32 [B, L]
    positions: jax.Array  # int32 [B, L]
    latents: jax.Array  # float32 [B, M, h, w, c]
    noise_limited: jax.Array  # bool [B, M]


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """Special token ids; the tokenizer decides them, these defaults serve hand-made data."""

    pad: int = 0
    bos: int = 1
    eos: int = 2
    boi: int = 3
    eoi: int = 4


@dataclasses.dataclass(frozen=True)
class Image:
    """An image inside a document: its clean latent [h, w, c] and the noise-limiting flag."""

    latent: np.ndarray
    noise_limited: bool = False


# A document is a sequence of parts: text (a sequence of token ids, copied verbatim) or an Image
# (written as BOI, N patch positions, EOI).
Document = Sequence["Sequence[int] | Image"]


def caption_first_document(
    caption: Sequence[int], latent: np.ndarray, special: SpecialTokens, drop_caption: bool = False
) -> list:
    """`BOS caption BOI image EOI EOS`, the text -> image direction.

    With drop_caption (the classifier-free-guidance drop) the caption is removed, so the image is
    conditioned on `unconditional_prefix` exactly as the sampler's unconditional branch will be.
    """
    text = [] if drop_caption else list(caption)
    return [unconditional_prefix(special) + text, Image(latent), [special.eos]]


def image_first_document(
    latent: np.ndarray, caption: Sequence[int], special: SpecialTokens
) -> list:
    """`BOS BOI image EOI caption EOS`, the captioning direction, with noise limiting on."""
    return [[special.bos], Image(latent, noise_limited=True), list(caption) + [special.eos]]


def unconditional_prefix(special: SpecialTokens) -> list[int]:
    """The text before BOI that an image sees when its caption is dropped."""
    return [special.bos]


def document_length(document: Document, num_patches: int) -> int:
    return sum(num_patches + 2 if isinstance(p, Image) else len(p) for p in document)


def build_batch(
    rows: Sequence[Sequence[Document]],
    seq_len: int,
    max_images: int,
    latent_shape: tuple[int, int, int],
    patch_size: int,
    special: SpecialTokens = SpecialTokens(),
    num_patches: int | None = None,
) -> Batch:
    """Packs each row's documents in order into numpy arrays of the layout above.

    `num_patches` (positions per image) follows from `latent_shape` unless given: a batch whose
    slots carry pixels for the train step's VAE encoder gives the latent's count."""
    h, w, c = latent_shape
    num_patches = num_patches or (h // patch_size) * (w // patch_size)
    b = len(rows)
    tokens = np.full((b, seq_len), special.pad, np.int32)
    segment_ids = np.zeros((b, seq_len), np.int32)
    image_ids = np.full((b, seq_len), -1, np.int32)
    positions = np.zeros((b, seq_len), np.int32)
    latents = np.zeros((b, max_images, h, w, c), np.float32)
    noise_limited = np.zeros((b, max_images), bool)
    for r, documents in enumerate(rows):
        cursor, slot = 0, 0
        for doc_number, document in enumerate(documents, start=1):
            length = document_length(document, num_patches)
            if cursor + length > seq_len:
                raise ValueError(
                    f"row {r}: document {doc_number} ({length} positions) does not "
                    f"fit after {cursor} positions in a row of {seq_len}"
                )
            segment_ids[r, cursor : cursor + length] = doc_number
            positions[r, cursor : cursor + length] = np.arange(length)
            for part in document:
                if not isinstance(part, Image):
                    tokens[r, cursor : cursor + len(part)] = part
                    cursor += len(part)
                    continue
                if slot >= max_images:
                    raise ValueError(f"row {r}: more than max_images={max_images} images")
                if part.latent.shape != (h, w, c):
                    raise ValueError(
                        f"row {r}: image latent of shape {part.latent.shape}, expected {(h, w, c)}"
                    )
                tokens[r, cursor] = special.boi
                image_ids[r, cursor + 1 : cursor + 1 + num_patches] = slot
                tokens[r, cursor + 1 + num_patches] = special.eoi
                latents[r, slot] = part.latent
                noise_limited[r, slot] = part.noise_limited
                cursor += num_patches + 2
                slot += 1
    return Batch(tokens, segment_ids, image_ids, positions, latents, noise_limited)


def image_slots(image_ids: jax.Array, max_images: int) -> tuple[jax.Array, jax.Array]:
    """(start, used) [B, M]: the first position of each image slot, and whether the slot is used."""
    is_slot = image_ids[:, None, :] == jnp.arange(max_images)[None, :, None]  # [B, M, L]
    return jnp.argmax(is_slot, axis=-1).astype(jnp.int32), jnp.any(is_slot, axis=-1)


def patch_index(image_ids: jax.Array, max_images: int, num_patches: int) -> jax.Array:
    """int32 [B, L]: for an image position, its patch's index in the row's patches laid out
    slot after slot ([B, M * N], raster order inside a slot); a clipped index elsewhere (mask
    it with image_ids >= 0)."""
    starts, _ = image_slots(image_ids, max_images)
    slot = jnp.maximum(image_ids, 0)
    offset = jnp.arange(image_ids.shape[1])[None] - jnp.take_along_axis(starts, slot, axis=1)
    return slot * num_patches + jnp.clip(offset, 0, num_patches - 1)


def text_target_mask(segment_ids: jax.Array, image_ids: jax.Array) -> jax.Array:
    """bool [B, L]: positions whose next token is a text target of the LM loss.

    Both the input and the next position must be text of the same document. So there is no target
    where the input is BOI (the next element is a patch), inside an image, at padding, or across a
    document boundary.
    """
    next_segment = jnp.pad(segment_ids[:, 1:], ((0, 0), (0, 1)))
    next_image = jnp.pad(image_ids[:, 1:], ((0, 0), (0, 1)), constant_values=0)
    return (segment_ids > 0) & (next_segment == segment_ids) & (image_ids < 0) & (next_image < 0)
