"""Generation with a KV cache: text decoding, text -> image, captioning, interleaved.

A `Context` is a batch of growing documents, one per row, held as the keys and values of every
layer. Three primitives move it forward, all through the same model pieces as training:
- `append_tokens`: text positions, causal, committed to the cache;
- `predict_image`: one image's N positions at noise level t, attending to the cached prefix and
  bidirectionally among themselves (causally with `model.image_attention = "causal"`, as in
  training); nothing is committed, so every denoising step costs N positions, not the whole
  sequence;
- `append_image`: a finished (or given) image enters the context clean, t = 0, through the same
  patch encoder (one rule for images in context), and is committed.
Classifier-free guidance keeps a second context holding exactly the training-time dropped-caption
prefix (`BOS BOI`), so its unconditional prediction is the one the model was trained to make.

`Generator` jits these primitives once per shape; the loops over tokens and denoising steps run
under jit (`lax.while_loop` / the samplers' `lax.scan`). Only the switch between text and images
is a Python loop, at most `max_images + 1` turns.

On a mesh (the model's weights placed by `sharding.param_shardings`) every jitted function runs
under that mesh, and the cache [depth, B, S, G, D] is sharded: whole KV heads over `tensor`
(replicated on it when it does not divide them) and rows over the batch axes that divide B.
"""

import contextlib
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from transfusion_jax import diffusion_solvers
from transfusion_jax.batch import SpecialTokens, unconditional_prefix
from transfusion_jax.diffusion import Diffusion
from transfusion_jax.sharding import BATCH_AXES


@struct.dataclass
class Context:
    k: jax.Array  # [depth, B, S, G, D]
    v: jax.Array
    length: jax.Array  # int32 [B]: committed positions of each row
    logits: jax.Array  # float32 [B, V]: the next-token logits after the last committed token


def empty_context(model, batch_size: int, capacity: int, mesh: Mesh | None = None) -> Context:
    """An empty cache, created in place on `mesh` (see `cache_sharding`) when one is given."""
    attn = model.transformer.blocks.attn
    shape = (model.depth, batch_size, capacity, attn.num_kv_heads, attn.head_dim)
    dtype = jnp.dtype(model.compute_dtype)
    vocab = model.embed.num_embeddings
    where = None if mesh is None else cache_sharding(mesh, batch_size, attn.num_kv_heads)
    return Context(
        k=jnp.zeros(shape, dtype, device=where),
        v=jnp.zeros(shape, dtype, device=where),
        length=jnp.zeros((batch_size,), jnp.int32),
        logits=jnp.zeros((batch_size, vocab), jnp.float32),
    )


def cache_sharding(mesh: Mesh, batch_size: int, num_kv_heads: int) -> NamedSharding:
    """Where a cache [depth, B, S, G, D] lives on `mesh`: whole KV heads over `tensor` (kept
    whole, replicated on that axis, when its size does not divide G), and rows over the batch
    axes (data and fsdp, else the one of them) whose devices divide B."""
    size = lambda axes: math.prod(mesh.shape.get(a, 1) for a in axes)  # noqa: E731
    rows = None
    for axes in (BATCH_AXES, *sorted(((a,) for a in BATCH_AXES), key=lambda a: -size(a))):
        if all(a in mesh.shape for a in axes) and size(axes) > 1 and batch_size % size(axes) == 0:
            rows = axes
            break
    tensor = mesh.shape.get("tensor", 1)
    heads = "tensor" if tensor > 1 and num_kv_heads % tensor == 0 else None
    return NamedSharding(mesh, PartitionSpec(None, rows, None, heads, None))


def params_mesh(params) -> Mesh | None:
    """The mesh of more than one device that the weights are placed on (None: one device)."""
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh if sharding.mesh.size > 1 else None
    return None


def _block_mask(length: jax.Array, block: int, capacity: int, bidirectional: bool) -> jax.Array:
    """[B, block, S]: the cached prefix, plus the block itself (causal, or all of it)."""
    k = jnp.arange(capacity)[None, None, :]
    offset = k - length[:, None, None]  # key's position inside the block
    q = jnp.arange(block)[None, :, None]
    in_block = (offset >= 0) & (offset < block) & (bidirectional | (offset <= q))
    return (k < length[:, None, None]) | in_block


def _run(model, ctx: Context, x, bidirectional: bool):
    """The transformer over a block x [B, n, d] at positions length .. length + n - 1."""
    b, n, _ = x.shape
    positions = ctx.length[:, None] + jnp.arange(n)[None]
    mask = _block_mask(ctx.length, n, ctx.k.shape[2], bidirectional)
    h, (k, v) = model.transformer(x, positions, mask, (ctx.k, ctx.v), ctx.length)
    return h, ctx.replace(k=k, v=v)


