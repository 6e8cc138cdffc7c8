"""The VAE's training program: Transfusion's `TrainProgram` (sharded state, the non-finite guard,
EMA, AOT compile) with the autoencoder (and an optional discriminator) as the model and
`vae_loss` as the objective; plus the held-out scores and the latent statistics.

The state's params are `{"autoencoder": ..., "discriminator": ...}` (the second only with
`loss.disc_weight` > 0); one AdamW updates both, since each side's gradient is its own (loss.py).
A VQ autoencoder's codebook is not a gradient step's: `after_update` sets it (and its moving
averages) from the step's encoder outputs (quantizer.py).
"""

import dataclasses

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transfusion_jax import sharding as shd
from transfusion_jax.train_step import TrainProgram
from transfusion_jax.vae.autoencoder import (
    AutoencoderKL,
    AutoencoderVQ,
    make_autoencoder,
    sample_posterior,
)
from transfusion_jax.vae.config import resolve_vae
from transfusion_jax.vae.loss import PatchDiscriminator, vae_loss
from transfusion_jax.vae.perceptual import load_lpips
from transfusion_jax.vae.quantizer import ema_codebook_update

CODEBOOK_STREAM = 0xC0DE  # folded into a step's key for the dead-code restarts


class VAETraining(nnx.Module):
    """The trained modules, as one tree."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        self.autoencoder = make_autoencoder(cfg.vae, rngs)
        loss = cfg.loss
        self.discriminator = (
            PatchDiscriminator(loss.disc_channels, loss.disc_layers, rngs)
            if loss.disc_weight > 0
            else None
        )


@dataclasses.dataclass
class VAETrainProgram(TrainProgram):
    resolve = staticmethod(resolve_vae)

    def make_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return VAETraining(self.cfg, rngs)

    def setup(self) -> None:
        """The perceptual network, frozen, when loss.perceptual_weight > 0."""
        self.vae = self.vq = None  # no frozen encoder: this program trains the autoencoder
        if self.cfg.loss.perceptual_weight > 0 and self.frozen_weights:
            lpips = load_lpips(self.cfg.loss.perceptual_path)
            self.lpips_graphdef = nnx.graphdef(lpips)
            self.freeze(lpips, replicate=True)

    def loss(self, params, batch, rng, counts=None, step=None, frozen=None):
        del counts
        model = self.model(params)
        step = jnp.zeros((), jnp.int32) if step is None else step
        lpips = None if frozen is None else nnx.merge(self.lpips_graphdef, frozen)
        return vae_loss(
            model.autoencoder, model.discriminator, batch, rng, step, self.cfg.loss, lpips
        )

    def after_update(self, params, metrics, rng, step):
        """The VQ codebook from this step's encoder outputs (its moving averages, dead codes
        restarted); the step's `_encodings` / `_codes` leave the metrics here."""
        if self.cfg.vae.kind != "vq":
            return params, metrics
        metrics = dict(metrics)
        z, ids = metrics.pop("_encodings"), metrics.pop("_codes")
        autoencoder = params["autoencoder"]
        quantizer, codebook_metrics = ema_codebook_update(
            autoencoder["quantizer"],
            z,
            ids,
            jax.random.fold_in(rng, CODEBOOK_STREAM),
            step + 1,
            self.cfg.loss.codebook_decay,
            self.cfg.loss.restart_share,
        )
        params = {**params, "autoencoder": {**autoencoder, "quantizer": quantizer}}
        return params, metrics | codebook_metrics

    # -- outside the step -----------------------------------------------------------------------

    def autoencoder(self, params) -> AutoencoderKL | AutoencoderVQ:
        return self.model(params).autoencoder

    def compile_scores(self, shape):
        """Per-image (psnr, ssim, l1) of the reconstructions of images `shape` (posterior mean,
        or nearest codes); a VQ autoencoder adds the `codes` [N, h, w]."""

        def scores(params, images):
            autoencoder = self.autoencoder(params)
            if isinstance(autoencoder, AutoencoderVQ):
                codes = autoencoder.encode_ids(images)
                reconstruction = autoencoder.decode_ids(codes)
            else:
                codes, reconstruction = None, autoencoder.reconstruct(images)
            reconstruction = jnp.clip(reconstruction, -1.0, 1.0)
            x, y = (images + 1.0) / 2.0, (reconstruction + 1.0) / 2.0  # [0, 1] for the metrics
            out = dict(
                psnr=dm_pix.psnr(x, y),
                ssim=dm_pix.ssim(x, y),
                # on [-1, 1], as the training loss's l1
                l1=jnp.mean(jnp.abs(images - reconstruction), axis=(1, 2, 3)),
            )
            return out if codes is None else out | dict(codes=codes)

        return self._compile_on_params(scores, shape)

    def compile_latents(self, shape):
        """Posterior samples z (a fixed key) of images `shape`, for the latent statistics."""

        def latents(params, images):
            mean, logvar = self.autoencoder(params).encode(images)
            return sample_posterior(mean, logvar, jax.random.key(0))

        return self._compile_on_params(latents, shape)

    def _compile_on_params(self, fn, shape):
        images = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=self.batch_sharding)
        params = self.abstract_state().params
        return (
            jax.jit(
                fn,
                in_shardings=(self.param_shardings, self.batch_sharding),
                out_shardings=shd.replicated(self.mesh),  # every process reads all of it
            )
            .lower(params, images)
            .compile()
        )


def batched(compiled, params, images: np.ndarray, batch_size: int, mesh):
    """`compiled` over `images` in batches of `batch_size` (the last one padded by repeating the
    first image, the padding dropped), concatenated on the host."""
    outputs, n = [], len(images)
    for start in range(0, n, batch_size):
        chunk = images[start : start + batch_size]
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], pad, axis=0)])
        # Every process holds all of `chunk`: each device takes its rows from it.
        sharding = shd.batch_sharding(mesh)
        array = jax.make_array_from_callback(chunk.shape, sharding, chunk.__getitem__)
        out = jax.device_get(compiled(params, array))
        keep = batch_size - pad
        outputs.append(jax.tree.map(lambda x, keep=keep: x[:keep], out))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outputs)
