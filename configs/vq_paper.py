"""The Chameleon baseline's tokenizer at the paper's scale: 256x256x3 images to 32x32 ids from a
codebook of 16,384 (the paper's), 1,024 tokens per image. `configs/vae_paper.py` (downsampling 8,
widths 128 / 256 / 512 / 512, two ResNet blocks per level, mid-block attention, a PatchGAN from
step 50,001) with its 8 latent channels as the codes' width and the KL term replaced by the
commitment loss and the moving-average codebook with dead-code restarts (vae/quantizer.py).
"""

from transfusion_jax.config import load_config


def get_config(arg=None):
    del arg
    c = load_config("vae_paper")
    c.vae.kind = "vq"
    c.vae.codebook_size = 16_384
    return c
