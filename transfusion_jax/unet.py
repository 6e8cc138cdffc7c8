"""The paper's U-Net patch variant: down blocks before the transformer, up blocks after it.

A latent [h, w, c] goes through log2(k) + 1 resolution levels of ResNet blocks (timestep embedding
added inside every block, LayerNorm where latent-diffusion U-Nets use AdaLN/GroupNorm,
self-attention after each block at resolutions up to `patch.unet_attention_resolution`), halving
the resolution between levels, so the last level is [h/k, w/k, width] and becomes
N = (h/k) * (w/k) tokens of width d. The up path mirrors it and takes one skip connection from each
down block, across the transformer.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from transfusion_jax import attention
from transfusion_jax.config import unet_attends, unet_attention_heads
from transfusion_jax.layers import dense, fan_in_init, sharded
from transfusion_jax.model_config import ModelSpec
from transfusion_jax.patching import TimestepEmbedding


def _conv(rngs, c_in, c_out, kernel, *, strides=1, dt, scale=1.0):
    return nnx.Conv(
        c_in,
        c_out,
        kernel_size=(kernel, kernel),
        strides=(strides, strides),
        padding="SAME",
        kernel_init=sharded(fan_in_init(scale), None, None, "conv_in", "conv_out"),
        bias_init=sharded(nnx.initializers.zeros_init(), "conv_out"),
        rngs=rngs,
        **dt,
    )


def _layer_norm(rngs, c, dt):
    return nnx.LayerNorm(
        c,
        scale_init=sharded(nnx.initializers.ones_init(), "conv_out"),
        bias_init=sharded(nnx.initializers.zeros_init(), "conv_out"),
        rngs=rngs,
        **dt,
    )


class ResBlock(nnx.Module):
    def __init__(self, c_in, c_out, temb_dim, *, dt, rngs):
        self.norm1 = _layer_norm(rngs, c_in, dt)
        self.conv1 = _conv(rngs, c_in, c_out, 3, dt=dt)
        self.time = dense(
            rngs, temb_dim, c_out, ("time_embed_out", "conv_out"), use_bias=True, **dt
        )
        self.norm2 = _layer_norm(rngs, c_out, dt)
        self.conv2 = _conv(rngs, c_out, c_out, 3, dt=dt, scale=0.1)
        self.skip = _conv(rngs, c_in, c_out, 1, dt=dt) if c_in != c_out else None

    def __call__(self, x, temb):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = h + self.time(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (x if self.skip is None else self.skip(x)) + h


class SpatialSelfAttention(nnx.Module):
    """Full self-attention over the positions of one image: an image sees all of itself."""

    def __init__(self, c, head_dim, *, dt, rngs):
        self.heads = unet_attention_heads(c, head_dim)
        self.norm = _layer_norm(rngs, c, dt)
        self.qkv = dense(rngs, c, 3 * c, ("conv_in", "conv_out"), use_bias=True, **dt)
        self.out = dense(rngs, c, c, ("conv_in", "conv_out"), use_bias=True, scale=0.1, **dt)

    def __call__(self, x):
        n, h, w, c = x.shape
        q, k, v = jnp.split(self.qkv(self.norm(x)).reshape(n, h * w, 3, self.heads, -1), 3, axis=2)
        mask = jnp.ones((n, h * w, h * w), bool)
        out = attention.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], mask)
        return x + self.out(out.reshape(n, h, w, c))


class UNetPatching(nnx.Module):
    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
        image, patch, width_out = spec.image, spec.patch, spec.transformer.d_model
        self.size, self.channels = image.latent_size, image.latent_channels
        dt = spec.transformer.layer_dtypes
        levels, widths = spec.unet_levels, spec.unet_widths
        temb_dim = 4 * widths[0]
        self.time = TimestepEmbedding(patch.time_embed_dim, temb_dim, **dt, rngs=rngs)

        def attn(c, level):
            if not unet_attends(image.latent_size, level, patch.unet_attention_resolution):
                return None
            return SpatialSelfAttention(c, patch.unet_head_dim, dt=dt, rngs=rngs)

        # Down path: conv_in, then per level `unet_blocks` (ResBlock, attention), then downsample.
        self.conv_in = _conv(rngs, image.latent_channels, widths[0], 3, dt=dt)
        self.down, self.down_attn, self.downsample = nnx.List(), nnx.List(), nnx.List()
        c = widths[0]
        skip_widths = []
        for level, width in enumerate(widths):
            for _ in range(patch.unet_blocks):
                self.down.append(ResBlock(c, width, temb_dim, dt=dt, rngs=rngs))
                self.down_attn.append(attn(width, level))
                c = width
                skip_widths.append(c)
            if level < levels - 1:
                self.downsample.append(_conv(rngs, c, c, 3, strides=2, dt=dt))
        self.to_tokens = dense(rngs, c, width_out, ("conv_in", "embed"), use_bias=True, **dt)

        # Up path: from tokens, per level (deepest first) `unet_blocks` ResBlocks on
        # concat(h, skip), then upsample; finally back to the latent channels.
        self.from_tokens = dense(rngs, width_out, c, ("embed", "conv_out"), use_bias=True, **dt)
        self.up, self.up_attn, self.upsample = nnx.List(), nnx.List(), nnx.List()
        for level in reversed(range(levels)):
            width = widths[level]
            for _ in range(patch.unet_blocks):
                self.up.append(ResBlock(c + skip_widths.pop(), width, temb_dim, dt=dt, rngs=rngs))
                self.up_attn.append(attn(width, level))
                c = width
            if level > 0:
                self.upsample.append(_conv(rngs, c, c, 3, dt=dt))
        self.norm_out = _layer_norm(rngs, c, dt)
        self.conv_out = _conv(rngs, c, image.latent_channels, 3, dt=dt)
        self.blocks_per_level = patch.unet_blocks

    def encode(self, x_t: jax.Array, t: jax.Array):
        b, m, h, w, c = x_t.shape
        temb = self.time(t.reshape(b * m))
        x = self.conv_in(x_t.reshape(b * m, h, w, c))
        skips = []
        for i, (block, attn) in enumerate(zip(self.down, self.down_attn, strict=True)):
            x = block(x, temb)
            if attn is not None:
                x = attn(x)
            skips.append(x)
            level, last_in_level = divmod(i + 1, self.blocks_per_level)
            if last_in_level == 0 and level - 1 < len(self.downsample):
                x = self.downsample[level - 1](x)
        gh, gw = x.shape[1:3]
        tokens = self.to_tokens(x).reshape(b, m, gh * gw, -1)
        return tokens, (skips, temb, (gh, gw))

    def decode(self, hidden: jax.Array, context) -> jax.Array:
        skips, temb, (gh, gw) = context
        b, m, _, _ = hidden.shape
        x = self.from_tokens(hidden.reshape(b * m, gh, gw, -1))
        skips = list(skips)
        for i, (block, attn) in enumerate(zip(self.up, self.up_attn, strict=True)):
            x = block(jnp.concatenate([x, skips.pop()], axis=-1), temb)
            if attn is not None:
                x = attn(x)
            level, last_in_level = divmod(i + 1, self.blocks_per_level)
            if last_in_level == 0 and level - 1 < len(self.upsample):
                n, h, w, c = x.shape
                x = jax.image.resize(x, (n, 2 * h, 2 * w, c), "nearest")
                x = self.upsample[level - 1](x)
        out = self.conv_out(jax.nn.silu(self.norm_out(x))).astype(jnp.float32)
        return out.reshape(b, m, self.size, self.size, self.channels)
