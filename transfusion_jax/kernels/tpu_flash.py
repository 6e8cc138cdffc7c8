"""Flash attention for TPUs (Pallas Mosaic), forward and backward, over per-query key ranges.

Query `i` attends the keys `[start[i], end[i])` (`attention.key_ranges`). One interval per query
expresses all of Transfusion's mask at once: document boundaries, causal text, bidirectional
images and isolated padding. jax's own splash attention is not used because its masks are static
numpy masks (turned into block tables at trace time) plus segment ids; Transfusion's image spans
depend on the data of each batch, and segment ids alone cannot say "causal in text, bidirectional
in an image". Key ranges can, and they give exact per-block bounds cheaply (`blocks.py`).

Skipping: `blocks.block_bounds` gives, for each query block, the key blocks `[kv_lo, kv_hi)` that
hold at least one allowed pair (and for each key block the query blocks `[q_lo, q_hi)` that see
it). They are scalar-prefetch arguments of a `pltpu.PrefetchScalarGridSpec`. The forward and dq
grids are (B, H, query blocks, steps) with the last axis "arbitrary": step `j` loads key block
`min(kv_lo + j, kv_hi - 1)`, so the steps past the range name the block already in VMEM (Pallas
issues no new DMA for an unchanged block index) and the body runs under `pl.when(kv_lo + j <
kv_hi)`: a fully masked block is neither fetched nor computed, only a grid step of a few hundred
nanoseconds is spent on it. The dk/dv grid is (B, G, key blocks, rep * query blocks), the same
scheme over `[q_lo, q_hi)`.

Layout: queries are in lanes. Every kernel computes the transposed logits `s^T = k q^T` of shape
[block_k, block_q], so the per-query quantities (start, end, running max and sum, logsumexp,
delta) are [1, block_q] rows that broadcast along sublanes and are stored compactly in HBM as
[..., 1, L] arrays (a column form would be padded to 128 lanes). The wrapper transposes to
head-major layouts in XLA: q, dO as [B, H, L, D]; k, v as [B, G, L, D]; and v (forward) and k
(dq) also as [B, G, D, L], so that `o^T += v^T p^T` and `dq^T += k^T ds^T` are plain matmuls;
o^T and dq^T come out as [B, H, D, L] and XLA transposes them back to [B, L, H, D].

Grouped KV heads (G dividing H): query head h reads KV head h // (H // G) through the index maps;
nothing is repeated in HBM. The dk/dv kernel accumulates, in VMEM, over the H // G query heads of
its KV head as well as over the query blocks, so dk and dv come out per KV head.

Numerics: logits (scale D**-0.5 applied to the float32 logits), softmax statistics and all
accumulators are float32; probabilities are cast to v's dtype for the value matmul, as in
`attention._xla_attention`. delta = sum(out * dO) is computed in XLA.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from transfusion_jax.kernels.blocks import block_bounds, pad_ranges, padded_length

DEFAULT_BLOCK = 512
LANES = 128
# Finite, so that max/exp of a fully masked row never produce inf - inf.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
NT = (((1,), (1,)), ((), ()))  # a [m, d] x b [n, d] -> [m, n]


def flash_attention(q, k, v, start, end, *, block_q=None, block_k=None, interpret=None):
    """Attention where query i sees keys start[i] <= j < end[i]; differentiable in q, k, v.

    q: [B, L, H, D]; k, v: [B, L, G, D] with G dividing H; start, end: int32 [B, L], every range
    non-empty. Returns [B, L, H, D] in q's dtype, equal to `attention._xla_attention` with the
    dense mask of the ranges. Block sizes default to 512 (or L rounded up to 128 when shorter);
    compiled for a TPU they must be multiples of 128 or the whole padded length. L need not be a
    multiple of them: rows are padded with zeros, each padded query seeing only itself.
    `interpret=None` runs in Pallas interpret mode unless the default backend is a TPU.
    """
    b, length, h, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, length) or k.shape[3] != d or h % k.shape[2]:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: want [B, L, H, D], [B, L, G, D]")
    if start.shape != (b, length) or end.shape != (b, length):
        raise ValueError(f"start {start.shape} / end {end.shape}: want {(b, length)}")
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    default = min(DEFAULT_BLOCK, -(-length // LANES) * LANES)
    block_q, block_k = block_q or default, block_k or default
    padded = padded_length(length, block_q, block_k)
    if not interpret:
        for name, size in (("block_q", block_q), ("block_k", block_k)):
            if size % LANES and size != padded:
                raise ValueError(f"{name}={size}: a TPU kernel wants a multiple of {LANES}")
    start, end = start.astype(jnp.int32), end.astype(jnp.int32)
    if padded != length:
        pad = ((0, 0), (0, padded - length), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
        start, end = pad_ranges(start, end, padded)
    out = _attention(q, k, v, start, end, (block_q, block_k, bool(interpret)))
    return out[:, :length]


# The kernels. Block refs: q, dO [bq, D]; k, v [bk, D]; v^T, k^T [D, bk]; rows [1, bq].


def _allowed(key_block, block_k, start, end, shape):
    """bool [bk, bq]: key key_block * bk + r is in [start, end) of query column c."""
    keys = key_block * block_k + lax.broadcasted_iota(jnp.int32, shape, 0)
    return (keys >= start) & (keys < end)


def _forward_kernel(
    kv_lo, kv_hi, q_ref, k_ref, vt_ref, start_ref, end_ref,  # inputs
    ot_ref, lse_ref,  # outputs
    m_ref, l_ref, acc_ref,  # scratch
    *, scale, block_k, num_q_blocks, steps,
):  # fmt: skip
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    lo, hi = kv_lo[b * num_q_blocks + i], kv_hi[b * num_q_blocks + i]

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(lo + j < hi)
    def _step():
        s = lax.dot_general(k_ref[...], q_ref[...], NT, preferred_element_type=jnp.float32)
        s = s * scale  # [bk, bq]
        allowed = _allowed(lo + j, block_k, start_ref[...], end_ref[...], s.shape)
        s = jnp.where(allowed, s, MASK_VALUE)
        m_prev = m_ref[...]
        m_next = jnp.maximum(m_prev, s.max(axis=0, keepdims=True))
        p = jnp.where(allowed, jnp.exp(s - m_next), 0.0)
        alpha = jnp.exp(m_prev - m_next)
        m_ref[...] = m_next
        l_ref[...] = alpha * l_ref[...] + p.sum(axis=0, keepdims=True)
        vt = vt_ref[...]
        pv = jnp.dot(vt, p.astype(vt.dtype), preferred_element_type=jnp.float32)  # [D, bq]
        acc_ref[...] = alpha * acc_ref[...] + pv

    @pl.when(j == steps - 1)
    def _finish():
        total = l_ref[...]
        ot_ref[...] = (acc_ref[...] / total).astype(ot_ref.dtype)
        lse_ref[...] = m_ref[...] + jnp.log(total)


def _dq_kernel(
    kv_lo, kv_hi, q_ref, k_ref, v_ref, kt_ref, do_ref, lse_ref, delta_ref, start_ref, end_ref,
    dqt_ref,  # output
    acc_ref,  # scratch
    *, scale, block_k, num_q_blocks, steps,
):  # fmt: skip
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    lo, hi = kv_lo[b * num_q_blocks + i], kv_hi[b * num_q_blocks + i]

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(lo + j < hi)
    def _step():
        s = lax.dot_general(k_ref[...], q_ref[...], NT, preferred_element_type=jnp.float32)
        s = s * scale
        allowed = _allowed(lo + j, block_k, start_ref[...], end_ref[...], s.shape)
        p = jnp.where(allowed, jnp.exp(s - lse_ref[...]), 0.0)
        dp = lax.dot_general(v_ref[...], do_ref[...], NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[...])  # [bk, bq]
        kt = kt_ref[...]
        acc_ref[...] += jnp.dot(kt, ds.astype(kt.dtype), preferred_element_type=jnp.float32)

    @pl.when(j == steps - 1)
    def _finish():
        dqt_ref[...] = (acc_ref[...] * scale).astype(dqt_ref.dtype)


def _dkv_kernel(
    q_lo, q_hi, q_ref, do_ref, lse_ref, delta_ref, start_ref, end_ref, k_ref, v_ref,
    dk_ref, dv_ref,  # outputs
    dk_acc, dv_acc,  # scratch
    *, scale, block_k, num_q_blocks, num_k_blocks, steps,
):  # fmt: skip
    b, j, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    lo, hi = q_lo[b * num_k_blocks + j], q_hi[b * num_k_blocks + j]
    t = lax.rem(step, num_q_blocks)

    @pl.when(step == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    @pl.when(lo + t < hi)
    def _step():
        q, do = q_ref[...], do_ref[...]
        s = lax.dot_general(k_ref[...], q, NT, preferred_element_type=jnp.float32) * scale
        allowed = _allowed(j, block_k, start_ref[...], end_ref[...], s.shape)
        p = jnp.where(allowed, jnp.exp(s - lse_ref[...]), 0.0)  # [bk, bq]
        dv_acc[...] += jnp.dot(p.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp = lax.dot_general(v_ref[...], do, NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[...])
        dk_acc[...] += jnp.dot(ds.astype(q.dtype), q, preferred_element_type=jnp.float32)

    @pl.when(step == steps - 1)
    def _finish():
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


# The pallas_calls. Arrays are padded; q, dO [B, H, L, D]; k, v [B, G, L, D]; rows [B, ., 1, L].


def _params(*semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _kv_head(head, rep):
    """The KV head of a query head (lax.div: jnp's floor division lowers through lax.sign, whose
    Mosaic rule asks the default device for its TPU generation, which fails on a CPU host)."""
    return head if rep == 1 else lax.div(head, jnp.int32(rep))


def _clamped(lo_ref, hi_ref, row, step):
    """Block `lo + step`, held at the last block of the range once past it (no new DMA)."""
    return jnp.maximum(jnp.minimum(lo_ref[row] + step, hi_ref[row] - 1), 0)


def _query_tile_specs(rep, nq, d, block_q, block_k):
    """BlockSpecs of the grids over (row, head, query tile, step) of the forward and dq kernels:
    a query tile [block_q, d]; its key tile [block_k, d] and transposed [d, block_k] (clamped
    to the tile's bounds, from the scalar-prefetched kv_lo / kv_hi); the tile's start/end rows
    [1, block_q]; a per-head row [1, block_q] (logsumexp, delta); a transposed output tile."""

    def kv_block(bi, i, j, lo_ref, hi_ref):
        return _clamped(lo_ref, hi_ref, bi * nq + i, j)

    return (
        pl.BlockSpec((None, None, block_q, d), lambda bi, hh, i, j, *_: (bi, hh, i, 0)),
        pl.BlockSpec(
            (None, None, block_k, d),
            lambda bi, hh, i, j, *r: (bi, _kv_head(hh, rep), kv_block(bi, i, j, *r), 0),
        ),
        pl.BlockSpec(
            (None, None, d, block_k),
            lambda bi, hh, i, j, *r: (bi, _kv_head(hh, rep), 0, kv_block(bi, i, j, *r)),
        ),
        pl.BlockSpec((None, 1, block_q), lambda bi, hh, i, j, *_: (bi, 0, i)),
        pl.BlockSpec((None, None, 1, block_q), lambda bi, hh, i, j, *_: (bi, hh, 0, i)),
        pl.BlockSpec((None, None, d, block_q), lambda bi, hh, i, j, *_: (bi, hh, 0, i)),
    )


def _forward(q, k, vt, start_row, end_row, bounds, block_q, block_k, interpret):
    b, h, length, d = q.shape
    nq, nk = length // block_q, length // block_k
    specs = _query_tile_specs(h // k.shape[1], nq, d, block_q, block_k)
    q_spec, k_spec, vt_spec, range_spec, lse_spec, ot_spec = specs
    kernel = functools.partial(
        _forward_kernel,
        scale=d**-0.5,
        block_k=block_k,
        num_q_blocks=nq,
        steps=nk,
    )
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, h, nq, nk),
            in_specs=[q_spec, k_spec, vt_spec, range_spec, range_spec],
            out_specs=[ot_spec, lse_spec],
            scratch_shapes=[
                pltpu.VMEM((1, block_q), jnp.float32),
                pltpu.VMEM((1, block_q), jnp.float32),
                pltpu.VMEM((d, block_q), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((b, h, d, length), q.dtype),
            jax.ShapeDtypeStruct((b, h, 1, length), jnp.float32),
        ],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        cost_estimate=_cost(q, k, 2),
        interpret=interpret,
        name="transfusion_flash_forward",
    )(bounds.kv_lo.reshape(-1), bounds.kv_hi.reshape(-1), q, k, vt, start_row, end_row)


def _dq(q, k, v, kt, do, lse, delta, start_row, end_row, bounds, block_q, block_k, interpret):
    b, h, length, d = q.shape
    nq, nk = length // block_q, length // block_k
    specs = _query_tile_specs(h // k.shape[1], nq, d, block_q, block_k)
    q_spec, k_spec, kt_spec, range_spec, row_spec, dqt_spec = specs
    kernel = functools.partial(
        _dq_kernel, scale=d**-0.5, block_k=block_k, num_q_blocks=nq, steps=nk
    )
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, h, nq, nk),
            in_specs=[q_spec, k_spec, k_spec, kt_spec, q_spec, row_spec, row_spec]
            + [range_spec, range_spec],
            out_specs=dqt_spec,
            scratch_shapes=[pltpu.VMEM((d, block_q), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct((b, h, d, length), q.dtype),
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        cost_estimate=_cost(q, k, 3),
        interpret=interpret,
        name="transfusion_flash_dq",
    )(
        bounds.kv_lo.reshape(-1),
        bounds.kv_hi.reshape(-1),
        *(q, k, v, kt, do, lse, delta, start_row, end_row),
    )


def _dkv(q, k, v, do, lse, delta, start_row, end_row, bounds, block_q, block_k, interpret):
    b, h, length, d = q.shape
    g = k.shape[1]
    rep = h // g
    nq, nk = length // block_q, length // block_k

    def q_head(gi, step):
        return gi * rep + lax.div(step, nq)

    def q_block(bi, j, step, lo_ref, hi_ref):
        return _clamped(lo_ref, hi_ref, bi * nk + j, lax.rem(step, nq))

    def q_index(bi, gi, j, step, *r):
        return (bi, q_head(gi, step), q_block(bi, j, step, *r), 0)

    def row_index(bi, gi, j, step, *r):
        return (bi, q_head(gi, step), 0, q_block(bi, j, step, *r))

    def range_index(bi, gi, j, step, *r):
        return (bi, 0, q_block(bi, j, step, *r))

    q_spec = pl.BlockSpec((None, None, block_q, d), q_index)
    row_spec = pl.BlockSpec((None, None, 1, block_q), row_index)
    range_spec = pl.BlockSpec((None, 1, block_q), range_index)
    kv_spec = pl.BlockSpec((None, None, block_k, d), lambda bi, gi, j, step, *_: (bi, gi, j, 0))
    steps = rep * nq
    kernel = functools.partial(
        _dkv_kernel,
        scale=d**-0.5,
        block_k=block_k,
        num_q_blocks=nq,
        num_k_blocks=nk,
        steps=steps,
    )
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, g, nk, steps),
            in_specs=[q_spec, q_spec, row_spec, row_spec, range_spec, range_spec, kv_spec, kv_spec],
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[
                pltpu.VMEM((block_k, d), jnp.float32),
                pltpu.VMEM((block_k, d), jnp.float32),
            ],
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        cost_estimate=_cost(q, k, 4),
        interpret=interpret,
        name="transfusion_flash_dkv",
    )(
        bounds.q_lo.reshape(-1),
        bounds.q_hi.reshape(-1),
        *(q, do, lse, delta, start_row, end_row, k, v),
    )


def _cost(q, k, matmuls):
    """An upper bound (no block skipped) for XLA's scheduler."""
    b, h, length, d = q.shape
    pairs = b * h * length * length
    io = 2 * (q.size * q.dtype.itemsize + k.size * k.dtype.itemsize)
    return pl.CostEstimate(flops=2 * matmuls * pairs * d, transcendentals=pairs, bytes_accessed=io)


# Differentiation. Inputs padded, in the caller's [B, L, H, D] layout; config = (bq, bk, interpret).


def _heads_major(x):
    return x.transpose(0, 2, 1, 3)  # [B, L, H, D] -> [B, H, L, D]


def _heads_major_t(x):
    return x.transpose(0, 2, 3, 1)  # [B, L, H, D] -> [B, H, D, L]


def _rows(x):
    return x[:, None, :]  # [B, L] -> [B, 1, L]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, start, end, config):
    return _attention_forward(q, k, v, start, end, config)[0]


def _attention_forward(q, k, v, start, end, config):
    block_q, block_k, interpret = config
    bounds = block_bounds(start, end, block_q, block_k)
    ot, lse = _forward(
        _heads_major(q),
        _heads_major(k),
        _heads_major_t(v),
        _rows(start),
        _rows(end),
        bounds,
        block_q,
        block_k,
        interpret,
    )
    out = ot.transpose(0, 3, 1, 2)  # [B, H, D, L] -> [B, L, H, D]
    return out, (q, k, v, out, lse, start, end)


def _attention_backward(config, residuals, d_out):
    block_q, block_k, interpret = config
    q, k, v, out, lse, start, end = residuals
    bounds = block_bounds(start, end, block_q, block_k)
    d_out = d_out.astype(q.dtype)
    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1)  # [B, L, H]
    delta = delta.transpose(0, 2, 1)[:, :, None, :]  # [B, H, 1, L]
    qh, kh, vh, doh = _heads_major(q), _heads_major(k), _heads_major(v), _heads_major(d_out)
    rows = (lse, delta, _rows(start), _rows(end))
    dqt = _dq(qh, kh, vh, _heads_major_t(k), doh, *rows, bounds, block_q, block_k, interpret)
    dk, dv = _dkv(qh, kh, vh, doh, *rows, bounds, block_q, block_k, interpret)
    dq = dqt.transpose(0, 3, 1, 2)
    return dq, _heads_major(dk), _heads_major(dv), None, None


_attention.defvjp(_attention_forward, _attention_backward)
