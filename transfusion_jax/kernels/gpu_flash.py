"""Flash attention for the Transfusion mask on GPUs: a Pallas Triton kernel over key ranges.

Why Pallas Triton and not cuDNN: cuDNN's fused attention takes causal masks, padding lengths and
(recently) packed segments, but not Transfusion's bidirectional image blocks inside causal text;
through `jax.nn.dot_product_attention` they can only come as a dense [B, 1, L, L] bias, which is the
quadratic array this kernel exists to avoid. Every query here attends one interval of keys
`[start, end)` (`attention.key_ranges`), and that single rule covers documents, causal text,
bidirectional images and padding.

The kernel follows FlashAttention-2: one program per (query tile, row, head) streams the key tiles
with an online softmax in float32 (base-2 exponentials) and writes the output and its log-sum-exp.
It visits only the key tiles `[kv_lo, kv_hi)` of its query tile (`blocks.block_bounds`): tiles no
query of the tile may see are never loaded or computed. The backward pass is two kernels: dq per
query tile over the same key tiles, and dk/dv per key tile over the query tiles `[q_lo, q_hi)` that
see it. With grouped KV heads, dk/dv are computed per query head and summed over each group by XLA
(one [B, L, H, D] float32 buffer each, small next to the [B, H, L, L] logits it replaces).

Lengths that are not a multiple of the tiles are padded (the new queries see only themselves, no
real query sees them), and a head size that is not a power of two is zero-padded (Triton tiles are
powers of two); both are sliced off again. Off a GPU the kernels run in Pallas interpret mode.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from transfusion_jax.kernels import blocks

LOG2_E = math.log2(math.e)
# Finite, so a query tile row with no allowed key in one key tile gives no NaN; such a tile's
# contribution is wiped once the row meets its first allowed key (every query sees itself).
MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def flash_attention(
    q, k, v, start, end, *, block_q=None, block_k=None, block_bwd=None, interpret=None
):
    """Attention of each query over keys `[start, end)`; q [B, L, H, D], k/v [B, L, G, D].

    start, end: int32 [B, L]. Equal to `attention._xla_attention` with the dense mask of these
    ranges (softmax scale D**-0.5, float32 statistics); the output has q's dtype. Tiles: the
    forward's `block_q` x `block_k`, the backward kernels' square `block_bwd`.
    """
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    length, head_dim = q.shape[1], q.shape[-1]
    block_q = block_q or min(128 if head_dim <= 64 else 64, _pow2_at_least(length))
    block_k = block_k or min(64, _pow2_at_least(length))
    block_bwd = block_bwd or min(64, _pow2_at_least(length))
    settings = Settings(block_q, block_k, block_bwd, bool(interpret))
    padded = blocks.padded_length(length, block_q, block_k)
    padded = blocks.padded_length(padded, settings.block_bwd, settings.block_bwd)
    dim = _pow2_at_least(head_dim)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - length), (0, 0), (0, dim - head_dim)))  # noqa: E731
    start, end = blocks.pad_ranges(start.astype(jnp.int32), end.astype(jnp.int32), padded)
    out = _attention(pad(q), pad(k), pad(v), start, end, head_dim**-0.5, settings)
    return out[:, :length, :, :head_dim]


@dataclasses.dataclass(frozen=True)
class Settings:
    """Static kernel settings: forward tiles, the backward kernels' square tile, interpret mode."""

    block_q: int
    block_k: int
    block_bwd: int
    interpret: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, start, end, scale, settings):
    return _forward(q, k, v, start, end, scale, settings)[0]


def _attention_fwd(q, k, v, start, end, scale, settings):
    out, lse = _forward(q, k, v, start, end, scale, settings)
    return out, (q, k, v, start, end, out, lse)


def _attention_bwd(scale, settings, residuals, d_out):
    q, k, v, start, end, out, lse = residuals
    d_out = d_out.astype(q.dtype)
    delta = jnp.einsum("blhd,blhd->bhl", out.astype(jnp.float32), d_out.astype(jnp.float32))
    bounds = blocks.block_bounds(start, end, settings.block_bwd, settings.block_bwd)
    dq = _backward_dq(q, k, v, start, end, bounds, d_out, lse, delta, scale, settings)
    dk, dv = _backward_dkv(q, k, v, start, end, bounds, d_out, lse, delta, scale, settings)
    no_grad = jax.tree.map(lambda x: jnp.zeros(x.shape, jax.dtypes.float0), (start, end))
    return (dq, dk, dv, *no_grad)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _compiler_params(warps: int, stages: int = 2):
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=warps, num_stages=stages)


