"""The TPU flash kernel (Pallas interpret mode on this CPU) against the dense-mask XLA attention,
that it skips the blocks outside the bounds, and that it compiles through Mosaic for a TPU."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import random_batch, tiny_config
from transfusion_jax.attention import (
    KeyRanges,
    _xla_attention,
    dot_product_attention,
    key_ranges,
    mask_from_key_ranges,
)
from transfusion_jax.kernels.blocks import block_bounds
from transfusion_jax.kernels.tpu_flash import flash_attention


def packed_ranges(seed, batch, length):
    """Key ranges of random packed rows with several documents, images and padding at the end
    in every row (the first seed from `seed` on whose rows have all three)."""
    cfg = tiny_config(image__latent_size=4, image__max_images=3)  # 4 patches per image
    for attempt in range(seed, seed + 100):
        rows = random_batch(np.random.default_rng(attempt), cfg, batch_size=batch, seq_len=length)
        seg, img = rows.segment_ids, rows.image_ids
        if (seg.max(1) >= 2).all() and (img >= 0).any(1).all() and (seg[:, -1] == 0).all():
            return key_ranges(jnp.asarray(seg), jnp.asarray(img))
    raise AssertionError("no layout with documents, images and padding in every row")


def qkv(seed, b, length, h, g, d, dtype):
    rng = np.random.default_rng(seed)
    shapes = [(b, length, h, d), (b, length, g, d), (b, length, g, d), (b, length, h, d)]
    return [jnp.asarray(rng.normal(size=s), dtype) for s in shapes]  # q, k, v, cotangent


def assert_close(got, want, tol):
    """Max error relative to the largest reference value."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


def outputs_and_grads(attend):
    """jit of (q, k, v, cotangent) -> (out, dq, dk, dv): one compilation (interpret mode
    spends its time compiling, not running)."""

    def run(q, k, v, cotangent):
        out, vjp = jax.vjp(attend, q, k, v)
        return (out, *vjp(cotangent))

    return jax.jit(run)


def flash(start, end, block_q, block_k):
    return outputs_and_grads(
        lambda q, k, v: flash_attention(q, k, v, start, end, block_q=block_q, block_k=block_k)
    )


def dense(mask):
    return outputs_and_grads(lambda q, k, v: _xla_attention(q, k, v, mask))


@pytest.mark.parametrize(
    "dtype, length, heads, kv_heads, dim, blocks",
    [
        (jnp.float32, 96, 4, 2, 16, (64, 64)),  # blocks that do not divide L: padded to 128
        (jnp.float32, 64, 4, 1, 8, (32, 16)),  # blocks that divide L, block_q != block_k
        (jnp.bfloat16, 96, 4, 2, 16, (32, 32)),
    ],
)
def test_matches_dense_xla_attention(dtype, length, heads, kv_heads, dim, blocks):
    start, end = packed_ranges(length, 2, length)
    q, k, v, ct = qkv(length, 2, length, heads, kv_heads, dim, dtype)
    got = flash(start, end, *blocks)(q, k, v, ct)
    want = dense(mask_from_key_ranges(start, end))(q, k, v, ct)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert g.dtype == dtype, name
        assert_close(g, w, tol)


def test_dispatch_with_default_blocks():
    """`dot_product_attention(..., "tpu_flash")` with key ranges: the default block (L rounded up
    to 128, one block) on a CPU runs in interpret mode."""
    start, end = packed_ranges(7, 1, 80)
    q, k, v, _ = qkv(7, 1, 80, 4, 4, 8, jnp.bfloat16)
    got = dot_product_attention(q, k, v, KeyRanges(start, end), implementation="tpu_flash")
    assert_close(got, _xla_attention(q, k, v, mask_from_key_ranges(start, end)), 2e-2)


