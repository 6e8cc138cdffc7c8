"""Transfusion's attention mask, and the one place where an attention kernel is chosen.

The rule: a query attends to a key of the same document when the key is not later in the sequence,
or when both positions belong to the same image (bidirectional inside an image). Documents never see
each other, and padding is isolated. Because documents and images are contiguous runs, the allowed
keys of each query are one interval `[doc_start, text ? q + 1 : image_end)`: that is the form fast
kernels take, and `key_ranges` computes it. With `model.image_attention = "causal"` (the paper's
Table 5 ablation, `bidirectional_images=False` here) patches attend like text: the mask is built
with every position treated as text, so the kernels (which only read key ranges) are unchanged.

Implementations (`model.attention`): `xla` (dense masked softmax, any backend), `cudnn` (cuDNN's
fused attention with the dense mask as a bias), `tpu_flash` / `gpu_flash` (the Pallas kernels of
`transfusion_jax.kernels`, driven by key ranges: no [L, L] array and no fully masked block is ever
computed; on a CPU they run in Pallas interpret mode, for tests) and `auto` (the flash kernel of the
backend, else `xla`). The training forward builds the mask its implementation wants
(`training_mask`); the KV-cached generation passes dense masks, which always take the `xla` path.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

IMPLEMENTATIONS = ("xla", "cudnn", "tpu_flash", "gpu_flash", "auto")
FLASH = ("tpu_flash", "gpu_flash")
IMAGE_ATTENTION = ("bidirectional", "causal")  # model.image_attention


class KeyRanges(NamedTuple):
    """Each query's allowed keys `[start, end)`, int32 [B, L] each: a flash kernel's mask."""

    start: jax.Array
    end: jax.Array


def resolve_implementation(name: str, backend: str | None = None) -> str:
    """`auto` made concrete for a backend: the flash kernel of TPUs and GPUs, else `xla`."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {name!r} is not one of {IMPLEMENTATIONS}")
    if name != "auto":
        return name
    backend = backend or jax.default_backend()
    return {"tpu": "tpu_flash", "gpu": "gpu_flash"}.get(backend, "xla")


def training_mask(
    segment_ids: jax.Array,
    image_ids: jax.Array,
    implementation: str,
    bidirectional_images: bool = True,
):
    """The mask of a whole packed batch in the form `implementation` consumes."""
    if resolve_implementation(implementation) in FLASH:
        return KeyRanges(*key_ranges(segment_ids, image_ids, bidirectional_images))
    return make_attention_mask(segment_ids, image_ids, bidirectional_images)


def _mask_image_ids(image_ids: jax.Array, bidirectional_images: bool) -> jax.Array:
    """The image ids the mask reads: all -1 (every position attends like text) when images are
    causal."""
    return image_ids if bidirectional_images else jnp.full_like(image_ids, -1)


def make_attention_mask(
    segment_ids: jax.Array, image_ids: jax.Array, bidirectional_images: bool = True
) -> jax.Array:
    """bool [B, L, L]: `[b, q, k]` is True iff query q may attend key k.

    segment_ids: int [B, L], the document of each position, 0 for padding.
    image_ids: int [B, L], -1 for text, else an id of the image the position belongs to (unique in
    the row). Real queries attend keys of their own document that are not later, or (with
    `bidirectional_images`) that lie in the same image; no real query sees padding; a padding
    query attends only to itself (so its softmax is defined and it cannot disturb anything).
    """
    image_ids = _mask_image_ids(image_ids, bidirectional_images)
    seg_q, seg_k = segment_ids[:, :, None], segment_ids[:, None, :]
    img_q, img_k = image_ids[:, :, None], image_ids[:, None, :]
    length = segment_ids.shape[1]
    q_idx = jnp.arange(length)[:, None]
    k_idx = jnp.arange(length)[None, :]
    causal = k_idx <= q_idx
    same_image = (img_q == img_k) & (img_q >= 0)
    real = (seg_q > 0) & (seg_q == seg_k)
    padding_self = (seg_q == 0) & (q_idx == k_idx)
    return (real & (causal | same_image)) | padding_self


