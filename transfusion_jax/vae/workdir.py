"""A VAE (or VQ tokenizer, `load_vq`) from one of our own training directories
(`python -m transfusion_jax.train_vae`).

The weights are restored like any run's (the newest checkpoint that restores, or `step`), with the
config stored in that checkpoint; the latent normalisation comes from the per-channel mean and std
measured on that step's weights when it was saved: z_norm = (z - mean) / std, so every channel of
the latents the model diffuses has unit variance.
"""

import logging

import jax
from flax import nnx

from transfusion_jax.checkpoint import Checkpointer, restore_trained
from transfusion_jax.paths import as_path
from transfusion_jax.sharding import make_mesh
from transfusion_jax.vae.autoencoder import VAE, AutoencoderVQ, VQTokenizer, make_autoencoder
from transfusion_jax.vae.latent_space import latent_space, trained_normalisation

log = logging.getLogger(__name__)


def load_workdir(
    path, step: int | None = None, ema: bool = False, dtype=None, param_dtype=None
) -> VAE:
    path = as_path(path)
    latent_space(path)  # a workdir of another model (or a VQ) is refused by name, before restoring
    module, cfg, info, step = _restore_autoencoder(path, step, ema, dtype, param_dtype)
    if "latent_std" not in info:
        log.warning("%s: step %d stores no latent statistics; using vae.scaling_factor", path, step)
    return VAE(module, cfg, *trained_normalisation(cfg, info))


def load_vq(path, step: int | None = None, ema: bool = False, dtype=None, param_dtype=None):
    """The VQ tokenizer trained in workdir `path` (python -m transfusion_jax.train_vae with
    vae.kind=vq), as a `VQTokenizer`."""
    path = as_path(path)
    module, cfg, _, _ = _restore_autoencoder(path, step, ema, dtype, param_dtype)
    if not isinstance(module, AutoencoderVQ):
        raise ValueError(
            f"{path}: a KL VAE (vae.kind={cfg.kind!r}); discrete image tokens need a VQ tokenizer "
            "(python -m transfusion_jax.train_vae --config vq_tiny ...)"
        )
    return VQTokenizer(module, cfg)


def _restore_autoencoder(path, step, ema, dtype, param_dtype):
    """(module, vae config, the step's saved info, step) of a train_vae workdir."""
    from transfusion_jax.vae.config import vae_base_config
    from transfusion_jax.vae.train_step import VAETrainProgram  # the trainer, only when needed

    if not (path / "checkpoints").is_dir():
        raise FileNotFoundError(f"{path}: not a train_vae workdir (no checkpoints/)")
    mesh = make_mesh(1, 1, 1, jax.local_devices()[:1])

    def make_program(cfg):  # the perceptual network is a training-only frozen weight
        return VAETrainProgram(cfg, mesh, frozen_weights=False)

    program, state, step = restore_trained(path, make_program, step, defaults=vae_base_config)
    if ema and not state.ema_params:
        raise ValueError(f"{path}: the run kept no EMA weights (train.ema_decay=0)")
    params = (state.ema_params if ema else state.params)["autoencoder"]
    if "quantizer" in params:  # an average of codes (and their restarts) is no codebook: the
        # EMA weights decode with the codebook of their step
        params = {**params, "quantizer": state.params["autoencoder"]["quantizer"]}
    cfg = program.cfg.vae
    cfg.dtype, cfg.param_dtype = dtype or cfg.dtype, param_dtype or cfg.param_dtype
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: make_autoencoder(cfg, nnx.Rngs(0))))
    params = jax.tree.map(lambda x: x.astype(cfg.param_dtype), params)
    if isinstance(params.get("quantizer"), dict):  # codes are looked up in float32 always
        params["quantizer"] = jax.tree.map(lambda x: x.astype("float32"), params["quantizer"])
    nnx.replace_by_pure_dict(abstract, params)
    module = nnx.merge(graphdef, abstract)
    checkpoints = Checkpointer(path / "checkpoints", keep=None, read_only=True)
    info = checkpoints.saved_info(step) or {}
    checkpoints.close()
    return module, cfg, info, step
