"""A model that learns the built-in shapes data on a laptop CPU in minutes.

4 layers of width 128; 32x32 RGB images in pixel space, 4x4 patches (64 positions per image)
through a small U-Net (at this size it learns images about twice as fast per step as the linear
patch layer, as the paper's Table 7 predicts); byte-level text; rows of 256 positions.
"""

from transfusion_jax.config import base_config


def get_config(arg=None):
    del arg
    c = base_config()
    c.model.vocab_size = 384  # Bytes + special tokens, padded to a multiple of 128.
    c.model.d_model = 128
    c.model.depth = 4
    c.model.num_heads = 4
    c.model.remat_policy = "none"
    c.image.latent_size = 0  # pixel space: the latent is the image (data.image_size, RGB)
    c.image.latent_channels = 0
    c.image.patch_size = 4
    c.image.max_images = 2
    c.patch.kind = "unet"
    c.patch.time_embed_dim = 64
    c.patch.unet_channels = (32, 64, 96, 128)
    c.patch.unet_blocks = 1
    c.patch.unet_head_dim = 32
    c.patch.unet_attention_resolution = 8
    c.data.source = "shapes"
    c.data.image_size = 32
    c.data.seq_len = 256
    c.data.max_caption_tokens = 64
    c.data.pack_window = 64
    c.data.num_threads = 2
    c.train.num_steps = 1500
    c.train.batch_size = 8
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.train.eval_every = 500  # held-out diffusion loss and caption bits per byte
    c.optimizer.peak_lr = 3e-3
    c.optimizer.min_lr = 3e-4
    c.optimizer.warmup_steps = 100
    return c