def key_ranges(
    segment_ids: jax.Array, image_ids: jax.Array, bidirectional_images: bool = True
) -> tuple[jax.Array, jax.Array]:
    """Per-query allowed keys as half-open intervals: (start, end), int32 [B, L] each.

    Equal to `make_attention_mask` (with the same `bidirectional_images`) when every document and
    every image is a contiguous run of positions (what the batch builder produces). A padding
    query gets [q, q + 1). Causal images need no kernel change: their ranges are text's
    `[doc_start, q + 1)`, and the kernels are tested against `xla` on arbitrary ranges.
    """
    image_ids = _mask_image_ids(image_ids, bidirectional_images)
    _, length = segment_ids.shape
    pos = jnp.arange(length, dtype=jnp.int32)[None, :]
    new_doc = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1
    )
    doc_start = jax.lax.cummax(jnp.where(new_doc, pos, 0), axis=1)
    # The end of each image: scan from the right for the last position of the current run.
    img_end_marker = jnp.concatenate(
        [image_ids[:, :-1] != image_ids[:, 1:], jnp.ones_like(image_ids[:, :1], bool)], 1
    )
    run_end = jax.lax.cummin(jnp.where(img_end_marker, pos, length), axis=1, reverse=True) + 1
    end = jnp.where(image_ids >= 0, run_end, pos + 1)
    start = jnp.where(segment_ids > 0, doc_start, pos)
    return start.astype(jnp.int32), end.astype(jnp.int32)


def mask_from_key_ranges(start: jax.Array, end: jax.Array) -> jax.Array:
    """The dense bool [B, L, L] mask that a pair of key ranges describes."""
    k = jnp.arange(start.shape[1])[None, None, :]
    return (k >= start[:, :, None]) & (k < end[:, :, None])


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask, implementation: str = "xla"
) -> jax.Array:
    """Masked softmax attention with grouped KV heads.

    q: [B, Lq, H, D]; k, v: [B, Lk, G, D] with G dividing H; mask: bool [B, Lq, Lk], or
    `KeyRanges` (self-attention, Lq == Lk) for a flash kernel.
    Logits and softmax are computed in float32 whatever the input dtype; the output has q's dtype.
    """
    implementation = resolve_implementation(implementation)
    if isinstance(mask, KeyRanges):
        if implementation not in FLASH:
            return _xla_attention(q, k, v, mask_from_key_ranges(*mask))
        return _flash(q, k, v, mask, implementation)
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="cudnn")
    return _xla_attention(q, k, v, mask)


def _flash(q, k, v, ranges: KeyRanges, implementation: str):
    """Runs a flash kernel; under a mesh, once per device on its rows and heads (shard_map), as
    a Pallas call is opaque to XLA's partitioner."""
    if implementation == "tpu_flash":
        from transfusion_jax.kernels.tpu_flash import flash_attention
    else:
        from transfusion_jax.kernels.gpu_flash import flash_attention
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return flash_attention(q, k, v, ranges.start, ranges.end)
    rows = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names) or None
    heads = "tensor" if "tensor" in mesh.axis_names else None
    if heads and k.shape[2] % mesh.shape[heads]:
        heads = None  # KV heads that the tensor axis cannot split: each device takes all heads
    qkv = PartitionSpec(rows, None, heads, None)
    per_row = PartitionSpec(rows, None)
    return jax.shard_map(
        flash_attention,
        mesh=mesh,
        in_specs=(qkv, qkv, qkv, per_row, per_row),
        out_specs=qkv,
        check_vma=False,
    )(q, k, v, ranges.start, ranges.end)


def _xla_attention(q, k, v, mask):
    b, lq, h, d = q.shape
    g = k.shape[2]
    q = q.reshape(b, lq, g, h // g, d)
    logits = jnp.einsum("bqgrd,bkgd->bgrqk", q, k, preferred_element_type=jnp.float32)
    logits = logits * (d**-0.5)
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bgrqk,bkgd->bqgrd", probs, v)
    return out.reshape(b, lq, h, d)