def test_fully_masked_blocks_are_skipped():
    """Many short documents: few (query block, key block) pairs are visited, and NaN keys and
    values in one key block reach exactly the query blocks whose bounds include it."""
    length, block = 128, 16
    start, end = packed_ranges(3, 2, length)
    bounds = block_bounds(start, end, block, block)
    n = length // block
    visited = int((bounds.kv_hi - bounds.kv_lo).sum())
    assert visited <= 0.4 * 2 * n * n, f"{visited} of {2 * n * n} block pairs visited"
    assert (np.asarray(bounds.kv_lo) > 0).any(), "some query block skips the leading key blocks"

    q, k, v, ct = qkv(3, 2, length, 2, 1, 8, jnp.float32)
    run = flash(start, end, block, block)
    got = run(q, k, v, ct)
    for g, w in zip(got, dense(mask_from_key_ranges(start, end))(q, k, v, ct), strict=True):
        assert_close(g, w, 1e-5)

    row, key_block = 0, n // 2
    lo, hi = int(bounds.q_lo[row, key_block]), int(bounds.q_hi[row, key_block])
    assert 0 < hi - lo < n
    poisoned = slice(key_block * block, (key_block + 1) * block)
    k, v = k.at[row, poisoned].set(jnp.nan), v.at[row, poisoned].set(jnp.nan)
    out = np.asarray(run(q, k, v, ct)[0]).reshape(2, n, block, -1)
    clean = np.asarray(got[0]).reshape(out.shape)
    seen = np.isnan(out[row]).any(axis=(1, 2))  # per query block of the poisoned row
    np.testing.assert_array_equal(seen, (np.arange(n) >= lo) & (np.arange(n) < hi))
    np.testing.assert_array_equal(out[row][~seen], clean[row][~seen])
    np.testing.assert_array_equal(out[1 - row], clean[1 - row])


def test_key_blocks_that_no_query_sees_get_zero_gradients():
    """Ranges need not contain the query: with every query looking into the first half only, the
    key blocks of the second half are never visited (NaN there changes nothing) and get zero dk
    and dv."""
    length, block = 64, 16
    half = length // 2
    pos = jnp.arange(length, dtype=jnp.int32)[None]
    start, end = jnp.zeros_like(pos), jnp.minimum(pos, half - 1) + 1
    assert int(block_bounds(start, end, block, block).q_hi[0, -1]) == 0
    q, k, v, ct = qkv(5, 1, length, 2, 2, 8, jnp.float32)
    k, v = (x.at[:, half:].set(jnp.nan) for x in (k, v))
    out, dq, dk, dv = flash(start, end, block, block)(q, k, v, ct)
    mask = mask_from_key_ranges(start, end)[..., :half]
    want = dense(mask)(q, k[:, :half], v[:, :half], ct)
    for g, w in zip((out, dq, dk[:, :half], dv[:, :half]), want, strict=True):
        assert_close(g, w, 1e-5)
    assert not np.asarray(dk[:, half:]).any() and not np.asarray(dv[:, half:]).any()


def test_tpu_blocks_must_be_lane_multiples():
    q = k = v = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    start, end = jnp.zeros((1, 256), jnp.int32), jnp.full((1, 256), 256, jnp.int32)
    with pytest.raises(ValueError, match="multiple of 128"):
        flash_attention(q, k, v, start, end, block_q=64, interpret=False)
    with pytest.raises(ValueError, match="want"):
        flash_attention(q, k[:, :128], v[:, :128], start, end)


TOPOLOGIES = ("v5e:2x2", "v6e:2x2", "v5p:2x2x1", "v4:2x2x1")


@pytest.fixture(scope="module")
def tpu_device():
    """A device of a virtual TPU topology: compiles for a TPU without one (libtpu only)."""
    pytest.importorskip("libtpu", reason="libtpu is not installed")
    # Another process (a parallel test run) may hold libtpu's lock file; compiling needs no chip.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    errors = []
    for name in TOPOLOGIES:
        try:
            return topologies.get_topology_desc(platform="tpu", topology_name=name).devices[0]
        except Exception as e:  # any failure: try the next generation
            errors.append(f"{name}: {e}")
    pytest.skip("no virtual TPU topology: " + "; ".join(errors))


@pytest.mark.parametrize("dim, kv_heads", [(64, 2), (128, 4)])
def test_forward_and_backward_compile_through_mosaic(tpu_device, dim, kv_heads):
    """bfloat16 fwd + bwd at L=1024 compiled for a TPU: its three kernels are Mosaic calls."""
    sharding = jax.sharding.SingleDeviceSharding(tpu_device)
    b, length, heads = 1, 1024, 4

    def arg(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    def loss(q, k, v, start, end):
        out = flash_attention(q, k, v, start, end, interpret=False)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    args = [arg((b, length, h, dim), jnp.bfloat16) for h in (heads, kv_heads, kv_heads)]
    args += [arg((b, length), jnp.int32)] * 2
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    compiled = grad.lower(*args).compile()
    assert compiled.as_text().count('custom_call_target="tpu_custom_call"') == 3
