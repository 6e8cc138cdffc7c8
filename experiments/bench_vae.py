"""VAE throughput: encode and decode images/s, and what on-the-fly encoding costs a train step.

  python -m experiments.bench_vae                       # vae_tiny and vae_paper at 256 px
  python -m experiments.bench_vae --vae vae_paper --batch 16 --model paper:0.16b --rows 8

For each VAE config (random weights: speed does not depend on them) the jitted encoder (posterior
mean and log-variance) and decoder are timed on batches of `--batch` images of `--size` pixels.
With `--model`, the train step of that Transfusion config (synthetic latents, `--rows` packed rows
of its seq_len) is timed too, and `encode_share=` is the share of a step that encoding the rows'
image slots (rows x image.max_images images, every slot is encoded) with the VAE would add:
encode / (encode + step). When it is large, cache the latents once
(python -m transfusion_jax.data.cache --vae PATH) instead. Medians over `--steps` timed calls after
one warm-up call.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.bench_train import timed
from transfusion_jax import sharding as shd
from transfusion_jax.config import load_config
from transfusion_jax.data.synthetic import SyntheticSource
from transfusion_jax.train_step import TrainProgram
from transfusion_jax.vae.autoencoder import AutoencoderKL


def median_seconds(fn, steps: int) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    return timed(fn, steps)


def vae_figures(name: str, size: int, batch: int, steps: int) -> dict:
    cfg = load_config(name).vae
    module = AutoencoderKL(cfg, nnx.Rngs(0))
    graphdef, params = nnx.split(module)
    encode = jax.jit(lambda p, x: nnx.merge(graphdef, p).encode(x))
    decode = jax.jit(lambda p, z: nnx.merge(graphdef, p).decode(z))
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)), jnp.float32)
    z = encode(params, x)[0]
    t_encode = median_seconds(lambda: encode(params, x), steps)
    t_decode = median_seconds(lambda: decode(params, z), steps)
    count = sum(v.size for v in jax.tree.leaves(params))
    return dict(
        vae=name,
        params_m=count / 1e6,
        latent=tuple(z.shape[1:]),
        encode_images_per_s=batch / t_encode,
        decode_images_per_s=batch / t_decode,
    )


def step_seconds(model: str, rows: int, steps: int) -> tuple[float, int]:
    """Median seconds of one train step of `model` on synthetic latents, and the image slots of
    its batch."""
    cfg = load_config(model)
    cfg.data.source = "synthetic"
    cfg.train.batch_size = rows
    cfg.mesh.update(data=1, fsdp=-1, tensor=1)
    mesh = shd.mesh_from_config(cfg)
    program = TrainProgram(cfg, mesh)
    batch = shd.global_batch(next(SyntheticSource(program.cfg, rows)), mesh)
    step = program.compile(batch)
    state = [program.init_state(0)]

    def run():
        state[0], metrics = step(state[0], batch)
        return metrics

    return median_seconds(run, steps), rows * program.cfg.image.max_images


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vae", nargs="+", default=["vae_tiny", "vae_paper"])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=4, help="images per encode/decode call")
    parser.add_argument("--steps", type=int, default=3, help="timed calls (median)")
    parser.add_argument("--model", default="paper:0.16b", help="'' skips encode_share")
    parser.add_argument("--rows", type=int, default=1, help="packed rows of the train step")
    args = parser.parse_args()
    print(f"device {jax.devices()[0].device_kind} x{jax.device_count()}, {args.size} px")
    figures = {}
    for name in args.vae:
        f = vae_figures(name, args.size, args.batch, args.steps)
        figures[name] = f
        print(
            f"{name}: {f['params_m']:.1f}M params, latent {f['latent']}, "
            f"encode {f['encode_images_per_s']:.2f} images/s, "
            f"decode {f['decode_images_per_s']:.2f} images/s (batch {args.batch})"
        )
    if args.model:
        seconds, images = step_seconds(args.model, args.rows, args.steps)
        rows = f"{args.rows} rows ({images} image slots)"
        print(f"{args.model}: train step {seconds:.2f} s for {rows}")
        for name, f in figures.items():
            encode = images / f["encode_images_per_s"]
            print(
                f"{name}: encoding {images} images takes {encode:.2f} s: "
                f"encode_share={encode / (encode + seconds):.3f}"
            )


if __name__ == "__main__":
    main()
