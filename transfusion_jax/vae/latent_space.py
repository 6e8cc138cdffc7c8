"""What a VAE makes of an image, read from its small JSON files without loading any weights: the
downsampling factor, the latent channels and the normalisation. The config checks, the data
pipeline and the latent cache need these long before (or instead of) the encoder itself.
"""

import dataclasses
import functools

import numpy as np
from etils import epath

from transfusion_jax.paths import as_path
from transfusion_jax.vae.autoencoder import downsampling
from transfusion_jax.vae.diffusers_weights import CONFIG, WEIGHTS, check_weights, read_config


@dataclasses.dataclass(frozen=True)
class LatentSpace:
    path: str
    downsample: int  # image pixels per latent position along each axis
    channels: int
    scale: np.ndarray  # float32 [channels]: z_norm = (z - shift) * scale
    shift: np.ndarray

    def latent_size(self, image_size: int) -> int:
        if image_size % self.downsample:
            raise ValueError(
                f"config field data.image_size: {image_size} is not a multiple of the VAE's "
                f"downsampling factor {self.downsample} ({self.path})"
            )
        return image_size // self.downsample

    def normalize(self, z: np.ndarray) -> np.ndarray:
        return (z - self.shift) * self.scale


def vae_directory(path) -> epath.Path:
    """The directory `load_vae` and `latent_space` read for `path`: a train_vae workdir, a
    diffusers VAE directory (given as it, its config.json or its weights file), or a pipeline
    directory's vae/ folder."""
    path = as_path(path)
    if path.is_file() and path.name in (CONFIG, WEIGHTS):
        return path.parent
    if not (path / "checkpoints").is_dir() and (path / "vae" / CONFIG).is_file():
        return path / "vae"
    return path


def latent_space(path, check_files: bool = False) -> LatentSpace:
    """The latent space of the VAE at `path` (a diffusers directory or a VAE training workdir);
    errors name the path and what was expected there. `check_files` also checks that a
    diffusers directory's weights file is readable (before a run starts)."""
    space = _latent_space(str(path))
    if check_files and not (as_path(space.path) / "checkpoints").is_dir():
        try:
            check_weights(space.path)
        except (OSError, ValueError) as e:
            raise type(e)(f"config field image.vae_path: {e}") from e
    return space


@functools.lru_cache(maxsize=16)  # configs are resolved often; the files are read once
def _latent_space(path: str) -> LatentSpace:
    path = as_path(path)
    if not str(path) or str(path) == ".":
        raise ValueError(
            "config field image.vae_path: data.latents='vae' needs the VAE, a diffusers "
            "AutoencoderKL directory or a workdir of python -m transfusion_jax.train_vae"
        )
    if not path.exists():
        raise FileNotFoundError(f"config field image.vae_path: {path} does not exist")
    path = vae_directory(path)
    if (path / "checkpoints").is_dir():
        return _workdir_space(path)
    try:
        found = read_config(path)
    except (OSError, ValueError) as e:
        raise type(e)(f"config field image.vae_path: {e}") from e
    v = found["overrides"]
    return LatentSpace(
        str(path),
        downsampling(v["channels"]),
        v["latent_channels"],
        found["scale"],
        found["shift"],
    )


def _workdir_space(path: epath.Path) -> LatentSpace:
    v, info = _stored_vae(path)
    if v.get("kind", "kl") != "kl":
        raise ValueError(
            f"config field image.vae_path: {path} is a VQ tokenizer (vae.kind={v['kind']!r}); "
            "continuous images need a KL VAE (python -m transfusion_jax.train_vae --config "
            "vae_tiny ...)"
        )
    scale, shift = trained_normalisation(v, info)
    return LatentSpace(str(path), downsampling(v["channels"]), v["latent_channels"], scale, shift)


@functools.lru_cache(maxsize=16)  # configs are resolved often; the files are read once
def vq_space(path: str) -> tuple[int, int]:
    """(downsampling, codebook size) of the VQ tokenizer trained in workdir `path`, from its
    stored config (no weights read); errors name image.vae_path."""
    path = as_path(path)
    if not path.exists():
        raise FileNotFoundError(f"config field image.vae_path: {path} does not exist")
    if not (path / "checkpoints").is_dir():
        raise ValueError(
            f"config field image.vae_path: {path} is not a train_vae workdir (no checkpoints/)"
        )
    stored, _ = _stored_vae(path)
    kind = stored.get("kind", "kl")
    if kind != "vq":
        raise ValueError(
            f"config field image.vae_path: {path} is a KL VAE (vae.kind={kind!r}); discrete "
            "images need a VQ tokenizer (python -m transfusion_jax.train_vae "
            "--config vq_tiny ...)"
        )
    return downsampling(stored["channels"]), int(stored["codebook_size"])


def newest_step(path) -> int:
    """The newest checkpoint step of a train_vae workdir (its tokenizer as a run would load it
    today); errors name image.vae_path."""
    from transfusion_jax.checkpoint import Checkpointer

    checkpoints = Checkpointer(as_path(path) / "checkpoints", keep=None, read_only=True)
    try:
        step = checkpoints.latest_step()
    finally:
        checkpoints.close()
    if step is None:
        raise ValueError(f"config field image.vae_path: {path} holds no checkpoint")
    return step


def _stored_vae(path: epath.Path) -> tuple[dict, dict]:
    """(the `vae` config section, the saved info) of the newest checkpoint of a train_vae
    workdir; errors name image.vae_path."""
    from transfusion_jax.checkpoint import Checkpointer

    checkpoints = Checkpointer(path / "checkpoints", keep=None, read_only=True)
    try:
        step = checkpoints.latest_step()
        stored = None if step is None else checkpoints.config_of(step)
        info = (None if step is None else checkpoints.saved_info(step)) or {}
    finally:
        checkpoints.close()
    if stored is None or "vae" not in stored:
        raise ValueError(
            f"config field image.vae_path: {path} holds no trained VAE (no checkpoint with a "
            f"'vae' config; is it a python -m transfusion_jax.train_vae workdir?)"
        )
    return stored["vae"], info


def trained_normalisation(vae_cfg, info: dict) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) of a VAE we trained: 1 / std and mean of each latent channel as measured
    when the step was saved, so the model diffuses unit-variance latents; the config's scalars
    for a step saved without statistics."""
    channels = int(vae_cfg["latent_channels"])
    if "latent_std" in info:
        scale = 1.0 / np.maximum(np.asarray(info["latent_std"], np.float32), 1e-6)
        return scale, np.asarray(info["latent_mean"], np.float32)
    return (
        np.full(channels, vae_cfg["scaling_factor"], np.float32),
        np.full(channels, vae_cfg["shift_factor"], np.float32),
    )