def append_tokens(model, ctx: Context, tokens: jax.Array, counts: jax.Array) -> Context:
    """Commits tokens [B, n]; row b keeps its first counts[b] of them (the rest is padding)."""
    h, ctx = _run(model, ctx, model.embed(tokens), bidirectional=False)
    last = jnp.take_along_axis(h, jnp.maximum(counts - 1, 0)[:, None, None], axis=1)[:, 0]
    logits = jnp.where((counts > 0)[:, None], model.logits(last), ctx.logits)
    return ctx.replace(length=ctx.length + counts, logits=logits)


def predict_image(model, ctx: Context, x_t: jax.Array, t: jax.Array) -> jax.Array:
    """The model's prediction (epsilon or velocity) for images x_t [B, h, w, c] at t [B]."""
    tokens, context = model.patching.encode(x_t[:, None], t[:, None])
    h, _ = _run(model, ctx, tokens[:, 0], bidirectional=model.bidirectional_images)
    return model.patching.decode(h[:, None], context)[:, 0]


def append_image(model, ctx: Context, image: jax.Array, commit: jax.Array) -> Context:
    """Commits a clean image [B, h, w, c] (t = 0) for the rows where `commit` [B] is True."""
    tokens, _ = model.patching.encode(image[:, None], jnp.zeros(image.shape[:1] + (1,)))
    _, new = _run(model, ctx, tokens[:, 0], bidirectional=model.bidirectional_images)
    n = tokens.shape[2]
    keep = commit[None, :, None, None, None]
    return ctx.replace(
        k=jnp.where(keep, new.k, ctx.k),
        v=jnp.where(keep, new.v, ctx.v),
        length=jnp.where(commit, ctx.length + n, ctx.length),
    )


