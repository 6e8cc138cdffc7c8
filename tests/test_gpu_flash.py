"""The GPU flash kernel (Pallas Triton, interpret mode here) against dense XLA attention, its
tile skipping, and its lowering for CUDA from this CPU host."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh

from tests.helpers import random_batch, tiny_config
from transfusion_jax import attention
from transfusion_jax.kernels import blocks, gpu_flash


def packed_ranges(seed, batch_size, seq_len):
    """Key ranges of a random packed batch: several documents and images a row, padding."""
    rng = np.random.default_rng(seed)
    cfg = tiny_config(image__latent_size=4, image__max_images=4)  # 4 patches per image
    batch = random_batch(rng, cfg, batch_size=batch_size, seq_len=seq_len)
    assert (batch.image_ids >= 0).any() and (batch.segment_ids == 0).any()
    return attention.key_ranges(jnp.asarray(batch.segment_ids), jnp.asarray(batch.image_ids))


def qkv(seed, b, length, heads, kv_heads, dim, dtype):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (b, length, heads, dim), dtype)
    k = jax.random.normal(keys[1], (b, length, kv_heads, dim), dtype)
    v = jax.random.normal(keys[2], (b, length, kv_heads, dim), dtype)
    d_out = jax.random.normal(keys[3], (b, length, heads, dim), dtype)
    return q, k, v, d_out


def relative_error(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize(
    "length,heads,kv_heads,dim,dtype,block_q,block_k,tolerance",
    [
        (64, 4, 2, 16, jnp.float32, 32, 16, 2e-6),  # tiles divide L; grouped KV heads
        (72, 2, 1, 24, jnp.float32, 32, 32, 2e-6),  # tiles do not divide L; D not a power of 2
        (64, 4, 4, 32, jnp.bfloat16, None, None, 2e-2),  # default tiles, bf16
    ],
)
def test_output_and_gradients_match_dense_attention(
    length, heads, kv_heads, dim, dtype, block_q, block_k, tolerance
):
    start, end = packed_ranges(length, batch_size=2, seq_len=length)
    q, k, v, d_out = qkv(length, 2, length, heads, kv_heads, dim, dtype)
    mask = attention.mask_from_key_ranges(start, end)

    def dense(q, k, v):
        return attention._xla_attention(q, k, v, mask)

    def flash(q, k, v):
        return gpu_flash.flash_attention(q, k, v, start, end, block_q=block_q, block_k=block_k)

    want, dense_vjp = jax.vjp(dense, q, k, v)
    got, flash_vjp = jax.vjp(flash, q, k, v)
    assert got.dtype == dtype and got.shape == want.shape
    assert relative_error(got, want) < tolerance
    for name, g, w in zip(("dq", "dk", "dv"), flash_vjp(d_out), dense_vjp(d_out), strict=True):
        assert relative_error(g, w) < tolerance, name


def test_tiles_outside_the_bounds_are_never_read():
    """Many short documents: most key tiles lie outside every query tile's bounds. Poisoning them
    with NaN changes nothing, in the output or the gradients, so the kernel never touches them."""
    length, tile = 128, 16
    seg = np.repeat(np.arange(1, 9), 16)[None]  # 8 documents of 16 text positions
    start, end = attention.key_ranges(jnp.asarray(seg), jnp.full_like(jnp.asarray(seg), -1))
    bounds = blocks.block_bounds(start, end, tile, tile)
    visited = int((bounds.kv_hi - bounds.kv_lo).sum())
    assert visited == 8  # each query tile sees one key tile, of 8 x 8
    q, k, v, d_out = qkv(0, 1, length, 2, 2, 16, jnp.float32)

    def flash(q, k, v):
        tiles = dict(block_q=tile, block_k=tile, block_bwd=tile)
        return gpu_flash.flash_attention(q, k, v, start, end, **tiles)

    def run(q, k, v):
        out, vjp = jax.vjp(flash, q, k, v)
        return out, vjp(d_out)

    clean_out, clean_grads = run(q, k, v)
    # Poison what query tile 0 never sees; its own outputs and dq must not change.
    k_bad, v_bad = k.at[:, tile:].set(jnp.nan), v.at[:, tile:].set(jnp.nan)
    out, grads = run(q, k_bad, v_bad)
    np.testing.assert_array_equal(out[:, :tile], clean_out[:, :tile])
    np.testing.assert_array_equal(grads[0][:, :tile], clean_grads[0][:, :tile])
    # Poisoned queries of later documents must leave the first document's dk/dv alone.
    _, (dq, dk, dv) = run(q.at[:, tile:].set(jnp.nan), k, v)
    np.testing.assert_array_equal(dk[:, :tile], clean_grads[1][:, :tile])
    np.testing.assert_array_equal(dv[:, :tile], clean_grads[2][:, :tile])


def test_dispatch_runs_the_kernel_from_key_ranges():
    start, end = packed_ranges(3, batch_size=2, seq_len=48)
    q, k, v, _ = qkv(3, 2, 48, 4, 2, 16, jnp.float32)
    want = attention._xla_attention(q, k, v, attention.mask_from_key_ranges(start, end))
    got = attention.dot_product_attention(q, k, v, attention.KeyRanges(start, end), "gpu_flash")
    assert relative_error(got, want) < 2e-6
    assert attention.resolve_implementation("auto", "gpu") == "gpu_flash"
    assert attention.resolve_implementation("auto", "tpu") == "tpu_flash"
    assert attention.resolve_implementation("auto", "cpu") == "xla"


def test_lowers_to_triton_for_cuda():
    """The real (non-interpret) kernels, forward and backward, lower for CUDA without a GPU."""
    b, length, heads, dim = 1, 256, 4, 64
    start, end = packed_ranges(5, batch_size=b, seq_len=length)
    shape = jax.ShapeDtypeStruct((b, length, heads, dim), jnp.bfloat16)

    def loss(q, k, v):
        out = gpu_flash.flash_attention(q, k, v, start, end, interpret=False)
        return out.astype(jnp.float32).sum()

    export = jax.export.export(
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))),
        platforms=("cuda",),
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )
    # jax 0.11+ lowers Triton for a described GPU; a host without one names it in an abstract
    # mesh (jax 0.10 lowers without it, and accepts the mesh).
    gpu = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    with jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=gpu)):
        exported = export(shape, shape, shape)
    text = exported.mlir_module()
    assert text.count("__gpu$xla.gpu.triton") == 3  # forward, dq, dk/dv
