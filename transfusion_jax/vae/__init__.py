"""The KL autoencoder that maps images to the latents the model diffuses (and back).

`load_vae(path)` is the one entry point for a trained VAE: a diffusers AutoencoderKL directory
(config.json + diffusion_pytorch_model.safetensors, e.g. the vae/ folder of an SD / SDXL / FLUX
pipeline) or a workdir of our own VAE training. Nothing here imports torch.
"""

from transfusion_jax.paths import as_path
from transfusion_jax.vae.autoencoder import (
    VAE,
    AutoencoderKL,
    AutoencoderVQ,
    VQTokenizer,
    vae_config,
)
from transfusion_jax.vae.diffusers_weights import CONFIG, WEIGHTS, load_diffusers
from transfusion_jax.vae.latent_space import vae_directory

__all__ = [
    "VAE",
    "AutoencoderKL",
    "AutoencoderVQ",
    "VQTokenizer",
    "load_diffusers",
    "load_vae",
    "load_vq",
    "vae_config",
]


def load_vq(path, **kwargs) -> VQTokenizer:
    """The VQ tokenizer of a train_vae workdir (vae.kind=vq); `kwargs` go to the loader."""
    from transfusion_jax.vae.workdir import load_vq as load

    return load(as_path(path), **kwargs)


def load_vae(path, **kwargs) -> VAE:
    """The VAE at `path`; `kwargs` (dtype, param_dtype) go to the loader."""
    path = as_path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such VAE directory")
    path = vae_directory(path)
    # A workdir of our VAE training (python -m transfusion_jax.train_vae); it holds a
    # config.json too, so it is told apart first.
    if (path / "checkpoints").is_dir():
        from transfusion_jax.vae.workdir import load_workdir

        return load_workdir(path, **kwargs)
    if (path / CONFIG).is_file():
        return load_diffusers(path, **kwargs)
    raise FileNotFoundError(
        f"{path}: not a VAE; expected a diffusers AutoencoderKL directory ({CONFIG} + {WEIGHTS}, "
        "e.g. a pipeline's vae/ folder) or a VAE training workdir (with checkpoints/)"
    )
