"""A model that trains on a laptop CPU in minutes: 4 layers of width 128, 16x16x4 latents."""

from transfusion_jax.config import base_config


def get_config(arg=None):
    del arg
    c = base_config()
    c.model.vocab_size = 384  # Bytes + special tokens, padded to a multiple of 128.
    c.model.d_model = 128
    c.model.depth = 4
    c.model.num_heads = 4
    c.model.remat_policy = "none"
    c.image.latent_size = 16
    c.image.latent_channels = 4
    c.image.patch_size = 2
    c.image.max_images = 2
    c.patch.time_embed_dim = 64
    c.patch.unet_channels = (32, 64, 96, 128)
    c.patch.unet_blocks = 1
    c.patch.unet_head_dim = 32
    c.data.seq_len = 256
    c.train.num_steps = 300
    c.train.batch_size = 8
    c.train.log_every = 25
    c.train.checkpoint_every = 100
    c.optimizer.peak_lr = 3e-3
    c.optimizer.min_lr = 3e-4
    c.optimizer.warmup_steps = 30
    return c
