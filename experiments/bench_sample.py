"""Seconds per generated image with and without the KV cache.

  python -m experiments.bench_sample                # reference preset, 250 DDPM steps
  python -m experiments.bench_sample --steps 50 --cfg_scale 3

The reference preset of bench_train.py (width 512, depth 8, 8 heads of 64, vocab 1024, 16x16x8
latents in 2x2 patches = 64 positions), untrained weights (speed does not depend on them), a
512-token text prompt, one image. Cached: the prompt is prefilled once and each denoising step
runs the image's 64 positions against the cache. Uncached: each step runs the whole 578-position
sequence through the training forward pass. Both jitted; the median of `--repeats` timed runs
after one warm-up run (which also compiles).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.bench_train import reference_config, timed
from transfusion_jax import diffusion_solvers
from transfusion_jax.batch import Image, SpecialTokens, build_batch
from transfusion_jax.config import resolve_model
from transfusion_jax.diffusion import Diffusion
from transfusion_jax.generator import Generator, SamplingOptions, uncached_image_predictor
from transfusion_jax.model import Transfusion


def median_time(fn, repeats):
    jax.block_until_ready(fn())  # compile + warm up
    return timed(fn, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--cfg_scale", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cfg = resolve_model(reference_config())
    model = Transfusion(cfg, nnx.Rngs(0))
    special, diffusion = SpecialTokens(), Diffusion.from_config(cfg)
    shape = (16, 16, 8)
    rng = np.random.default_rng(0)
    prompt = [special.bos, *rng.integers(5, cfg.model.vocab_size, args.prompt - 1).tolist()]
    options = SamplingOptions(steps=args.steps, cfg_scale=args.cfg_scale, sampler="ddpm")
    generator = Generator(model, diffusion, special, shape)
    key = jax.random.key(0)

    def cached():
        ctx = generator.start([prompt], capacity=args.prompt + 1 + 64 + 2)
        ctx = generator.add_tokens(ctx, [[special.boi]])
        return generator.generate_image(ctx, key, options)[1]

    document = [prompt, Image(np.zeros(shape, np.float32))]
    batch = jax.tree.map(jnp.asarray, build_batch([[document]], args.prompt + 66, 1, shape, 2))
    uncond_batch = jax.tree.map(
        jnp.asarray,
        build_batch(
            [[[[special.bos], Image(np.zeros(shape, np.float32))]]], args.prompt + 66, 1, shape, 2
        ),
    )

    @jax.jit
    def uncached_sample(batch, uncond_batch, key):
        noise_key, sample_key = jax.random.split(key)
        x_T = jax.random.normal(noise_key, (1, *shape), jnp.float32)
        predict = diffusion_solvers.guided(
            uncached_image_predictor(model, batch, 0),
            uncached_image_predictor(model, uncond_batch, 0),
            args.cfg_scale,
        )
        return diffusion_solvers.sample(predict, x_T, sample_key, diffusion, "ddpm", args.steps)

    cached_s = median_time(cached, args.repeats)
    uncached_s = median_time(lambda: uncached_sample(batch, uncond_batch, key), args.repeats)
    print(
        f"backend={jax.default_backend()} prompt_tokens={args.prompt} image_positions=64 "
        f"steps={args.steps} cfg_scale={args.cfg_scale}"
    )
    print(f"cached_s_per_image={cached_s:.3f}")
    print(f"uncached_s_per_image={uncached_s:.3f}")
    print(f"speedup={uncached_s / cached_s:.2f}")


if __name__ == "__main__":
    main()
