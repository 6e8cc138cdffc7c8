"""Which key blocks a query block may see, and which query blocks see a key block.

A query q attends exactly the keys in `[start[q], end[q])` (`attention.key_ranges`). For a tile of
`block_q` queries the keys it needs lie in `[min start, max end)`, so a kernel visits the key blocks
`[kv_lo, kv_hi)` and skips the rest; the backward pass over a key block visits the query blocks
`[q_lo, q_hi)` whose key ranges include it. Everything here is a few small integer reductions, run
by XLA before the kernel.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class BlockBounds(NamedTuple):
    """int32 arrays: kv_lo, kv_hi [B, L // block_q]; q_lo, q_hi [B, L // block_k]."""

    kv_lo: jax.Array
    kv_hi: jax.Array
    q_lo: jax.Array
    q_hi: jax.Array


def padded_length(length: int, block_q: int, block_k: int) -> int:
    """The smallest multiple of both block sizes that holds `length` positions."""
    step = block_q * block_k // _gcd(block_q, block_k)
    return -(-length // step) * step


def pad_ranges(start: jax.Array, end: jax.Array, length: int) -> tuple[jax.Array, jax.Array]:
    """Key ranges for rows padded to `length`: each new query sees only itself."""
    b, old = start.shape
    extra = jnp.broadcast_to(jnp.arange(old, length, dtype=jnp.int32), (b, length - old))
    return jnp.concatenate([start, extra], 1), jnp.concatenate([end, extra + 1], 1)


def block_bounds(start: jax.Array, end: jax.Array, block_q: int, block_k: int) -> BlockBounds:
    """The key blocks of each query block and the query blocks of each key block.

    start, end: int32 [B, L] key ranges with L a multiple of both block sizes. Bounds are exact
    for any ranges (no monotonicity assumed): a block outside them holds no allowed pair. Inside
    them a kernel still applies the element mask; when the blocks that see a key block are not
    contiguous (never for the batch builder's layouts) the gaps are visited and fully masked.
    """
    b, length = start.shape
    nq, nk = length // block_q, length // block_k
    lo = start.reshape(b, nq, block_q).min(-1)
    hi = end.reshape(b, nq, block_q).max(-1)
    kv_lo = lo // block_k
    kv_hi = -(-hi // block_k)
    # Query block i needs key block j iff some query of i has a key of j in range; with one
    # interval per query that is: the union interval of i overlaps j. Query blocks that see key
    # block j therefore satisfy kv_lo[i] <= j < kv_hi[i].
    j = jnp.arange(nk, dtype=jnp.int32)
    sees = (kv_lo[:, :, None] <= j) & (j < kv_hi[:, :, None])  # [B, nq, nk]
    i = jnp.arange(nq, dtype=jnp.int32)[None, :, None]
    q_lo = jnp.where(sees, i, nq).min(1)
    q_hi = jnp.where(sees, i + 1, 0).max(1)
    q_lo = jnp.minimum(q_lo, q_hi)  # a key block no query sees: the empty range [q_hi, q_hi)
    as_int = lambda x: x.astype(jnp.int32)  # noqa: E731
    return BlockBounds(as_int(kv_lo), as_int(kv_hi), as_int(q_lo), as_int(q_hi))


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a
