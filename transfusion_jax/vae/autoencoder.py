"""The KL autoencoder of latent diffusion (diffusers `AutoencoderKL`) as Flax NNX modules, and
its discrete sibling `AutoencoderVQ` (the same encoder and decoder around a codebook, quantizer.py)
that turns images into the code ids of the Chameleon baseline.

The layout follows diffusers layer for layer (same block order, same padding, GroupNorm statistics
and attention scale) so that `diffusers_weights.py` can import a trained SD / SDXL / FLUX VAE by
renaming tensors; tests/test_vae_model.py checks the outputs against diffusers itself. Images and
latents are NHWC. `encode`/`decode` never scale: the latent normalisation (z - shift) * scale is
the `VAE` wrapper's, so the data path applies it in one visible place.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from transfusion_jax.layers import dense, fan_in_init, sharded, to_dtype


def vae_config(**overrides) -> ml_collections.ConfigDict:
    """The autoencoder's hyperparameters; the defaults are Stable Diffusion's VAE."""
    c = ml_collections.ConfigDict()
    # "kl": a Gaussian posterior over continuous latents (Transfusion's); "vq": the nearest of
    # `codebook_size` code vectors of `latent_channels` each (the discrete tokens of Chameleon).
    c.kind = "kl"
    c.codebook_size = 16_384  # vq: codes in the codebook (the paper's Chameleon baseline: 16,384).
    # Width of each resolution level (diffusers block_out_channels); the image is downsampled by 2
    # between consecutive levels, so the latent is 2**(len(channels) - 1) times smaller.
    c.channels = (128, 256, 512, 512)
    c.blocks = 2  # ResNet blocks per level in the encoder; the decoder has blocks + 1 per level.
    c.latent_channels = 4  # Channels of the latent z (4 for SD/SDXL, 16 for FLUX / SD3).
    c.in_channels = 3  # Image channels, in and out.
    c.norm_groups = 32  # GroupNorm groups everywhere (diffusers norm_num_groups).
    c.norm_eps = 1e-6  # GroupNorm epsilon (diffusers fixes 1e-6).
    c.quant_conv = True  # 1x1 conv on the 2 * latent_channels moments after the encoder.
    c.post_quant_conv = True  # 1x1 conv on z before the decoder.
    c.mid_attention = True  # Single-head self-attention between the two mid-block ResNets.
    # Latent normalisation, z_norm = (z - shift_factor) * scaling_factor, applied by the data path
    # (VAE.normalize), never inside encode/decode. Stored here so a trained VAE carries its own.
    c.scaling_factor = 0.18215
    c.shift_factor = 0.0  # See scaling_factor.
    c.dtype = "float32"  # Computation dtype.
    c.param_dtype = "float32"  # Parameter storage dtype.
    c.update(overrides)
    return c


def downsampling(channels) -> int:
    """Image pixels per latent position along each axis: the image halves between levels."""
    return 2 ** (len(channels) - 1)


def _conv(rngs, c_in, c_out, kernel, *, dt, strides=1, padding=None):
    """A conv with torch's symmetric padding (kernel // 2) unless `padding` is given."""
    pad = kernel // 2
    return nnx.Conv(
        c_in,
        c_out,
        kernel_size=(kernel, kernel),
        strides=(strides, strides),
        padding=padding if padding is not None else ((pad, pad), (pad, pad)),
        kernel_init=sharded(fan_in_init(), None, None, "conv_in", "conv_out"),
        bias_init=sharded(nnx.initializers.zeros_init(), "conv_out"),
        rngs=rngs,
        **dt,
    )


def _group_norm(rngs, c, cfg, dt):
    """torch.nn.GroupNorm: contiguous channel groups, biased variance, eps inside the sqrt.

    use_fast_variance=False computes E[(x - mean)^2] (two passes) like torch, instead of
    E[x^2] - mean^2, which loses precision on activations with a large mean.
    """
    return nnx.GroupNorm(
        c,
        num_groups=cfg.norm_groups,
        epsilon=cfg.norm_eps,
        use_fast_variance=False,
        scale_init=sharded(nnx.initializers.ones_init(), "conv_out"),
        bias_init=sharded(nnx.initializers.zeros_init(), "conv_out"),
        rngs=rngs,
        **dt,
    )


