"""Look at a VAE: held-out images beside their reconstructions, with PSNR and SSIM.

  python -m transfusion_jax.vae.reconstruct --vae workdirs/vae_tiny \
      --data ../shared/data/noto_emoji_72 --size 64 --num 8 --out reconstructions.png

Takes the first `--num` images of the image folder's held-out split (the split train_vae
evaluates on: a fixed hash of the file name, `--held_out_percent`), encodes them to the posterior
mean, decodes, and writes a grid: originals in the top row, reconstructions below. Prints the
mean PSNR (dB) and SSIM over the `--score` first held-out images. `--vae` is any VAE load_vae
reads (a train_vae workdir or a diffusers AutoencoderKL directory).
"""

import argparse

import dm_pix
import ml_collections
import numpy as np
from PIL import Image

from transfusion_jax import cli
from transfusion_jax.data.images import to_uint8
from transfusion_jax.paths import save_image
from transfusion_jax.vae import load_vae
from transfusion_jax.vae.data import first_images


def reconstruct(vae, images: np.ndarray, batch: int = 16) -> np.ndarray:
    """Posterior-mean reconstructions in [-1, 1] of images [N, H, W, 3] in [-1, 1]."""
    out = []
    for start in range(0, len(images), batch):
        mean, _ = vae.encode(images[start : start + batch])
        out.append(np.clip(np.asarray(vae.decode(mean)), -1.0, 1.0))
    return np.concatenate(out)


def scores(images: np.ndarray, rebuilt: np.ndarray) -> dict:
    x, y = (images + 1.0) / 2.0, (rebuilt + 1.0) / 2.0
    return {
        "psnr": float(np.mean(dm_pix.psnr(x, y))),
        "ssim": float(np.mean(dm_pix.ssim(x, y))),
        "images": len(images),
    }


def comparison_grid(images: np.ndarray, rebuilt: np.ndarray, border: int = 2) -> np.ndarray:
    """uint8 grid: originals in the top row, reconstructions in the bottom row."""
    n, h, w, _ = images.shape
    grid = np.full((2 * h + 3 * border, n * (w + border) + border, 3), 255, np.uint8)
    for row, pictures in enumerate((images, rebuilt)):
        top = border + row * (h + border)
        for i, picture in enumerate(pictures):
            left = border + i * (w + border)
            grid[top : top + h, left : left + w] = to_uint8(picture)
    return grid


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=cli.DefaultsHelpFormatter
    )
    parser.add_argument("--vae", required=True, help="a train_vae workdir or diffusers directory")
    parser.add_argument("--data", required=True, help="an image folder (metadata.jsonl)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--num", type=int, default=8, help="images in the grid")
    parser.add_argument("--score", type=int, default=64, help="held-out images scored")
    parser.add_argument(
        "--held_out_percent",
        type=float,
        default=5.0,
        help="the held-out share of --data, as the VAE's training run split it",
    )
    parser.add_argument("--out", default="reconstructions.png", help="the comparison grid")
    args = parser.parse_args(argv)
    cfg = ml_collections.ConfigDict(
        dict(
            data=dict(
                source="imagefolder",
                path=args.data,
                image_size=args.size,
                max_image_pixels=64_000_000,
                held_out_percent=args.held_out_percent,
            ),
            train=dict(seed=0),
        )
    )
    try:  # a missing VAE or data folder, a folder that is not one
        vae = load_vae(args.vae)
        images = first_images(cfg, max(args.num, args.score), held=True)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")
    rebuilt = reconstruct(vae, images)
    s = scores(images[: args.score], rebuilt[: args.score])
    save_image(Image.fromarray(comparison_grid(images[: args.num], rebuilt[: args.num])), args.out)
    print(f"held-out PSNR {s['psnr']:.2f} dB, SSIM {s['ssim']:.4f} over {s['images']} images")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
