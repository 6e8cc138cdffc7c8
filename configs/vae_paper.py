"""The paper's autoencoder: 256x256x3 images to 32x32x8 latents (downsampling 8), ~84M parameters
(the paper: "86M"), Stable Diffusion's architecture with 8 latent channels: widths
128 / 256 / 512 / 512, two ResNet blocks per level, mid-block attention. L1 + 1e-6 KL, and a
PatchGAN from step 50,001 as in latent diffusion's KL-f8 recipe, but with a fixed weight: LDM
scales the adversarial term by the ratio of the reconstruction and GAN gradient norms at the
decoder's last layer, which is not implemented here, so the weight is set low (0.05: g_loss is
about 1, the L1 about 0.05 by then). Add LPIPS with --config.loss.perceptual_weight=1.0
--config.loss.perceptual_path=VGG16.safetensors (LDM's recipe uses it).
"""

from transfusion_jax.vae.config import vae_base_config


def get_config(arg=None):
    del arg
    c = vae_base_config()
    v = c.vae
    v.channels = (128, 256, 512, 512)
    v.blocks = 2
    v.latent_channels = 8
    v.norm_groups = 32
    c.data.image_size = 256
    c.train.batch_size = 64
    c.train.num_steps = 200_000
    c.loss.disc_weight = 0.05
    c.loss.disc_start = 50_001
    return c