def _precision(dtype):
    """Full float32 products for float32 inputs (no TF32), the native path for 16-bit ones."""
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _dot(a, b, trans_a=False, trans_b=False, precision=None):
    """a @ b (either transposed) accumulated in float32: Triton's tensor-core dot."""
    contract = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(
        a, b, contract, precision=precision, preferred_element_type=jnp.float32
    )


def _allowed(q_start, q_end, first_key: jax.Array, block_k: int) -> jax.Array:
    """bool [bq, bk]: which keys of the tile starting at `first_key` each query may see."""
    keys = first_key + jnp.arange(block_k, dtype=jnp.int32)[None, :]
    return (keys >= q_start[:, None]) & (keys < q_end[:, None])


def _forward(q, k, v, start, end, scale, settings):
    b, length, h, d = q.shape
    group = h // k.shape[2]
    bq, bk = settings.block_q, settings.block_k
    bounds = blocks.block_bounds(start, end, bq, bk)
    precision = _precision(q.dtype)

    def kernel(q_ref, k_ref, v_ref, start_ref, end_ref, lo_ref, hi_ref, o_ref, lse_ref):
        q_tile = q_ref[...]
        q_start, q_end = start_ref[...], end_ref[...]

        def step(j, carry):
            acc, m, total = carry
            keys = pl.ds(j * bk, bk)
            s = _dot(q_tile, k_ref[keys, :], trans_b=True, precision=precision)
            s = jnp.where(_allowed(q_start, q_end, j * bk, bk), s * (scale * LOG2_E), MASKED)
            m_new = jnp.maximum(m, s.max(axis=1))
            p = jnp.exp2(s - m_new[:, None])
            correction = jnp.exp2(m - m_new)
            total = total * correction + p.sum(axis=1)
            pv = _dot(p.astype(v_ref.dtype), v_ref[keys, :], precision=precision)
            return acc * correction[:, None] + pv, m_new, total

        init = (
            jnp.zeros((bq, d), jnp.float32),
            jnp.full((bq,), MASKED, jnp.float32),
            jnp.zeros((bq,), jnp.float32),
        )
        acc, m, total = jax.lax.fori_loop(lo_ref[0], hi_ref[0], step, init)
        o_ref[...] = (acc / total[:, None]).astype(o_ref.dtype)
        lse_ref[...] = m + jnp.log2(total)

    tile = lambda rows: pl.BlockSpec((None, rows, None, d), lambda i, r, n: (r, i, n, 0))  # noqa: E731
    whole_kv = pl.BlockSpec((None, length, None, d), lambda i, r, n: (r, 0, n // group, 0))
    ranges = pl.BlockSpec((None, bq), lambda i, r, n: (r, i))
    one = pl.BlockSpec((None, 1), lambda i, r, n: (r, i))
    return pl.pallas_call(
        kernel,
        grid=(length // bq, b, h),
        in_specs=[tile(bq), whole_kv, whole_kv, ranges, ranges, one, one],
        out_specs=[tile(bq), pl.BlockSpec((None, None, bq), lambda i, r, n: (r, n, i))],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, h, length), jnp.float32),
        ],
        compiler_params=_compiler_params(4 if d <= 64 else 8),
        interpret=settings.interpret,
        name="transfusion_flash_forward",
    )(q, k, v, start, end, bounds.kv_lo, bounds.kv_hi)


