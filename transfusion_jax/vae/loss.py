"""The autoencoder's objective: reconstruction + beta * KL (or, for the VQ autoencoder, the
commitment loss), and an optional PatchGAN.

  loss = l1_weight * |x - x'| + l2_weight * (x - x')^2 + kl_weight * KL      (vae.kind "kl")
                                                     + commitment_weight * |z - sg(e)|^2  ("vq")
         + perceptual_weight * LPIPS(x, x')                              (perceptual.py)
         + [step >= disc_start] * disc_weight * (-D(x'))            (generator side)
         + [step >= disc_start] * hinge(D(x), D(x'))                 (discriminator side)

Reconstruction terms are means over pixel values; KL is the closed form
KL(N(mu, sigma^2) || N(0, 1)) = 0.5 * (mu^2 + sigma^2 - 1 - log sigma^2), summed over a latent and
divided by its image's pixel values, so `kl_weight` means what LDM's kl_weight means.

Both GAN sides come out of one gradient: the generator term sees the discriminator's weights
through stop_gradient and the discriminator term sees the reconstruction through stop_gradient, so
d(loss)/d(vae) and d(loss)/d(disc) are each side's own gradient.
"""

import dm_pix
import jax
import jax.numpy as jnp
from flax import nnx

from transfusion_jax.layers import fan_in_init, sharded
from transfusion_jax.vae.autoencoder import AutoencoderVQ, sample_posterior


def kl_to_standard_normal(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) per example, summed over all but the batch axis."""
    terms = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.sum(terms.reshape(terms.shape[0], -1), axis=-1)


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
    """Peak signal-to-noise ratio in dB of images in [-1, 1], per image (dm-pix on [0, 1])."""
    return dm_pix.psnr((x + 1.0) / 2.0, (y + 1.0) / 2.0)


class PatchDiscriminator(nnx.Module):
    """pix2pix's N-layer PatchGAN: 4x4 strided convs with LeakyReLU, one logit per patch.

    GroupNorm stands in for pix2pix's BatchNorm, so the model stays a pure function of its
    parameters (no running statistics in the train state) and shards like the rest.
    """

    def __init__(self, channels: int, layers: int, rngs: nnx.Rngs):
        conv = lambda c_in, c_out, stride: nnx.Conv(
            c_in,
            c_out,
            kernel_size=(4, 4),
            strides=(stride, stride),
            padding=((1, 1), (1, 1)),
            kernel_init=sharded(fan_in_init(), None, None, "conv_in", "conv_out"),
            bias_init=sharded(nnx.initializers.zeros_init(), "conv_out"),
            rngs=rngs,
        )
        widths = [channels * min(2**i, 8) for i in range(layers + 1)]
        self.first = conv(3, widths[0], 2)
        self.convs = nnx.List()
        self.norms = nnx.List()
        for i in range(1, layers + 1):
            self.convs.append(conv(widths[i - 1], widths[i], 2 if i < layers else 1))
            groups = min(32, widths[i])
            self.norms.append(
                nnx.GroupNorm(
                    widths[i],
                    num_groups=groups,
                    scale_init=sharded(nnx.initializers.ones_init(), "conv_out"),
                    bias_init=sharded(nnx.initializers.zeros_init(), "conv_out"),
                    rngs=rngs,
                )
            )
        self.last = conv(widths[-1], 1, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.leaky_relu(self.first(x), 0.2)
        for conv, norm in zip(self.convs, self.norms, strict=True):
            h = jax.nn.leaky_relu(norm(conv(h)), 0.2)
        return self.last(h)


def regularized_reconstruction(autoencoder, x, key, loss_cfg):
    """(reconstruction, weighted regulariser, metrics) of images x: a posterior sample decoded
    with the KL term, or (VQ) the straight-through codes decoded with the commitment term. The VQ
    metrics carry the step's encoder outputs and codes under `_encodings` / `_codes` for the
    codebook update that follows the optimizer step (vae/train_step.py); they are not logged."""
    if isinstance(autoencoder, AutoencoderVQ):
        z = autoencoder.encode(x)
        z_q, ids, commitment = autoencoder.quantizer(z)
        metrics = dict(
            commitment=commitment,
            _encodings=jax.lax.stop_gradient(z.reshape(-1, z.shape[-1])),
            _codes=ids.reshape(-1),
        )
        return autoencoder.decode(z_q), loss_cfg.commitment_weight * commitment, metrics
    mean, logvar = autoencoder.encode(x)
    reconstruction = autoencoder.decode(sample_posterior(mean, logvar, key))
    kl = jnp.mean(kl_to_standard_normal(mean, logvar)) / x[0].size
    return reconstruction, loss_cfg.kl_weight * kl, dict(kl=kl)


def vae_loss(autoencoder, discriminator, x, key, step, loss_cfg, lpips=None):
    """(loss, metrics) of a batch of images x [B, H, W, 3] in [-1, 1]; `lpips` (frozen) adds
    loss.perceptual_weight times the perceptual distance."""
    reconstruction, regulariser, metrics = regularized_reconstruction(autoencoder, x, key, loss_cfg)
    error = reconstruction - x
    l1 = jnp.mean(jnp.abs(error))
    l2 = jnp.mean(jnp.square(error))
    loss = loss_cfg.l1_weight * l1 + loss_cfg.l2_weight * l2 + regulariser
    metrics.update(l1=l1, l2=l2, psnr=jnp.mean(psnr(reconstruction, x)))
    if lpips is not None:
        perceptual = jnp.mean(lpips(x, reconstruction))
        loss = loss + loss_cfg.perceptual_weight * perceptual
        metrics["perceptual"] = perceptual
    if discriminator is not None:
        on = (step >= loss_cfg.disc_start).astype(jnp.float32)
        frozen = jax.tree.map(jax.lax.stop_gradient, nnx.state(discriminator))
        judge = nnx.merge(nnx.graphdef(discriminator), frozen)
        g_loss = -jnp.mean(judge(reconstruction))
        real = discriminator(x)
        fake = discriminator(jax.lax.stop_gradient(reconstruction))
        d_loss = 0.5 * (jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake)))
        loss = loss + on * (loss_cfg.disc_weight * g_loss + d_loss)
        metrics.update(g_loss=g_loss, d_loss=d_loss)
    metrics["loss"] = loss
    return loss, metrics
