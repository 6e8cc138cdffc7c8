"""Attention alone, forward + backward, on a packed Transfusion layout: time, throughput, memory.

  python -m experiments.bench_attention --seq 4096 --batch 8 --heads 24 --head_dim 64
  python -m experiments.bench_attention --implementations xla,gpu_flash --dtype bfloat16

Each row holds documents of `--text` caption tokens and one image of `--patches` patch positions
(the paper's 256 x 256 images: 256 patches), packed until the row is full, the rest padding.
For each implementation: the median time of jit(grad) of sum(attention * cotangent), the useful
TFLOP/s (4 * D FLOPs per allowed (query, key) pair and head forward, 2.5x that for forward +
backward, as FlashAttention counts), the fraction of the L x L pairs allowed, the temporary memory
of the compiled step (what attention allocates beyond its inputs and outputs), and the largest
relative error of the output and of dq/dk/dv against `xla`.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from transfusion_jax import attention


def packed_layout(batch: int, seq: int, text: int, patches: int):
    """segment_ids, image_ids [B, L]: caption, image, caption, image ... then padding."""
    segment = np.zeros((batch, seq), np.int32)
    image = np.full((batch, seq), -1, np.int32)
    doc_len = text + patches
    for row in range(batch):
        for doc in range(seq // doc_len):
            at = doc * doc_len
            segment[row, at : at + doc_len] = doc + 1
            image[row, at + text : at + doc_len] = doc
    return jnp.asarray(segment), jnp.asarray(image)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--kv_heads", type=int, default=0, help="0 = --heads")
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--text", type=int, default=64, help="caption tokens per document")
    parser.add_argument("--patches", type=int, default=256, help="image positions per document")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--implementations", default="xla,cudnn,gpu_flash")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    dtype = jnp.dtype(args.dtype)
    b, seq, h, d = args.batch, args.seq, args.heads, args.head_dim
    g = args.kv_heads or h
    segment, image = packed_layout(b, seq, args.text, args.patches)
    dense_mask = attention.make_attention_mask(segment, image)
    ranges = attention.KeyRanges(*attention.key_ranges(segment, image))
    allowed = int(dense_mask.sum())
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, seq, h, d), dtype)
    k = jax.random.normal(keys[1], (b, seq, g, d), dtype)
    v = jax.random.normal(keys[2], (b, seq, g, d), dtype)
    cotangent = jax.random.normal(keys[3], (b, seq, h, d), dtype)
    flops = 2.5 * 4 * d * h * allowed  # forward + backward, useful pairs only
    print(
        f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} batch={b} "
        f"seq={seq} heads={h} kv_heads={g} head_dim={d} dtype={dtype.name} "
        f"allowed_fraction={allowed / (b * seq * seq):.4f}"
    )

    reference = None
    for name in args.implementations.split(","):
        mask = ranges if name in attention.FLASH else dense_mask

        def loss(q, k, v, mask=mask, name=name):
            out = attention.dot_product_attention(q, k, v, mask, name)
            return (out.astype(jnp.float32) * cotangent.astype(jnp.float32)).sum(), out

        try:
            t0 = time.perf_counter()
            step = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
            step = step.lower(q, k, v).compile()
            compile_s = time.perf_counter() - t0
            grads, out = jax.block_until_ready(step(q, k, v))
        except Exception as error:  # an implementation this backend lacks: say so, go on
            print(f"implementation={name} unavailable: {type(error).__name__}: {error}"[:300])
            continue
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            jax.block_until_ready(step(q, k, v))
            times.append(time.perf_counter() - t0)
        median = statistics.median(times)
        temp = step.memory_analysis().temp_size_in_bytes
        line = (
            f"implementation={name} median_ms={median * 1e3:.2f} "
            f"tflops_per_s={flops / median / 1e12:.1f} compile_s={compile_s:.1f} "
            f"temp_memory_gib={temp / 2**30:.2f}"
        )
        if reference is None:
            reference = (out, grads)
        else:
            errors = [
                float(jnp.abs(a.astype(jnp.float32) - r.astype(jnp.float32)).max())
                / float(jnp.abs(r.astype(jnp.float32)).max())
                for a, r in zip((out, *grads), (reference[0], *reference[1]), strict=True)
            ]
            line += " rel_err_out_dq_dk_dv=" + ",".join(f"{e:.2e}" for e in errors)
        print(line, flush=True)


if __name__ == "__main__":
    main()
