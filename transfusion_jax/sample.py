"""Sample from a trained run: text -> image, or caption an image.

  python -m transfusion_jax.sample --workdir DIR --prompt "a small red circle above a large blue
      square" --num 8 --out OUTDIR          # writes OUTDIR/grid.png and OUTDIR/000.png, ...
  python -m transfusion_jax.sample --workdir DIR --image photo.png    # prints the caption last

Loads DIR/config.json and the latest checkpoint (`--ema` for the EMA weights), and shows the
progress of the denoising steps.
"""

import argparse
import dataclasses
import json
import math
import pathlib
import sys

import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

from transfusion_jax.checkpoint import load_trained
from transfusion_jax.data.images import load_image, to_uint8
from transfusion_jax.data.tokenizer import make_tokenizer
from transfusion_jax.diffusion import Diffusion
from transfusion_jax.generate import Generator, SamplingOptions
from transfusion_jax.samplers import METHODS
from transfusion_jax.workdir import RunError


def image_grid(images: list[np.ndarray], min_cell: int = 128, border: int = 2) -> np.ndarray:
    """uint8 images [h, w, 3] tiled in a near-square grid on white, each cell enlarged (nearest
    neighbour) to at least `min_cell` pixels so small images stay visible."""
    n = len(images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    scale = max(1, math.ceil(min_cell / images[0].shape[0]))
    h, w = images[0].shape[0] * scale, images[0].shape[1] * scale
    grid = np.full((rows * (h + border) + border, cols * (w + border) + border, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        big = image.repeat(scale, axis=0).repeat(scale, axis=1)
        top, left = border + r * (h + border), border + c * (w + border)
        grid[top : top + h, left : left + w] = big
    return grid


def make_generator(model, cfg, steps_bar=None):
    tokenizer = make_tokenizer(cfg.data.tokenizer)
    im = cfg.image
    shape = (im.latent_size, im.latent_size, im.latent_channels)
    progress = None if steps_bar is None else (lambda t: steps_bar.update(1))
    generator = Generator(
        model,
        Diffusion.from_config(cfg),
        tokenizer.special,
        shape,
        progress,
        num_ids=tokenizer.num_ids,
    )
    return generator, tokenizer


def pixel_clip(cfg, sampler: str) -> float | None:
    """Pixels live in [-1, 1], so DDPM/DDIM clip their x0 estimate there (as pixel-space DDPM
    does); latents of a VAE are not bounded, and the flow samplers take no clip."""
    return 1.0 if cfg.data.latents == "pixels" and sampler in ("ddpm", "ddim") else None


def text_to_image(generator, tokenizer, prompt: str, num: int, options, seed: int):
    tokens = [tokenizer.special.bos, *tokenizer.encode(prompt)]
    result = generator.generate([tokens] * num, jax.random.key(seed), options, force_image=True)
    return [to_uint8(row[0]) for row in result.images]


def caption_images(generator, tokenizer, images: np.ndarray, options, seed: int) -> list[str]:
    """Captions for images [B, h, w, 3] in [-1, 1]: the text the model writes after them."""
    prompts = [[tokenizer.special.bos]] * len(images)
    result = generator.generate(prompts, jax.random.key(seed), options, images=images)
    return [tokenizer.decode(row).strip() for row in result.text]


SAMPLERS_FOR = {"epsilon": ("ddpm", "ddim"), "flow": ("euler", "heun")}


def check_arguments(args, parser) -> None:
    """Refuses arguments that cannot work before the model is loaded, naming the flag: they
    need only DIR/config.json and the tokenizer."""
    if (args.prompt is None) == (args.image is None):
        parser.error("give exactly one of --prompt (text -> image) or --image (captioning)")
    for flag, value in (("--num", args.num), ("--steps", args.steps)):
        if value < 1:
            parser.error(f"{flag} {value}: must be at least 1")
    if args.max_new_tokens < 1:
        parser.error(f"--max_new_tokens {args.max_new_tokens}: must be at least 1")
    if not math.isfinite(args.cfg_scale) or args.cfg_scale < 0:
        parser.error(f"--cfg_scale {args.cfg_scale}: must be finite and >= 0 (1 = no guidance)")
    if args.step is not None and args.step < 0:
        parser.error(f"--step {args.step}: must be a checkpoint's step number")
    config_file = pathlib.Path(args.workdir) / "config.json"
    if not config_file.is_file():
        parser.error(f"--workdir {args.workdir}: no config.json (is it a training run?)")
    cfg = json.loads(config_file.read_text())
    objective = cfg["diffusion"]["objective"]
    valid = SAMPLERS_FOR[objective]
    args.sampler = args.sampler or valid[0 if objective == "epsilon" else 1]
    if args.sampler not in valid:
        parser.error(
            f"--sampler {args.sampler}: a model trained with diffusion.objective={objective!r} "
            f"samples with {' or '.join(valid)}"
        )
    if (
        args.sampler in ("ddpm", "ddim")
        and not 2 <= args.steps <= cfg["diffusion"]["num_timesteps"]
    ):
        parser.error(
            f"--steps {args.steps}: {args.sampler} needs 2 to "
            f"{cfg['diffusion']['num_timesteps']} steps (diffusion.num_timesteps)"
        )
    image_positions = (cfg["image"]["latent_size"] // cfg["image"]["patch_size"]) ** 2 + 2
    seq_len = cfg["data"]["seq_len"]
    if args.image is not None:
        if not pathlib.Path(args.image).is_file():
            parser.error(f"--image {args.image}: no such file")
        needed, what = 2 + image_positions + args.max_new_tokens, "--max_new_tokens"
    else:
        tokens = make_tokenizer(cfg["data"]["tokenizer"]).encode(args.prompt)
        needed, what = 1 + len(tokens) + image_positions, "--prompt"
    if needed > seq_len:
        parser.error(
            f"{what}: the context would need {needed} positions, but the model was trained on "
            f"rows of {seq_len} (data.seq_len); shorten it"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--workdir", required=True, help="a training run's directory")
    parser.add_argument("--prompt", help="text -> image: the caption to draw (may be empty)")
    parser.add_argument("--image", help="image -> text: a picture to caption")
    parser.add_argument("--num", type=int, default=8, help="images to draw for --prompt")
    parser.add_argument("--out", default=None, help="where to write images (default DIR/samples)")
    parser.add_argument(
        "--cfg_scale", "--cfg-scale", type=float, default=3.0, help="classifier-free guidance"
    )
    parser.add_argument("--steps", type=int, default=250, help="denoising steps")
    parser.add_argument(
        "--sampler",
        default=None,
        choices=METHODS,
        help="ddpm/ddim (epsilon models), euler/heun (flow models); default ddpm or heun",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=64)
    parser.add_argument("--ema", action="store_true", help="use the EMA weights")
    parser.add_argument(
        "--step", type=int, default=None, help="the checkpoint to load (default: the newest)"
    )
    args = parser.parse_args(argv)
    check_arguments(args, parser)

    try:
        model, cfg, step = load_trained(args.workdir, use_ema=args.ema, step=args.step)
    except (FileNotFoundError, ValueError, RunError) as e:
        parser.exit(2, f"error: {e}\n")
    sampler = args.sampler
    options = SamplingOptions(
        max_new_tokens=args.max_new_tokens,
        max_images=1,
        sampler=sampler,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        clip_x0=pixel_clip(cfg, sampler),
    )
    print(f"loaded {args.workdir} at step {step}", file=sys.stderr)
    if args.image is not None:
        generator, tokenizer = make_generator(model, cfg)
        image = load_image(args.image, cfg.data.image_size)[None]
        options = dataclasses.replace(options, max_images=0)
        print(caption_images(generator, tokenizer, image, options, args.seed)[0])
        return

    evaluations = 2 * args.steps - 1 if sampler == "heun" else args.steps
    with tqdm(total=evaluations, desc="denoising", unit="step", file=sys.stderr) as bar:
        generator, tokenizer = make_generator(model, cfg, bar)
        images = text_to_image(generator, tokenizer, args.prompt, args.num, options, args.seed)
    out = pathlib.Path(args.out or pathlib.Path(args.workdir) / "samples")
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(out / f"{i:03d}.png")
    Image.fromarray(image_grid(images)).save(out / "grid.png")
    print(f"wrote {len(images)} images and {out / 'grid.png'}")


if __name__ == "__main__":
    main()
