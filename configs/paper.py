"""The paper's five model sizes with either patch encoder.

`--config configs/paper.py:0.76b` (linear 2x2 patches, the default) or
`--config configs/paper.py:0.76b,unet`.
Sizes (layers / width / heads): 0.16b 16/768/12, 0.37b 24/1024/16, 0.76b 24/1536/24,
1.4b 24/2048/16, 7b 32/4096/32; FFN by the Llama-2 rule, untied 32K embeddings, 256x256 images as
32x32x8 latents, 4096-token rows.
"""

from transfusion_jax.config import base_config

SIZES = {
    "0.16b": (16, 768, 12),
    "0.37b": (24, 1024, 16),
    "0.76b": (24, 1536, 24),
    "1.4b": (24, 2048, 16),
    "7b": (32, 4096, 32),
}


def get_config(arg=None):
    size, _, kind = (arg or "0.76b").partition(",")
    if size not in SIZES:
        raise ValueError(f"configs/paper.py: size {size!r} is not one of {tuple(SIZES)}")
    c = base_config()
    c.model.depth, c.model.d_model, c.model.num_heads = SIZES[size]
    c.model.dtype = "bfloat16"
    c.patch.kind = kind or "linear"
    c.image.max_images = 8
    # The paper's latent space: give the VAE with --config.image.vae_path=PATH (a diffusers
    # AutoencoderKL directory or a train_vae workdir of configs/vae_paper.py).
    c.data.latents = "vae"
    return c
