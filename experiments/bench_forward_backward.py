"""Forward + backward throughput of the Transfusion loss (no optimizer) on synthetic packed rows.

  python experiments/bench_forward_backward.py --config configs/tiny.py --batch 8 --seq 256

Each row holds documents of `--text` text tokens followed by one image, repeated until the row is
full. Prints the median step time over `--steps` timed steps (after compilation) and tokens/s.
"""

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transfusion_jax.batch import Image, SpecialTokens, build_batch, document_length
from transfusion_jax.config import load_config, resolve_model
from transfusion_jax.diffusion import Diffusion
from transfusion_jax.loss import transfusion_loss
from transfusion_jax.model import Transfusion, parameter_counts


def synthetic_batch(cfg, batch_size, seq_len, text_len, seed=0):
    rng = np.random.default_rng(seed)
    s, c, k = cfg.image.latent_size, cfg.image.latent_channels, cfg.image.patch_size
    num_patches = (s // k) ** 2
    rows = []
    for _ in range(batch_size):
        row, used = [], 0
        while len(row) < cfg.image.max_images:
            text = list(rng.integers(5, cfg.model.vocab_size, text_len))
            doc = [text, Image(rng.normal(size=(s, s, c)).astype(np.float32)), [2]]
            if used + document_length(doc, num_patches) > seq_len:
                break
            row.append(doc)
            used += document_length(doc, num_patches)
        rows.append(row)
    return build_batch(rows, seq_len, cfg.image.max_images, (s, s, c), k, SpecialTokens())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--text", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)

    cfg = resolve_model(load_config(args.config))
    model = Transfusion(cfg, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    batch = jax.tree.map(jnp.asarray, synthetic_batch(cfg, args.batch, args.seq, args.text))
    diffusion = Diffusion.from_config(cfg)

    @jax.jit
    def grad_step(params, batch, rng):
        def loss(p):
            return transfusion_loss(nnx.merge(graphdef, p), batch, rng, diffusion)[0]

        return jax.value_and_grad(loss)(params)

    t0 = time.perf_counter()
    jax.block_until_ready(grad_step(params, batch, jax.random.key(0)))
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        jax.block_until_ready(grad_step(params, batch, jax.random.key(i)))
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens = args.batch * args.seq
    counts = parameter_counts(cfg)
    print(f"config={args.config} params={counts['total']} batch={args.batch} seq={args.seq}")
    print(f"backend={jax.default_backend()} devices={jax.device_count()}")
    print(
        f"compile_s={compile_s:.1f} median_step_s={step_s:.4f} "
        f"min_step_s={min(times):.4f} tokens_per_s={tokens / step_s:.0f}"
    )


if __name__ == "__main__":
    sys.exit(main())
