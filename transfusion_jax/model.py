"""The Transfusion module: text embeddings and patch encoder in, one transformer, LM head and patch
decoder out.

One rule for images in context: the model always reads an image through `patching.encode` at its
timestep t. Training passes the noisy image; inference passes a given or finished image clean
(t = 0). There is no other path by which an image enters the sequence.
"""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from transfusion_jax.attention import training_mask
from transfusion_jax.batch import Batch, image_slots, patch_index
from transfusion_jax.layers import apply_flat, dense, sharded
from transfusion_jax.model_config import ModelSpec, as_model_spec
from transfusion_jax.patching import LinearPatching
from transfusion_jax.transformer import Transformer
from transfusion_jax.unet import UNetPatching


def make_patching(spec: ModelSpec, rngs: nnx.Rngs):
    kinds = {"linear": LinearPatching, "unet": UNetPatching}
    return kinds[spec.patch.kind](spec, rngs)


class Transfusion(nnx.Module):
    def __init__(self, spec: ModelSpec | ml_collections.ConfigDict, rngs: nnx.Rngs):
        """`spec`: the model's `ModelSpec`; a ConfigDict is accepted at this boundary and
        converted once with `ModelSpec.from_config` (resolved and checked). The spec stays on the
        module as `self.spec` (static data of the graph definition, not of the state)."""
        self.spec = spec = as_model_spec(spec)
        transformer_spec = spec.transformer
        self.max_images = spec.image.max_images
        self.depth, self.compute_dtype = transformer_spec.depth, transformer_spec.dtype
        self.attention = transformer_spec.attention
        self.bidirectional_images = transformer_spec.bidirectional_images
        self.num_patches = spec.num_patches
        dtypes = transformer_spec.layer_dtypes
        self.embed = nnx.Embed(
            transformer_spec.vocab_size,
            transformer_spec.d_model,
            rngs=rngs,
            **dtypes,
            embedding_init=sharded(nnx.initializers.normal(1.0), "vocab", "embed"),
        )
        # discrete images are tokens: no patch layers (discrete.py puts the codes in the row)
        self.patching = None if transformer_spec.discrete_images else make_patching(spec, rngs)
        self.transformer = Transformer(transformer_spec, rngs)
        self.lm_head = (
            None
            if transformer_spec.tie_embeddings
            else dense(
                rngs,
                transformer_spec.d_model,
                transformer_spec.vocab_size,
                ("embed", "vocab"),
                **dtypes,
            )
        )

    def __call__(self, batch: Batch, noisy_latents: jax.Array, t: jax.Array):
        """Returns (text logits [B, L, V] float32, image prediction [B, M, h, w, c] float32;
        None for a discrete model, whose batches hold images as tokens, `discrete.py`).

        noisy_latents [B, M, h, w, c] and t [B, M] give each image slot at its noise level; the
        logits at position q predict the token at q + 1.
        """
        if self.patching is None:  # discrete images: every position is a token (discrete.py)
            mask = training_mask(batch.segment_ids, batch.image_ids, self.attention, False)
            h = self.transformer(self.embed(batch.tokens), batch.positions, mask)
            return self.logits(h), None
        b, length = batch.tokens.shape
        n = self.num_patches
        starts, _ = image_slots(batch.image_ids, self.max_images)

        # Input sequence: text embeddings, with each image position replaced by its patch token.
        patch_tokens, context = self.patching.encode(noisy_latents, t)  # [B, M, N, d]
        index = patch_index(batch.image_ids, self.max_images, n)
        from_image = jnp.take_along_axis(
            patch_tokens.reshape(b, -1, patch_tokens.shape[-1]), index[..., None], axis=1
        )
        x = jnp.where(batch.image_ids[..., None] >= 0, from_image, self.embed(batch.tokens))

        mask = training_mask(
            batch.segment_ids, batch.image_ids, self.attention, self.bidirectional_images
        )
        h = self.transformer(x, batch.positions, mask)

        logits = self.logits(h)
        # Each image's outputs, back into slot order for the patch decoder.
        gather = jnp.clip(starts[:, :, None] + jnp.arange(n), 0, length - 1).reshape(b, -1)
        hidden = jnp.take_along_axis(h, gather[..., None], axis=1).reshape(
            b, self.max_images, n, -1
        )
        return logits, self.patching.decode(hidden, context)

    def logits(self, h: jax.Array) -> jax.Array:
        """Next-token logits [..., V] (float32) from final hidden states [..., d]."""
        head = self.embed.attend if self.lm_head is None else self.lm_head
        return apply_flat(head, h).astype(jnp.float32)


def parameter_counts(spec: ModelSpec | ml_collections.ConfigDict) -> dict[str, int]:
    """Parameters by part (transformer / embeddings / patch layers / total), with no allocation."""
    spec = as_model_spec(spec)
    abstract = nnx.eval_shape(lambda: Transfusion(spec, nnx.Rngs(0)))

    def count(module):
        return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))

    embeddings = count(abstract.embed) + (
        0 if abstract.lm_head is None else count(abstract.lm_head)
    )
    parts = dict(
        transformer=count(abstract.transformer),
        embeddings=embeddings,
        patch=0 if abstract.patching is None else count(abstract.patching),
    )
    parts["total"] = sum(parts.values())
    return parts