class ResnetBlock(nnx.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, plus a (1x1 conv when widths differ) shortcut."""

    def __init__(self, c_in, c_out, cfg, *, dt, rngs):
        self.norm1 = _group_norm(rngs, c_in, cfg, dt)
        self.conv1 = _conv(rngs, c_in, c_out, 3, dt=dt)
        self.norm2 = _group_norm(rngs, c_out, cfg, dt)
        self.conv2 = _conv(rngs, c_out, c_out, 3, dt=dt)
        self.shortcut = _conv(rngs, c_in, c_out, 1, dt=dt) if c_in != c_out else None

    def __call__(self, x):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (x if self.shortcut is None else self.shortcut(x)) + h


class Attention(nnx.Module):
    """Single-head self-attention over all positions, GroupNorm before and a residual around.

    diffusers' VAE mid block uses one head of width c (scale 1/sqrt(c)) and a softmax upcast to
    float32; both are kept so imported weights give the same outputs in reduced precision too.
    """

    def __init__(self, c, cfg, *, dt, rngs):
        self.norm = _group_norm(rngs, c, cfg, dt)
        proj = lambda: dense(rngs, c, c, ("conv_in", "conv_out"), use_bias=True, **dt)
        self.query, self.key, self.value, self.out = proj(), proj(), proj(), proj()

    def __call__(self, x):
        n, h, w, c = x.shape
        t = self.norm(x).reshape(n, h * w, c)
        q, k, v = self.query(t), self.key(t), self.value(t)
        logits = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits / math.sqrt(c), axis=-1).astype(v.dtype)
        out = self.out(jnp.einsum("nqk,nkc->nqc", weights, v))
        return x + out.reshape(n, h, w, c)


class MidBlock(nnx.Module):
    """ResNet, (optional) attention, ResNet at the lowest resolution."""

    def __init__(self, c, cfg, *, dt, rngs):
        self.resnets = nnx.List([ResnetBlock(c, c, cfg, dt=dt, rngs=rngs) for _ in range(2)])
        self.attention = Attention(c, cfg, dt=dt, rngs=rngs) if cfg.mid_attention else None

    def __call__(self, x):
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)


class Level(nnx.Module):
    """One resolution level: ResNet blocks, then a resampling conv (None at the last level)."""

    def __init__(self, c_in, c_out, blocks, cfg, *, resample, dt, rngs):
        widths = [c_in] + [c_out] * blocks
        self.resnets = nnx.List(
            [ResnetBlock(widths[i], widths[i + 1], cfg, dt=dt, rngs=rngs) for i in range(blocks)]
        )
        if resample == "down":
            # diffusers pads right/bottom by one, then a 3x3 stride-2 conv with no padding.
            pad = ((0, 1), (0, 1))
            self.resample = _conv(rngs, c_out, c_out, 3, strides=2, padding=pad, dt=dt)
        else:
            self.resample = _conv(rngs, c_out, c_out, 3, dt=dt) if resample == "up" else None
        self.upsample = resample == "up"

    def __call__(self, x):
        for block in self.resnets:
            x = block(x)
        if self.resample is not None:
            if self.upsample:  # nearest-neighbour 2x, as torch interpolate(scale_factor=2)
                x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            x = self.resample(x)
        return x


class Encoder(nnx.Module):
    """Image -> `out_channels` per latent position (the KL's 2 * latent_channels moments)."""

    def __init__(self, cfg, *, dt, rngs, out_channels: int | None = None):
        ch = tuple(cfg.channels)
        self.conv_in = _conv(rngs, cfg.in_channels, ch[0], 3, dt=dt)
        self.levels = nnx.List()
        for i, width in enumerate(ch):
            resample = "down" if i < len(ch) - 1 else None
            c_in = ch[max(i - 1, 0)]
            self.levels.append(
                Level(c_in, width, cfg.blocks, cfg, resample=resample, dt=dt, rngs=rngs)
            )
        self.mid = MidBlock(ch[-1], cfg, dt=dt, rngs=rngs)
        self.norm_out = _group_norm(rngs, ch[-1], cfg, dt)
        out_channels = out_channels or 2 * cfg.latent_channels
        self.conv_out = _conv(rngs, ch[-1], out_channels, 3, dt=dt)

    def __call__(self, x):
        x = self.conv_in(x)
        for level in self.levels:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


class Decoder(nnx.Module):
    """The encoder mirrored; levels are stored deepest first, in the order they run."""

    def __init__(self, cfg, *, dt, rngs):
        ch = tuple(cfg.channels)
        self.conv_in = _conv(rngs, cfg.latent_channels, ch[-1], 3, dt=dt)
        self.mid = MidBlock(ch[-1], cfg, dt=dt, rngs=rngs)
        self.levels = nnx.List()
        c = ch[-1]
        for i in reversed(range(len(ch))):
            resample = "up" if i > 0 else None
            self.levels.append(
                Level(c, ch[i], cfg.blocks + 1, cfg, resample=resample, dt=dt, rngs=rngs)
            )
            c = ch[i]
        self.norm_out = _group_norm(rngs, ch[0], cfg, dt)
        self.conv_out = _conv(rngs, ch[0], cfg.in_channels, 3, dt=dt)

    def __call__(self, z):
        x = self.mid(self.conv_in(z))
        for level in self.levels:
            x = level(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


class AutoencoderKL(nnx.Module):
    """Images x [N, H, W, in_channels] in [-1, 1] <-> latents z [N, H/f, W/f, latent_channels]."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        f = downsampling(cfg.channels)
        bad = [w for w in cfg.channels if w % cfg.norm_groups]
        if bad:
            raise ValueError(f"vae channels {bad}: not multiples of norm_groups={cfg.norm_groups}")
        self.downsample, self.latent_channels = f, cfg.latent_channels
        dt = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))
        moments, lc = 2 * cfg.latent_channels, cfg.latent_channels
        self.encoder = Encoder(cfg, dt=dt, rngs=rngs)
        self.quant_conv = _conv(rngs, moments, moments, 1, dt=dt) if cfg.quant_conv else None
        self.post_quant_conv = _conv(rngs, lc, lc, 1, dt=dt) if cfg.post_quant_conv else None
        self.decoder = Decoder(cfg, dt=dt, rngs=rngs)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(mean, logvar) of the diagonal Gaussian posterior, float32; logvar in [-30, 20]."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        """Images [N, H, W, in_channels] (float32, not clipped) from unnormalised latents."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def reconstruct(self, x: jax.Array) -> jax.Array:
        """decode(posterior mean of x)."""
        return self.decode(self.encode(x)[0])


class AutoencoderVQ(nnx.Module):
    """Images x [N, H, W, in_channels] in [-1, 1] <-> code ids [N, H/f, W/f] (VQGAN's layout:
    encoder, 1x1 quant_conv, nearest code, 1x1 post_quant_conv, decoder)."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        from transfusion_jax.vae.quantizer import VectorQuantizer

        self.downsample, self.latent_channels = downsampling(cfg.channels), cfg.latent_channels
        dt = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))
        lc = cfg.latent_channels
        self.encoder = Encoder(cfg, dt=dt, rngs=rngs, out_channels=lc)
        self.quant_conv = _conv(rngs, lc, lc, 1, dt=dt) if cfg.quant_conv else None
        self.quantizer = VectorQuantizer(cfg.codebook_size, lc, rngs)
        self.post_quant_conv = _conv(rngs, lc, lc, 1, dt=dt) if cfg.post_quant_conv else None
        self.decoder = Decoder(cfg, dt=dt, rngs=rngs)

    def encode(self, x: jax.Array) -> jax.Array:
        """The encoder's continuous output z [N, h, w, latent_channels] (float32), before the
        codebook."""
        z = self.encoder(x)
        if self.quant_conv is not None:
            z = self.quant_conv(z)
        return z.astype(jnp.float32)

    def decode(self, z_q: jax.Array) -> jax.Array:
        """Images [N, H, W, in_channels] (float32, not clipped) from code vectors."""
        if self.post_quant_conv is not None:
            z_q = self.post_quant_conv(z_q.astype(self.post_quant_conv.kernel.dtype))
        return self.decoder(z_q).astype(jnp.float32)

    def encode_ids(self, x: jax.Array) -> jax.Array:
        """Code ids [N, h, w] (int32) of images."""
        return self.quantizer.codes(self.encode(x))

    def decode_ids(self, ids: jax.Array) -> jax.Array:
        """Images from code ids [N, h, w]."""
        return self.decode(self.quantizer.lookup(ids))

    def reconstruct(self, x: jax.Array) -> jax.Array:
        """decode(nearest codes(encode(x))): what the tokens of x look like."""
        return self.decode_ids(self.encode_ids(x))


def make_autoencoder(cfg, rngs: nnx.Rngs) -> "AutoencoderKL | AutoencoderVQ":
    """The autoencoder `cfg.kind` names ("kl" or "vq")."""
    kinds = {"kl": AutoencoderKL, "vq": AutoencoderVQ}
    if cfg.get("kind", "kl") not in kinds:
        raise ValueError(f"config field vae.kind: {cfg.kind!r} is not 'kl' or 'vq'")
    return kinds[cfg.get("kind", "kl")](cfg, rngs)


@nnx.jit
def _encode(module, x):
    return module.encode(x)


def sample_posterior(mean, logvar, key: jax.Array | None):
    """z ~ N(mean, exp(logvar)), or the mean when `key` is None."""
    if key is None:
        return mean
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


@nnx.jit
def _decode(module, z):
    return module.decode(z)


@dataclasses.dataclass
class VAE:
    """A KL autoencoder with its config and latent normalisation, as the data path uses it.

    z_norm = (z - shift) * scale per latent channel. From a diffusers config these are the scalars
    shift_factor and scaling_factor broadcast (or latents_mean and scaling_factor / latents_std
    where a config gives per-channel statistics).
    """

    module: AutoencoderKL
    cfg: ml_collections.ConfigDict
    scale: np.ndarray  # float32 [latent_channels]
    shift: np.ndarray  # float32 [latent_channels]

    def __post_init__(self):
        c = self.cfg.latent_channels
        self.scale = np.broadcast_to(np.asarray(self.scale, np.float32), (c,)).copy()
        self.shift = np.broadcast_to(np.asarray(self.shift, np.float32), (c,)).copy()

    @classmethod
    def from_config(cls, cfg, module: AutoencoderKL | None = None, seed: int = 0) -> "VAE":
        """A VAE normalised by cfg's scalars scaling_factor / shift_factor; a new module if None."""
        module = AutoencoderKL(cfg, nnx.Rngs(seed)) if module is None else module
        return cls(module, cfg, np.float32(cfg.scaling_factor), np.float32(cfg.shift_factor))

    @property
    def downsample(self) -> int:
        """Image pixels per latent position along each axis (2**(levels - 1))."""
        return downsampling(self.cfg.channels)

    @property
    def latent_channels(self) -> int:
        return self.cfg.latent_channels

    def encode(self, x) -> tuple[jax.Array, jax.Array]:
        """The posterior (mean, logvar) [N, h, w, c] of images [N, H, W, 3] in [-1, 1]
        (unnormalised; see `latents`)."""
        return _encode(self.module, jnp.asarray(x))

    def latents(self, x, key: jax.Array | None = None) -> jax.Array:
        """Normalised latents of images: the posterior mean, or a sample from the posterior
        when a PRNG `key` is given, then `normalize`d (what the diffusion model sees)."""
        return self.normalize(sample_posterior(*self.encode(x), key))

    def decode(self, z) -> jax.Array:
        """Images [N, H, W, 3] (about [-1, 1], not clipped) from unnormalised latents."""
        return _decode(self.module, jnp.asarray(z))

    def normalize(self, z):
        return (z - self.shift) * self.scale

    def denormalize(self, z):
        return z / self.scale + self.shift

    def latent_shape(self, image_size) -> tuple[int, int, int]:
        """(h, w, c) of the latent of an image of `image_size` (int, or (height, width)) pixels."""
        hw = (image_size, image_size) if np.ndim(image_size) == 0 else tuple(image_size)
        f = self.downsample
        if len(hw) != 2 or any(int(s) <= 0 or int(s) % f for s in hw):
            raise ValueError(
                f"image size {image_size} must be a positive multiple of the VAE's downsampling "
                f"factor {f} (2**(len(channels) - 1) for channels={tuple(self.cfg.channels)}); "
                "resize or crop the images to a multiple of it"
            )
        return int(hw[0]) // f, int(hw[1]) // f, self.latent_channels


@nnx.jit
def _encode_ids(module, x):
    return module.encode_ids(x)


@nnx.jit
def _decode_ids(module, ids):
    return module.decode_ids(ids)


@dataclasses.dataclass
class VQTokenizer:
    """A trained VQ autoencoder as the discrete image tokenizer: images <-> code ids."""

    module: AutoencoderVQ
    cfg: ml_collections.ConfigDict

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    @property
    def downsample(self) -> int:
        return downsampling(self.cfg.channels)

    def encode_ids(self, x) -> jax.Array:
        """Code ids [N, h, w] (int32) of images [N, H, W, 3] in [-1, 1]."""
        return _encode_ids(self.module, jnp.asarray(x))

    def decode_ids(self, ids) -> jax.Array:
        """Images [N, H, W, 3] (about [-1, 1], not clipped) from code ids [N, h, w]."""
        return _decode_ids(self.module, jnp.asarray(ids, jnp.int32))
