"""Generation for a discrete (VQ token) run: images are drawn token by token, like text.

`DiscreteGenerator` is `generator.Generator` with its two image primitives replaced; text decoding,
the KV cache, its sharding and the driver loop (`generate`: text, an image wherever the model
opens one, text again) are the same code:
- `generate_image`: after the BOI that ends each row's context, N code tokens are sampled one at
  a time with the cache (`image_temperature`, `image_top_k`), only among the codebook's ids.
  Classifier-free guidance mixes the logits of the conditional context with those of a second
  context holding exactly the training-time dropped-caption prefix (`BOS BOI`) and the same codes
  so far: guided = uncond + s * (cond - uncond), as Transfusion guides its noise prediction. At
  s = 1 there is no second context: the conditional logits themselves.
- `add_image`: a given image (its code grid) enters the context as `BOI codes EOI` tokens.
Images come and go as code grids [h, w] (int32); the pipeline decodes them with the VQ decoder.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transfusion_jax.generator import (
    Context,
    Generator,
    SamplingOptions,
    append_tokens,
    sample_token,
)


class DiscreteGenerator(Generator):
    """Jitted generation for a model whose images are tokens `offset + code`, code < K."""

    def __init__(self, model, special, grid_size: int, offset: int, codebook_size: int, **kw):
        self.offset, self.codebook_size, self.grid_size = offset, codebook_size, grid_size
        super().__init__(model, None, special, (grid_size, grid_size), **kw)
        self._codes = self._on_mesh(jax.jit(self._sample_codes, static_argnames=("options",)))

    def _sample_codes(self, params, ctx: Context, uncond: Context, rng, commit, options):
        """(ctx with N codes appended to the rows in `commit`, codes [B, N])."""
        model = nnx.merge(self.graphdef, params)
        b, n, k = ctx.length.shape[0], self.num_patches, self.codebook_size
        guided = options.cfg_scale != 1
        counts = commit.astype(jnp.int32)
        top_k = min(options.image_top_k, k)  # 0 (all codes) stays 0

        def body(i, carry):
            ctx, uncond, codes = carry
            logits = jax.lax.dynamic_slice_in_dim(ctx.logits, self.offset, k, axis=1)
            if guided:
                free = jax.lax.dynamic_slice_in_dim(uncond.logits, self.offset, k, axis=1)
                logits = free + options.cfg_scale * (logits - free)
            code = sample_token(
                jax.random.fold_in(rng, i),
                logits,
                options.image_temperature,
                top_k,
                1.0,
            )
            token = (code + self.offset)[:, None]
            ctx = self._constrain(append_tokens(model, ctx, token, counts))
            if guided:
                uncond = self._constrain(append_tokens(model, uncond, token, jnp.ones_like(counts)))
            return ctx, uncond, codes.at[:, i].set(code)

        start = (ctx, uncond if guided else None, jnp.zeros((b, n), jnp.int32))
        ctx, _, codes = jax.lax.fori_loop(0, n, body, start)
        return ctx, codes

    def generate_image(self, ctx: Context, rng, options: SamplingOptions, commit=None):
        """Samples one image's codes per row after the BOI that ends the context; commits them
        and EOI for the rows in `commit`. Returns (ctx, code grids [B, h, w])."""
        b = ctx.length.shape[0]
        self._check_room(ctx, self.num_patches + 1)  # the codes and their EOI
        commit = jnp.ones((b,), bool) if commit is None else jnp.asarray(commit)
        uncond = self.unconditional(b, ctx.k.shape[2]) if options.cfg_scale != 1 else None
        ctx, codes = self._codes(self.params, ctx, uncond, rng, commit, options=options)
        ctx = self.add_tokens(ctx, [[self.special.eoi]] * b, commit)
        return ctx, codes.reshape(b, self.grid_size, self.grid_size)

    def add_image(self, ctx: Context, images, commit=None) -> Context:
        """Appends given images as their code grids [B, h, w]: `BOI codes EOI` (to caption)."""
        codes = np.asarray(images, np.int64).reshape(len(images), -1)
        if codes.min(initial=0) < 0 or codes.max(initial=0) >= self.codebook_size:
            raise ValueError(f"image codes must be in [0, {self.codebook_size})")
        special = self.special
        rows = [[special.boi, *(row + self.offset).tolist(), special.eoi] for row in codes]
        return self.add_tokens(ctx, rows, commit)
