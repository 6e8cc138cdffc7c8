"""The Llama-flavoured transformer: pre-RMSNorm blocks of RoPE attention and a SwiGLU MLP.

The blocks are created stacked (every weight gets a leading `layers` axis) and run with
`jax.lax.scan` under `jax.checkpoint`, so compile time does not grow with depth and the remat policy
is one config string.
"""

import contextlib

import jax
from flax import nnx

from transfusion_jax import attention, sharding
from transfusion_jax.layers import apply_rope, dense, dense_general, rms_norm
from transfusion_jax.model_config import TransformerSpec

# Which intermediate values the backward pass may keep instead of recomputing.
REMAT_POLICIES = {
    "none": None,  # No rematerialisation at all (fastest, most memory).
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Attention(nnx.Module):
    def __init__(self, spec: TransformerSpec, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads = spec.num_heads, spec.num_kv_heads
        self.head_dim = spec.head_dim
        self.rope_theta, self.implementation = spec.rope_theta, spec.attention
        dtypes = spec.layer_dtypes
        heads, kv_heads = (spec.num_heads, spec.head_dim), (spec.num_kv_heads, spec.head_dim)
        width = (spec.d_model,)
        self.q = dense_general(rngs, width, heads, ("embed", "heads", "head_dim"), **dtypes)
        self.k = dense_general(rngs, width, kv_heads, ("embed", "kv_heads", "head_dim"), **dtypes)
        self.v = dense_general(rngs, width, kv_heads, ("embed", "kv_heads", "head_dim"), **dtypes)
        names = ("heads", "head_dim", "embed")
        self.o = dense_general(rngs, heads, width, names, scale=spec.residual_out_scale, **dtypes)
        if spec.qk_norm:
            norm = dict(eps=spec.norm_eps, **dtypes)
            self.q_norm = rms_norm(rngs, spec.head_dim, "head_dim", **norm)
            self.k_norm = rms_norm(rngs, spec.head_dim, "head_dim", **norm)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x, positions, mask, kv=None, write_at=None):
        """x: [B * L, d] or [B, L, d]; positions [B, L]. Returns (output shaped like x, kv).

        Without a cache the mask is [B, L, L] over these positions. With `kv` = (k, v) caches
        [B, S, G, D], this block's keys/values are first written at each row's `write_at` [B],
        then the queries attend over the whole cache with a [B, L, S] mask.
        """
        b, length = positions.shape
        q = self.q(x).reshape(b, length, self.num_heads, self.head_dim)
        k = self.k(x).reshape(b, length, self.num_kv_heads, self.head_dim)
        v = self.v(x).reshape(b, length, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, positions, self.rope_theta)
        k = apply_rope(k, positions, self.rope_theta)
        if kv is not None:
            k, v = _write_rows(kv[0], k, write_at), _write_rows(kv[1], v, write_at)
            kv = (k, v)
        out = attention.dot_product_attention(q, k, v, mask, self.implementation)
        # The output projection as one [.., heads * head_dim] x [heads * head_dim, d] matmul
        # (the kernel's reshape is free): XLA:CPU contracts two axes at about half speed.
        kernel = self.o.kernel[...]
        kernel = kernel.reshape(-1, kernel.shape[-1]).astype(out.dtype)
        out = out.reshape(*x.shape[:-1], -1) @ kernel
        return out, kv


def _write_rows(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """cache [B, S, ...] with new [B, L, ...] written at row-wise offsets start [B]."""
    cache = cache.astype(new.dtype)

    def write(c, n, i):
        return jax.lax.dynamic_update_slice(c, n, (i,) + (0,) * (c.ndim - 1))

    return jax.vmap(write)(cache, new, start)


class SwiGLU(nnx.Module):
    def __init__(self, spec: TransformerSpec, rngs: nnx.Rngs):
        dtypes = spec.layer_dtypes
        self.gate = dense(rngs, spec.d_model, spec.ffn_dim, ("embed", "mlp"), **dtypes)
        self.up = dense(rngs, spec.d_model, spec.ffn_dim, ("embed", "mlp"), **dtypes)
        self.down = dense(
            rngs,
            spec.ffn_dim,
            spec.d_model,
            ("mlp", "embed"),
            scale=spec.residual_out_scale,
            **dtypes,
        )

    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
    def __init__(self, spec: TransformerSpec, rngs: nnx.Rngs):
        norm = dict(eps=spec.norm_eps, **spec.layer_dtypes)
        self.attn_norm = rms_norm(rngs, spec.d_model, "embed", **norm)
        self.attn = Attention(spec, rngs)
        self.mlp_norm = rms_norm(rngs, spec.d_model, "embed", **norm)
        self.mlp = SwiGLU(spec, rngs)

    def __call__(self, x, positions, mask, kv=None, write_at=None):
        h, kv = self.attn(self.attn_norm(x), positions, mask, kv, write_at)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), kv


class Transformer(nnx.Module):
    """`depth` stacked blocks and the final norm; maps [B, L, d] to [B, L, d].

    The residual stream is [B, L, d], constrained at every block boundary to rows over the
    mesh's batch axes (under a mesh context, as the train step sets). On CPU backends it is
    carried as [B * L, d] instead: every projection is then a plain 2-D matmul, whose weight
    gradient contracts one axis (XLA:CPU runs the two-axis contraction at about half speed).
    """

    def __init__(self, spec: TransformerSpec, rngs: nnx.Rngs):
        if spec.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"config field model.remat_policy: {spec.remat_policy!r} is not one of "
                f"{tuple(REMAT_POLICIES)}"
            )
        self.remat_policy = spec.remat_policy

        @nnx.split_rngs(splits=spec.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return Block(spec, rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = rms_norm(
            rngs, spec.d_model, "embed", eps=spec.norm_eps, **spec.layer_dtypes
        )

    def __call__(self, x, positions, mask, cache=None, write_at=None):
        """x [B, L, d] -> [B, L, d]. With `cache` = (k, v) of [depth, B, S, G, D] (generation),
        returns (output, updated cache); see Attention for the mask and `write_at`."""
        graphdef, stacked = nnx.split(self.blocks)

        def layer(h, xs):
            block_state, kv = xs
            h, kv = nnx.merge(graphdef, block_state)(h, positions, mask, kv, write_at)
            return sharding.constrain_rows(h), kv

        policy = REMAT_POLICIES[self.remat_policy]
        if self.remat_policy != "none" and cache is None:
            layer = jax.checkpoint(layer, policy=policy, prevent_cse=False)
        shape = x.shape
        if flat_residual():
            x = x.reshape(-1, shape[-1])
        x, new_cache = jax.lax.scan(layer, sharding.constrain_rows(x), (stacked, cache))
        x = self.final_norm(x).reshape(shape)
        return x if cache is None else (x, new_cache)


def flat_residual() -> bool:
    """Whether the residual stream is carried as [B * L, d] (the CPU layout, see Transformer)."""
    return jax.default_backend() == "cpu" and not _TARGET_ACCELERATOR[0]


_TARGET_ACCELERATOR = [False]


@contextlib.contextmanager
def compiling_for_accelerator():
    """Traces the accelerator layout on a CPU host: for ahead-of-time compiles for TPUs."""
    _TARGET_ACCELERATOR[0] = True
    try:
        yield
    finally:
        _TARGET_ACCELERATOR[0] = False