def sample_token(rng, logits, temperature: float, top_k: int, top_p: float):
    """Greedy at temperature 0 (the paper); else softmax sampling with optional top-k / top-p."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p  # the smallest set reaching top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    max_new_tokens: int = 64
    max_images: int = 1
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    sampler: str = "ddpm"  # "ddpm", "ddim" (epsilon objective), "euler", "heun" (flow)
    steps: int = 250
    cfg_scale: float = 1.0
    clip_x0: float | None = None  # DDPM/DDIM: clip predicted x0 (1.0 for pixels in [-1, 1])
    # Discrete (VQ token) images only: how their code tokens are sampled (discrete_generator.py)
    image_temperature: float = 1.0
    image_top_k: int = 0


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # per row: every generated text token, specials included
    images: list[list[np.ndarray]]  # per row: generated images [h, w, c] in order
    text: list[list[int]]  # per row: the generated text tokens after the last image


class Generator:
    """Jitted generation for one model (its graph and parameters) and its special tokens."""

    def __init__(
        self,
        model,
        diffusion: Diffusion,
        special: SpecialTokens,
        image_shape,
        progress=None,
        num_ids: int | None = None,
    ):
        """num_ids: the tokenizer's ids are [0, num_ids); the rest of the vocabulary is padding
        and is never emitted (None: all ids). progress: optional host function called once per
        denoising model evaluation. A model whose weights are placed on a mesh generates on
        that mesh (see the module's docstring)."""
        self.set_model(model)
        self.progress = progress
        self.diffusion, self.special = diffusion, special
        self.image_shape = tuple(image_shape)
        self.num_patches = model.num_patches
        vocab = model.embed.num_embeddings
        valid = np.arange(vocab) < (num_ids or vocab)
        valid[special.pad] = False  # never generate padding or ids beyond the tokenizer's
        self.vocab_mask = jnp.asarray(valid)
        self._append_tokens = self._on_mesh(jax.jit(self._wrap(append_tokens)))
        self._append_image = self._on_mesh(jax.jit(self._wrap(append_image)))
        self._decode = self._on_mesh(jax.jit(self._decode_text, static_argnames=("options",)))
        self._image = self._on_mesh(jax.jit(self._sample_image, static_argnames=("options",)))

    def set_model(self, model) -> None:
        """Other weights of the same architecture (their mesh too): the compiled functions are
        reused for weights placed alike."""
        self.graphdef, self.params = nnx.split(model)
        self.mesh = params_mesh(self.params)

    def _wrap(self, fn):
        @functools.wraps(fn)
        def wrapped(params, *args):
            return self._constrain(fn(nnx.merge(self.graphdef, params), *args))

        return wrapped

    def _on_mesh(self, fn):
        """fn traced and run under the weights' mesh (its abstract mesh is what the model's
        sharding constraints read); as it is without one."""

        @functools.wraps(fn)
        def call(*args, **kwargs):
            with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
                return fn(*args, **kwargs)

        return call

    def _constrain(self, ctx: Context) -> Context:
        """The cache kept where `cache_sharding` puts it (inside jit: a sharding constraint)."""
        if self.mesh is None:
            return ctx
        where = cache_sharding(self.mesh, ctx.k.shape[1], ctx.k.shape[3])
        return ctx.replace(
            k=jax.lax.with_sharding_constraint(ctx.k, where),
            v=jax.lax.with_sharding_constraint(ctx.v, where),
        )

    # -- jitted loops -------------------------------------------------------------------------

    def _decode_text(self, params, ctx: Context, rng, budget, options: SamplingOptions):
        """Greedy/sampled decoding until each row emits EOS or BOI or spends `budget` tokens.

        Returns (ctx, tokens [B, max_new_tokens] (-1 = none), count [B], stopped_at_boi [B]).
        """
        model = nnx.merge(self.graphdef, params)
        b = ctx.length.shape[0]
        limit = options.max_new_tokens
        out = jnp.full((b, limit), -1, jnp.int32)

        def cond(carry):
            i, _, _, done, _ = carry
            return (i < limit) & ~jnp.all(done)

        def body(carry):
            i, ctx, out, done, boi = carry
            logits = jnp.where(self.vocab_mask, ctx.logits, -jnp.inf)
            token = sample_token(
                jax.random.fold_in(rng, i),
                logits,
                options.temperature,
                options.top_k,
                options.top_p,
            )
            active = ~done & (i < budget)
            out = out.at[:, i].set(jnp.where(active, token, -1))
            ctx = self._constrain(
                append_tokens(model, ctx, token[:, None], active.astype(jnp.int32))
            )
            boi = boi | (active & (token == self.special.boi))
            done = done | ~active | (token == self.special.eos) | (token == self.special.boi)
            return i + 1, ctx, out, done, boi

        start = (0, ctx, out, jnp.zeros((b,), bool), jnp.zeros((b,), bool))
        _, ctx, out, _, boi = jax.lax.while_loop(cond, body, start)
        return self._constrain(ctx), out, jnp.sum(out >= 0, axis=1), boi

    def _sample_image(self, params, ctx, uncond, rng, options: SamplingOptions):
        model = nnx.merge(self.graphdef, params)
        b = ctx.length.shape[0]

        def predict(context):
            return lambda x, t: predict_image(model, context, x, jnp.full((b,), t))

        noise_rng, sample_rng = jax.random.split(rng)
        x_T = jax.random.normal(noise_rng, (b, *self.image_shape), jnp.float32)
        predict_fn = diffusion_solvers.guided(predict(ctx), predict(uncond), options.cfg_scale)
        if self.progress is not None:
            guided_fn = predict_fn

            def predict_fn(x, t):
                jax.debug.callback(self.progress, t)
                return guided_fn(x, t)

        extra = {} if options.clip_x0 is None else {"clip_x0": options.clip_x0}
        return diffusion_solvers.sample(
            predict_fn, x_T, sample_rng, self.diffusion, options.sampler, options.steps, **extra
        )

    # -- the driver ---------------------------------------------------------------------------

    def start(self, prompts: list[list[int]], capacity: int) -> Context:
        """A context holding the text prompts (ragged; each one row)."""
        model = nnx.merge(self.graphdef, self.params)
        ctx = empty_context(model, len(prompts), capacity, self.mesh)
        width = min(_bucket(max(len(p) for p in prompts), PROMPT_BUCKET), capacity)
        tokens = np.full((len(prompts), width), self.special.pad, np.int32)
        for r, p in enumerate(prompts):
            tokens[r, : len(p)] = p
        counts = jnp.asarray([len(p) for p in prompts], jnp.int32)
        return self._append_tokens(self.params, ctx, jnp.asarray(tokens), counts)

    def add_image(self, ctx: Context, images, commit=None) -> Context:
        """Appends given images [B, h, w, c] clean, wrapped in BOI ... EOI (e.g. to caption)."""
        b = ctx.length.shape[0]
        commit = jnp.ones((b,), bool) if commit is None else commit
        ctx = self.add_tokens(ctx, [[self.special.boi]] * b, commit)
        ctx = self._append_image(self.params, ctx, jnp.asarray(images, jnp.float32), commit)
        return self.add_tokens(ctx, [[self.special.eoi]] * b, commit)

    @staticmethod
    def _check_room(ctx: Context, width: int) -> None:
        """The cache write clamps at capacity (it would overwrite committed positions): refuse."""
        needed, capacity = int(np.max(np.asarray(ctx.length))) + width, ctx.k.shape[2]
        if needed > capacity:
            raise ValueError(
                f"the context needs {needed} positions but holds {capacity}; "
                f"start it with a larger capacity"
            )

    def add_tokens(self, ctx: Context, tokens: list[list[int]], commit=None) -> Context:
        counts = np.asarray([len(t) for t in tokens], np.int32)
        self._check_room(ctx, int(counts.max(initial=0)))
        if commit is not None:
            counts = np.where(np.asarray(commit), counts, 0)
        width = max(1, max(len(t) for t in tokens))
        array = np.full((len(tokens), width), self.special.pad, np.int32)
        for r, t in enumerate(tokens):
            array[r, : len(t)] = t
        return self._append_tokens(self.params, ctx, jnp.asarray(array), jnp.asarray(counts))

    def unconditional(self, batch_size: int, capacity: int) -> Context:
        """The CFG branch: exactly the dropped-caption training context, `BOS BOI`."""
        prefix = unconditional_prefix(self.special) + [self.special.boi]
        return self.start([prefix] * batch_size, capacity)

    def generate_image(self, ctx: Context, rng, options: SamplingOptions, commit=None):
        """Samples one image per row after the BOI that ends the context; commits it clean with
        EOI for the rows in `commit`. Returns (ctx, images [B, h, w, c])."""
        b = ctx.length.shape[0]
        self._check_room(ctx, self.num_patches + 1)  # the image and its EOI
        commit = jnp.ones((b,), bool) if commit is None else jnp.asarray(commit)
        uncond = self.unconditional(b, ctx.k.shape[2]) if options.cfg_scale != 1 else ctx
        images = self._image(self.params, ctx, uncond, rng, options)
        ctx = self._append_image(self.params, ctx, images, commit)
        ctx = self.add_tokens(ctx, [[self.special.eoi]] * b, commit)
        return ctx, images

    def generate(
        self,
        prompts: list[list[int]],
        rng,
        options: SamplingOptions,
        force_image: bool = False,
        images=None,
    ) -> GenerationResult:
        """Text (and images when the model emits BOI) after each prompt.

        prompts: token lists (usually starting with BOS). images: optional [B, h, w, c] given
        images appended clean after the prompts (captioning). force_image appends BOI and
        generates an image first (text -> image).
        """
        b = len(prompts)
        n = self.num_patches
        capacity = _bucket(
            _bucket(max(len(p) for p in prompts), PROMPT_BUCKET)
            + options.max_new_tokens
            + 4
            + (options.max_images + (images is not None)) * (n + 2),
            CAPACITY_BUCKET,
        )
        ctx = self.start(prompts, capacity)
        if images is not None:
            ctx = self.add_image(ctx, images)
        tokens = [[] for _ in range(b)]
        text_since_image = [[] for _ in range(b)]
        out_images = [[] for _ in range(b)]
        budget = np.full((b,), options.max_new_tokens, np.int32)
        wants_image = np.full((b,), force_image)
        if force_image:
            ctx = self.add_tokens(ctx, [[self.special.boi]] * b)
            for row in tokens:
                row.append(self.special.boi)
        images_made = 0
        while True:
            if wants_image.any():
                if images_made == options.max_images:
                    break
                rng, image_rng = jax.random.split(rng)
                ctx, new = self.generate_image(ctx, image_rng, options, wants_image)
                images_made += 1
                new = np.asarray(new)
                for r in np.flatnonzero(wants_image):
                    out_images[r].append(new[r])
                    tokens[r].append(self.special.eoi)
                    text_since_image[r] = []
            rng, text_rng = jax.random.split(rng)
            ctx, out, count, boi = self._decode(
                self.params, ctx, text_rng, jnp.asarray(budget), options=options
            )
            out, count, boi = np.asarray(out), np.asarray(count), np.asarray(boi)
            for r in range(b):
                new_tokens = out[r, : count[r]].tolist()
                tokens[r] += new_tokens
                text_since_image[r] += new_tokens
            # A row that ended (EOS, or out of budget) stays ended; one that opened an image
            # goes on with what is left of its budget once the image is drawn.
            budget = np.where(boi, budget - count, 0)
            wants_image = boi & (budget > 0)
            if not wants_image.any():
                break
        return GenerationResult(tokens=tokens, images=out_images, text=text_since_image)


# Prompt widths and cache capacities are rounded up to these multiples, so that batches of
# prompts of different lengths (evaluation's captions) share one compiled program.
PROMPT_BUCKET, CAPACITY_BUCKET = 32, 64


def _bucket(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def uncached_image_predictor(model, batch, slot: int):
    """The baseline without a cache: every call runs the whole sequence through the training
    forward pass, with image slot `slot` at (x_t, t) and every other image clean (t = 0).
    Used to check the cached path and to measure what the cache saves."""

    def predict(x_t, t):
        latents = batch.latents.at[:, slot].set(x_t)
        times = jnp.zeros(batch.noise_limited.shape, jnp.float32).at[:, slot].set(t)
        _, prediction = model(batch, latents, times)
        return prediction[:, slot]

    return predict
