"""A small VQ tokenizer that trains on a laptop CPU in minutes: 16 px shapes scenes to 8x8 code ids
from a codebook of 512 (downsampling 2), the discrete tokens of the CPU-scale Chameleon baseline.
64 codes per image, as many positions as the tiny Transfusion's 2x2 patches of the same image.

Two levels of width 32 / 64 with one ResNet block each, mid-block attention, 8-dimensional codes;
L1 + 0.25 commitment, codebook by moving averages with dead-code restarts (vae/quantizer.py):

  python -m transfusion_jax.train_vae --config vq_tiny --workdir workdirs/vq_tiny

On an image folder: --config.data.source=imagefolder --config.data.path=DIR.
"""

from transfusion_jax.vae.config import vae_base_config


def get_config(arg=None):
    del arg
    c = vae_base_config()
    v = c.vae
    v.kind = "vq"
    v.codebook_size = 512
    v.channels = (32, 64)
    v.blocks = 1
    v.latent_channels = 8  # the code vectors' width
    v.norm_groups = 8
    c.data.source = "shapes"
    c.data.image_size = 16
    c.data.num_threads = 2
    c.train.num_steps = 2000
    c.train.batch_size = 32
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.train.eval_every = 250
    c.train.eval_images = 64
    c.optimizer.peak_lr = 1e-3
    c.optimizer.min_lr = 1e-4
    c.optimizer.warmup_steps = 100
    return c
