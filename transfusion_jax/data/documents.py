"""Records to documents: tokenize, decode the image to its latent, choose the direction.

Image-caption records become caption-first documents (`BOS caption BOI image EOI EOS`, text ->
image) with probability `data.caption_first_prob` (the paper: 0.8), the caption dropped at
`diffusion.cond_drop_rate` for classifier-free guidance; otherwise image-first documents
(`BOS BOI image EOI caption EOS`, captioning) with the noise-limiting flag set. Text records become
`BOS text EOS`. A record that cannot be used becomes `Skipped(origin, reason)`, so the packer can
count it and warn about it once (grain drops None elements silently; this transform runs in
threads or worker processes, where a warning would repeat on every draw).
"""

import dataclasses

import numpy as np
from PIL import Image as PILImage

from transfusion_jax.batch import caption_first_document, image_first_document
from transfusion_jax.data.images import DEFAULT_MAX_PIXELS, array_to_image, load_image


@dataclasses.dataclass(frozen=True)
class Skipped:
    origin: str  # the record's name (file, line, dataset index): bad records are counted once
    reason: str

    def __str__(self) -> str:
        return f"{self.origin}: {self.reason}, skipped"


class ToDocument:
    """A grain random-map transform: (record, numpy Generator) -> document | Skipped."""

    def __init__(self, cfg, tokenizer, latent_space=None):
        """`latent_space` (vae.latent_space.LatentSpace) normalises the posteriors of a VAE
        latent cache; images decoded here stay pixels (in VAE mode the train step encodes them)."""
        data = cfg.data
        self.tokenizer, self.special = tokenizer, tokenizer.special
        self.image_size, self.latent_space = data.image_size, latent_space
        self.vae_sample = cfg.image.vae_sample
        self.max_image_pixels = data.max_image_pixels
        # A caption is cut to max_caption_tokens, and to what fits a row beside its image and the
        # 4 markers: a longer one would stop the run at the batch that draws it, and every resume.
        num_patches = (cfg.image.latent_size // cfg.image.patch_size) ** 2
        self.max_caption_tokens = min(data.max_caption_tokens, data.seq_len - num_patches - 4)
        self.caption_first_prob = data.caption_first_prob
        self.cond_drop_rate = cfg.diffusion.cond_drop_rate

    def __call__(self, record: dict, rng: np.random.Generator):
        s = self.special
        if "image" not in record and "latent" not in record:  # a text-only record
            return [[s.bos, *self.tokenizer.encode(record["text"]), s.eos]]
        text = record["text"]
        if isinstance(text, list | tuple):
            text = text[int(rng.integers(len(text)))] if text else ""
        caption = self.tokenizer.encode(text.strip())[: self.max_caption_tokens]
        if not caption:
            return _skip(record, "empty caption")
        if "logvar" in record:  # a VAE posterior from a latent cache (data/cache.py --vae)
            latent = record["latent"]
            if self.vae_sample:
                noise = rng.standard_normal(latent.shape, dtype=np.float32)
                latent = latent + np.exp(0.5 * record["logvar"]) * noise
            latent = self.latent_space.normalize(latent).astype(np.float32)
        elif "latent" in record:  # a pixel-space cache
            latent = record["latent"]
        else:
            latent = decode_image(record, self.image_size, self.max_image_pixels)
            if isinstance(latent, Skipped):
                return latent
        if rng.random() < self.caption_first_prob:
            drop = bool(rng.random() < self.cond_drop_rate)
            return caption_first_document(caption, latent, s, drop_caption=drop)
        return image_first_document(latent, caption, s)


def _skip(record: dict, reason: str) -> Skipped:
    return Skipped(str(record.get("origin", "?")), reason)


def decode_image(record: dict, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS):
    """The record's image as float32 [size, size, 3] in [-1, 1], or Skipped if it cannot be read
    (or has more than `max_pixels` pixels)."""
    image = record["image"]
    try:
        if isinstance(image, np.ndarray) and image.dtype == np.uint8:
            if image.shape == (image_size, image_size, 3):
                return array_to_image(image)
            image = PILImage.fromarray(image)
        return load_image(image, image_size, max_pixels)
    except Exception as e:  # noqa: BLE001 - any decoder error means: skip this image
        return _skip(record, f"cannot decode the image ({type(e).__name__}: {e})")