def _backward_dq(q, k, v, start, end, bounds, d_out, lse, delta, scale, settings):
    b, length, h, d = q.shape
    group = h // k.shape[2]
    blk = settings.block_bwd
    precision = _precision(q.dtype)

    def kernel(q_ref, do_ref, lse_ref, delta_ref, start_ref, end_ref, lo_ref, hi_ref, k_ref, v_ref,
               dq_ref):  # fmt: skip
        q_tile, do_tile = q_ref[...], do_ref[...]
        lse_tile, delta_tile = lse_ref[...], delta_ref[...]
        q_start, q_end = start_ref[...], end_ref[...]

        def step(j, dq):
            keys = pl.ds(j * blk, blk)
            k_tile, v_tile = k_ref[keys, :], v_ref[keys, :]
            s = _dot(q_tile, k_tile, trans_b=True, precision=precision) * (scale * LOG2_E)
            allowed = _allowed(q_start, q_end, j * blk, blk)
            p = jnp.where(allowed, jnp.exp2(s - lse_tile[:, None]), 0.0)
            dp = _dot(do_tile, v_tile, trans_b=True, precision=precision)
            ds = p * (dp - delta_tile[:, None])
            return dq + _dot(ds.astype(k_tile.dtype), k_tile, precision=precision)

        dq = jax.lax.fori_loop(lo_ref[0], hi_ref[0], step, jnp.zeros((blk, d), jnp.float32))
        dq_ref[...] = (dq * scale).astype(dq_ref.dtype)

    tile = pl.BlockSpec((None, blk, None, d), lambda i, r, n: (r, i, n, 0))
    stat = pl.BlockSpec((None, None, blk), lambda i, r, n: (r, n, i))
    ranges = pl.BlockSpec((None, blk), lambda i, r, n: (r, i))
    one = pl.BlockSpec((None, 1), lambda i, r, n: (r, i))
    whole_kv = pl.BlockSpec((None, length, None, d), lambda i, r, n: (r, 0, n // group, 0))
    return pl.pallas_call(
        kernel,
        grid=(length // blk, b, h),
        in_specs=[tile, tile, stat, stat, ranges, ranges, one, one, whole_kv, whole_kv],
        out_specs=tile,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(4 if d <= 64 else 8),
        interpret=settings.interpret,
        name="transfusion_flash_dq",
    )(q, d_out, lse, delta, start, end, bounds.kv_lo, bounds.kv_hi, k, v)


def _backward_dkv(q, k, v, start, end, bounds, d_out, lse, delta, scale, settings):
    b, length, h, d = q.shape
    kv_heads = k.shape[2]
    group = h // kv_heads
    blk = settings.block_bwd
    precision = _precision(q.dtype)

    def kernel(k_ref, v_ref, lo_ref, hi_ref, q_ref, do_ref, lse_ref, delta_ref, start_ref, end_ref,
               dk_ref, dv_ref):  # fmt: skip
        k_tile, v_tile = k_ref[...], v_ref[...]
        first_key = pl.program_id(0) * blk

        def step(i, carry):
            dk, dv = carry
            queries = pl.ds(i * blk, blk)
            q_tile, do_tile = q_ref[queries, :], do_ref[queries, :]
            allowed = _allowed(start_ref[queries], end_ref[queries], first_key, blk)
            s = _dot(q_tile, k_tile, trans_b=True, precision=precision) * (scale * LOG2_E)
            p = jnp.where(allowed, jnp.exp2(s - lse_ref[queries][:, None]), 0.0)
            dv = dv + _dot(p.astype(do_tile.dtype), do_tile, trans_a=True, precision=precision)
            dp = _dot(do_tile, v_tile, trans_b=True, precision=precision)
            ds = p * (dp - delta_ref[queries][:, None])
            dk = dk + _dot(ds.astype(q_tile.dtype), q_tile, trans_a=True, precision=precision)
            return dk, dv

        zeros = jnp.zeros((blk, d), jnp.float32)
        dk, dv = jax.lax.fori_loop(lo_ref[0], hi_ref[0], step, (zeros, zeros))
        dk_ref[...] = dk * scale
        dv_ref[...] = dv

    kv_tile = pl.BlockSpec((None, blk, None, d), lambda j, r, n: (r, j, n // group, 0))
    one = pl.BlockSpec((None, 1), lambda j, r, n: (r, j))
    whole = pl.BlockSpec((None, length, None, d), lambda j, r, n: (r, 0, n, 0))
    whole_stat = pl.BlockSpec((None, None, length), lambda j, r, n: (r, n, 0))
    whole_ranges = pl.BlockSpec((None, length), lambda j, r, n: (r, 0))
    per_head = pl.BlockSpec((None, blk, None, d), lambda j, r, n: (r, j, n, 0))
    dk, dv = pl.pallas_call(
        kernel,
        grid=(length // blk, b, h),
        in_specs=[
            kv_tile,
            kv_tile,
            one,
            one,
            whole,
            whole,
            whole_stat,
            whole_stat,
            whole_ranges,
            whole_ranges,
        ],  # fmt: skip
        out_specs=[per_head, per_head],
        out_shape=[jax.ShapeDtypeStruct(q.shape, jnp.float32)] * 2,
        compiler_params=_compiler_params(4 if d <= 64 else 8),
        interpret=settings.interpret,
        name="transfusion_flash_dkv",
    )(k, v, bounds.q_lo, bounds.q_hi, q, d_out, lse, delta, start, end)
    per_group = lambda x: x.reshape(b, length, kv_heads, group, d).sum(3).astype(k.dtype)  # noqa: E731
    return per_group(dk), per_group(dv)


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 1).bit_length()
