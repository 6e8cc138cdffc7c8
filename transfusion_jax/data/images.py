"""Images to model inputs: decode any common format, make it RGB, resize and centre-crop, scale.

The model sees an image as a "latent" [h, w, c]. In pixel space (`data.latents = "pixels"`) the
latent is the image itself in [-1, 1], so h = w = `data.image_size` and c = 3. With a VAE
(`data.latents = "vae"`) the pipeline still carries these pixels and the train step encodes them
on the devices (or a latent cache supplies the posteriors).
"""

import io
import os

import numpy as np
from PIL import Image, ImageFile

from transfusion_jax.paths import as_path

# A truncated file must fail loudly (and be skipped by the caller), not decode half grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_MAX_PIXELS = 64_000_000  # data.max_image_pixels


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited on white and greyscale/palette expanded."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def resize_and_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize so the short side is `size` (bicubic), then take the centre size x size crop."""
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_image(source, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A path, bytes or PIL image -> float32 [size, size, 3] in [-1, 1]. Raises on bad data, and
    on images over `max_pixels` pixels before decoding them (opening reads only the header: a
    684 KB PNG can hold 13000 x 13000 pixels, 8 GB once decoded)."""
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    if isinstance(source, str | os.PathLike):  # a local path or a URL (gs://), read via epath
        with as_path(source).open("rb") as f:
            return load_image(f, size, max_pixels)
    image = source if isinstance(source, Image.Image) else Image.open(source)
    w, h = image.size
    if w * h > max_pixels:
        raise ValueError(f"{w} x {h} = {w * h} pixels is over data.max_image_pixels={max_pixels}")
    image.load()  # decode now, so a truncated file raises here
    pixels = np.asarray(resize_and_crop(to_rgb(image), size), np.float32)
    return pixels / 127.5 - 1.0


def array_to_image(pixels: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 in [-1, 1] (for sources that render arrays, e.g. shapes)."""
    return pixels.astype(np.float32) / 127.5 - 1.0


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float in [-1, 1] -> uint8 [0, 255], for writing samples."""
    return np.clip(np.round((np.asarray(image, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
