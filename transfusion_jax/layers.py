"""Small shared building blocks: parameter initialisers that carry logical axis names, dtypes, RoPE.

Every weight is created through `sharded(init, *names)`, which records one logical name per axis
(`embed`, `mlp`, `heads`, ...). `sharding.py` maps those names to mesh axes with one rules table, so
a model file says *what* an axis is and never *how* it is laid out on devices.
"""

import jax
import jax.numpy as jnp
from flax import nnx


def sharded(init, *names):
    """`init` with logical axis names attached as metadata (resolved later by the rules table).

    eager_sharding=False: the names are logical, not mesh axes, so the variable must not be placed
    on a mesh when it is created; `sharding.py` does that with `jax.jit(..., out_shardings=...)`.
    """
    return nnx.with_partitioning(init, names, eager_sharding=False)


def fan_in_init(scale: float = 1.0):
    """Truncated-normal variance scaling by fan-in; `scale` < 1 shrinks residual branch outputs."""
    return nnx.initializers.variance_scaling(scale, "fan_in", "truncated_normal")


def dense(rngs, d_in, d_out, names, *, dtype, param_dtype, scale=1.0, use_bias=False):
    """A bias-free linear layer whose kernel carries the logical axis names `names`."""
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=sharded(fan_in_init(scale), *names),
        bias_init=sharded(nnx.initializers.zeros_init(), names[-1]),
        rngs=rngs,
    )


def dense_general(rngs, in_shape, out_shape, names, *, dtype, param_dtype, scale=1.0):
    """A bias-free projection from trailing axes `in_shape` to `out_shape`, kernel
    `[*in_shape, *out_shape]` named by `names`: attention keeps its heads as an axis of their own
    (`[embed, heads, head_dim]`), so tensor parallelism can only split whole heads. Initialised
    as the flat `[prod(in), prod(out)]` matrix (fan-in = prod(in_shape)), then reshaped."""
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    return nnx.LinearGeneral(
        in_shape,
        out_shape,
        axis=tuple(range(-len(in_shape), 0)),
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=sharded(fan_in_init(scale), *names),
        rngs=rngs,
    )


def apply_flat(layer, x: jax.Array) -> jax.Array:
    """`layer` on x [..., d] as one 2-D matmul over [prod(...), d] (see transformer.Transformer)."""
    return layer(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def rms_norm(rngs, dim, name, *, eps, dtype, param_dtype):
    return nnx.RMSNorm(
        dim,
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=sharded(nnx.initializers.ones_init(), name),
        rngs=rngs,
    )


def to_dtype(name: str):
    return jnp.dtype(name)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (rotate-half form) on x [B, L, H, D] at int positions [B, L].

    Computed in float32 so bf16 runs rotate exactly; positions restart per document, so a document's
    attention scores are the same wherever it is packed.
    """
    d = x.shape[-1]
    inv_freq = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, L, D/2]
    sin, cos = jnp.sin(angles)[:, :, None], jnp.cos(angles)[:, :, None]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
