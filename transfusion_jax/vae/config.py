"""Every key of a VAE training config with its default, and the checks that turn bad values into
clear errors. `configs/vae_tiny.py` and `configs/vae_paper.py` start from `vae_base_config()`.

The `train`, `optimizer`, `data` and `mesh` sections mean what they mean for Transfusion (the same
loop runs both); `vae` is the architecture (`autoencoder.vae_config`) and `loss` the objective.
"""

import ml_collections

from transfusion_jax.config import _check, base_config
from transfusion_jax.vae.autoencoder import downsampling, vae_config

# Shared sections and the keys a VAE run uses of them (the rest are Transfusion's).
SHARED_KEYS = {
    "train": (
        "num_steps",
        "batch_size",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "seed",
        "ema_decay",
        "nan_policy",
        "max_nonfinite_streak",
        "tensorboard",
        "wandb_project",
        "peak_tflops",
        "grad_accum_steps",
    ),
    "optimizer": (
        "peak_lr",
        "min_lr",
        "warmup_steps",
        "decay_steps",
        "b1",
        "b2",
        "eps",
        "weight_decay",
        "clip_norm",
    ),
    "data": (
        "source",
        "path",
        "tfds_name",
        "tfds_split",
        "tfds_data_dir",
        "tfds_image_key",
        "tfds_caption_key",
        "image_size",
        "max_image_pixels",
        "num_threads",
        "prefetch",
    ),
    "mesh": ("data", "fsdp", "tensor"),
}


def vae_base_config() -> ml_collections.ConfigDict:
    shared = base_config()
    c = ml_collections.ConfigDict()
    c.vae = vae_config()
    for section, keys in SHARED_KEYS.items():
        c[section] = ml_collections.ConfigDict({k: shared[section][k] for k in keys})

    c.loss = ml_collections.ConfigDict()
    c.loss.l1_weight = 1.0  # Mean absolute error of the reconstruction, per pixel value.
    c.loss.l2_weight = 0.0  # Mean squared error, per pixel value.
    # beta: the KL to N(0, I), summed over a latent and divided by the image's pixel values, so
    # the weight means what LDM's kl_weight means (1e-6) against a per-pixel reconstruction loss.
    c.loss.kl_weight = 1e-6
    # LPIPS weight (LDM: 1.0); needs loss.perceptual_path. 0 = no perceptual loss.
    c.loss.perceptual_weight = 0.0
    # vae.kind = "vq": beta of the commitment loss mean((z - sg(e))^2) (VQ-VAE: 0.25).
    c.loss.commitment_weight = 0.25
    c.loss.codebook_decay = 0.99  # vq: decay of the codebook's moving averages (VQ-VAE-2: 0.99).
    # vq: a code whose (bias-corrected) moving-average count falls below this share of the
    # uniform count (code vectors per step / codebook_size) is restarted on a random encoder output.
    c.loss.restart_share = 0.03
    # A safetensors file of torchvision VGG16 features.* tensors (+ lpips' lin0..lin4).
    c.loss.perceptual_path = ""
    c.loss.disc_weight = 0.0  # PatchGAN adversarial loss weight; 0 = no discriminator.
    c.loss.disc_start = 50_001  # Optimizer step at which the discriminator starts.
    c.loss.disc_channels = 64  # Width of the discriminator's first layer.
    c.loss.disc_layers = 3  # Strided conv layers of the discriminator (receptive field).

    c.train.num_steps = 100_000
    c.train.batch_size = 32  # Global, in images.
    c.train.log_every = 50
    c.train.checkpoint_every = 2000
    c.train.eval_every = 1000  # Steps between held-out metrics (val_psnr, val_ssim, val_l1).
    c.train.eval_images = 64  # Held-out images scored at each evaluation.
    # Training images encoded for the per-channel latent mean/std stored with each checkpoint.
    c.train.stats_images = 256
    c.optimizer.peak_lr = 1e-4
    c.optimizer.min_lr = 1e-5
    c.optimizer.warmup_steps = 1000
    c.optimizer.b1 = 0.5  # Adam beta1 (LDM's autoencoders: Adam (0.5, 0.9), no weight decay).
    c.optimizer.b2 = 0.9
    c.optimizer.weight_decay = 0.0
    c.data.source = "imagefolder"
    c.data.held_out_percent = 5.0  # Files held out for evaluation (a fixed hash of the file name).
    return c


def resolve_vae(cfg) -> ml_collections.ConfigDict:
    """A checked copy of a VAE training config."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    check_architecture(cfg.vae)
    if cfg.vae.kind == "vq":
        _check(
            0.0 <= cfg.loss.codebook_decay < 1.0,
            "loss.codebook_decay",
            f"{cfg.loss.codebook_decay} must be in [0, 1)",
        )
        _check(cfg.loss.restart_share >= 0, "loss.restart_share", "must be >= 0 (0: no restarts)")
    _check(cfg.vae.in_channels == 3, "vae.in_channels", "images are RGB here (3)")
    factor = downsampling(cfg.vae.channels)
    size = cfg.data.image_size
    _check(
        size % factor == 0,
        "data.image_size",
        f"{size} is not a multiple of the VAE's downsampling factor {factor} "
        f"(2 ** (len(vae.channels) - 1))",
    )
    _check(
        cfg.data.source in ("imagefolder", "tfds", "shapes"),
        "data.source",
        f"{cfg.data.source!r}: a VAE trains on images (imagefolder, tfds or shapes)",
    )
    _check(
        0.0 <= cfg.data.held_out_percent < 100.0,
        "data.held_out_percent",
        f"{cfg.data.held_out_percent} must be in [0, 100)",
    )
    _check(
        cfg.train.grad_accum_steps == 1,
        "train.grad_accum_steps",
        "the VAE trainer takes whole batches (1)",
    )
    _check(
        cfg.train.nan_policy in ("stop", "skip"),
        "train.nan_policy",
        f"{cfg.train.nan_policy!r} is not 'stop' or 'skip'",
    )
    _check(cfg.loss.disc_layers >= 1, "loss.disc_layers", "needs at least 1")
    _check(
        cfg.loss.perceptual_weight == 0 or bool(cfg.loss.perceptual_path),
        "loss.perceptual_path",
        "loss.perceptual_weight > 0 needs the VGG16 weights (see vae/perceptual.py)",
    )
    _check(
        cfg.loss.perceptual_weight == 0 or size % 16 == 0,
        "data.image_size",
        f"{size}: the perceptual loss's VGG16 pools 4 times, so it needs a multiple of 16",
    )
    return cfg


def check_architecture(v) -> None:
    _check(v.kind in ("kl", "vq"), "vae.kind", f"{v.kind!r} is not 'kl' or 'vq'")
    _check(
        v.kind == "kl" or v.codebook_size >= 2,
        "vae.codebook_size",
        f"{v.codebook_size}: a codebook needs at least 2 codes",
    )
    _check(len(v.channels) >= 1, "vae.channels", "needs at least one level")
    _check(v.latent_channels >= 1, "vae.latent_channels", f"{v.latent_channels} must be >= 1")
    for width in v.channels:
        _check(
            width % v.norm_groups == 0,
            "vae.channels",
            f"{tuple(v.channels)}: every width must be a multiple of vae.norm_groups "
            f"({v.norm_groups})",
        )
