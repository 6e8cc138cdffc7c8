"""A small KL autoencoder that trains on a laptop CPU in minutes: 64 px images to 16x16x4 latents.

Three levels of width 32 / 64 / 128 with one ResNet block each (downsampling 4), mid-block
attention, no discriminator; L1 + 1e-6 KL. Point it at an image folder:

  python -m transfusion_jax.train_vae --config vae_tiny --workdir workdirs/vae_tiny \
      --config.data.path=../shared/data/noto_emoji_72
"""

from transfusion_jax.vae.config import vae_base_config


def get_config(arg=None):
    del arg
    c = vae_base_config()
    v = c.vae
    v.channels = (32, 64, 128)
    v.blocks = 1
    v.latent_channels = 4
    v.norm_groups = 8
    c.data.source = "imagefolder"
    c.data.image_size = 64
    c.data.num_threads = 2
    c.train.num_steps = 2000
    c.train.batch_size = 16
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.train.eval_every = 250
    c.train.eval_images = 64
    c.train.stats_images = 128
    c.optimizer.peak_lr = 1e-3
    c.optimizer.min_lr = 1e-4
    c.optimizer.warmup_steps = 100
    return c
