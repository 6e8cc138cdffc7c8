"""Turning noisy latents into sequence positions and back: patchify, timestep features, the linear
patch layers of the paper. The U-Net variant lives in unet.py.

Every patching module has the same two methods, so the model never branches on the kind:
  encode(x_t [B, M, h, w, c], t [B, M]) -> (tokens [B, M, N, d], context)
  decode(hidden [B, M, N, d], context) -> prediction [B, M, h, w, c]
`context` carries what the decoder needs from the encoder (the U-Net's skips); N = (h/k) * (w/k).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from transfusion_jax.layers import apply_flat, dense
from transfusion_jax.model_config import ModelSpec


def patchify(x: jax.Array, k: int) -> jax.Array:
    """[..., h, w, c] -> [..., (h/k)*(w/k), k*k*c]: k x k windows in raster order."""
    *lead, h, w, c = x.shape
    x = x.reshape(*lead, h // k, k, w // k, k, c)
    x = jnp.moveaxis(x, -4, -3)  # [..., h/k, w/k, k, k, c]
    return x.reshape(*lead, (h // k) * (w // k), k * k * c)


def unpatchify(p: jax.Array, k: int, h: int, w: int, c: int) -> jax.Array:
    """Inverse of `patchify`."""
    *lead, _, _ = p.shape
    x = p.reshape(*lead, h // k, w // k, k, k, c)
    x = jnp.moveaxis(x, -3, -4)
    return x.reshape(*lead, h, w, c)


def sinusoidal_features(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """[...] float timesteps -> [..., dim] cos/sin features (Ho et al.; accepts non-integer t)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = t.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class TimestepEmbedding(nnx.Module):
    """Sinusoidal features of t through a two-layer SiLU MLP to `out_dim`."""

    def __init__(self, feature_dim: int, out_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.feature_dim = feature_dim
        dt = dict(dtype=dtype, param_dtype=param_dtype, use_bias=True)
        self.fc1 = dense(rngs, feature_dim, out_dim, ("time", "time_embed"), **dt)
        self.fc2 = dense(rngs, out_dim, out_dim, ("time_embed", "time_embed_out"), **dt)

    def __call__(self, t: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.silu(self.fc1(sinusoidal_features(t, self.feature_dim))))


class LinearPatching(nnx.Module):
    """The paper's linear variant: the timestep embedding is added to every patch vector before one
    linear layer to width d (the only way t reaches the model); a linear head maps back to k*k*c."""

    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
        image, width, dtypes = spec.image, spec.transformer.d_model, spec.transformer.layer_dtypes
        self.patch_size = image.patch_size
        self.size, self.channels = image.latent_size, image.latent_channels
        patch_dim = image.patch_dim
        self.time = TimestepEmbedding(spec.patch.time_embed_dim, patch_dim, **dtypes, rngs=rngs)
        self.proj_in = dense(rngs, patch_dim, width, ("patch", "embed"), use_bias=True, **dtypes)
        self.proj_out = dense(rngs, width, patch_dim, ("embed", "patch"), use_bias=True, **dtypes)

    def encode(self, x_t: jax.Array, t: jax.Array):
        patches = patchify(x_t, self.patch_size)  # [B, M, N, p]
        patches = patches + self.time(t)[:, :, None, :]
        return apply_flat(self.proj_in, patches), None

    def decode(self, hidden: jax.Array, context) -> jax.Array:
        del context
        out = apply_flat(self.proj_out, hidden).astype(jnp.float32)
        return unpatchify(out, self.patch_size, self.size, self.size, self.channels)
