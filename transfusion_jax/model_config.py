"""The model's settings, resolved once into frozen, typed specs that the modules take.

`ModelSpec.from_config(cfg)` runs `config.resolve_model` (the 0 = default fields filled in, every
check with its named-field error) and copies the `model`, `image`, `patch` and `diffusion`
sections into four frozen dataclasses, each value converted to its annotated type. Modules take
the part they need (`Transformer(spec.transformer, rngs)`, `Diffusion.from_spec(spec.diffusion)`);
what is derived from several fields (patches per image, the U-Net's levels) is a property here,
computed in one place.

Plain frozen dataclasses, not `flax.struct`: a spec holds no arrays and is never a pytree leaf of
a jitted function; it is static, hashable data (a `Transfusion` keeps it as an attribute, so it
belongs to the graph definition, not the state).
"""

import dataclasses
import math
import typing

import jax.numpy as jnp

from transfusion_jax.config import resolve_model


def from_section(cls, section):
    """An instance of the spec dataclass `cls` from the ConfigDict section with its fields' names,
    each value converted to the field's annotated type (tuple[int, ...]: a tuple of ints)."""
    values = {}
    for field in dataclasses.fields(cls):
        value = section[field.name]
        if typing.get_origin(field.type) is tuple:
            (item_type, _) = typing.get_args(field.type)
            values[field.name] = tuple(item_type(item) for item in value)
        else:
            values[field.name] = field.type(value)
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class TransformerSpec:
    """The transformer and its token embedding and LM head (the config's `model` section)."""

    vocab_size: int
    d_model: int
    depth: int
    num_heads: int
    num_kv_heads: int  # resolved: num_heads when the config says 0
    head_dim: int  # resolved: d_model // num_heads when the config says 0
    ffn_dim: int  # resolved: the Llama-2 rule when the config says 0
    qk_norm: bool
    tie_embeddings: bool
    rope_theta: float
    norm_eps: float
    param_dtype: str
    dtype: str
    remat_policy: str
    attention: str
    image_attention: str  # "bidirectional" or "causal"
    # "continuous" (diffused latents) or "discrete" (VQ code ids as tokens, discrete.py); a
    # discrete model's vocab_size counts the text vocabulary and the codebook
    image_repr: str

    @property
    def layer_dtypes(self) -> dict:
        """The `dtype` (compute) and `param_dtype` (weights) keyword arguments of every layer."""
        return dict(dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype))

    @property
    def residual_out_scale(self) -> float:
        """Init scale of the projections that write into the residual stream (attention output,
        MLP down): outputs shrink with depth, GPT-2 style."""
        return 1.0 / (2 * self.depth)

    @property
    def bidirectional_images(self) -> bool:
        """Patches attend to every patch of their image (else causally, like text); discrete
        image tokens are text to the transformer, attended causally as Chameleon's."""
        return self.image_attention == "bidirectional" and self.image_repr == "continuous"

    @property
    def discrete_images(self) -> bool:
        return self.image_repr == "discrete"


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """One image slot's latent and its patches (the config's `image` section, model part)."""

    latent_size: int  # resolved: data.image_size (pixel space) or the VAE's latent size
    latent_channels: int  # resolved: 3 (pixel space) or the VAE's channels
    patch_size: int
    max_images: int
    codebook_size: int  # discrete images: the tokenizer's codes (0 for continuous ones)

    @property
    def grid_size(self) -> int:
        """Patches along each side of an image."""
        return self.latent_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """N, the sequence positions one image takes."""
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        """Values in one patch, patch_size * patch_size * latent_channels."""
        return self.patch_size * self.patch_size * self.latent_channels

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """[h, w, c] of one image's latent."""
        return (self.latent_size, self.latent_size, self.latent_channels)


@dataclasses.dataclass(frozen=True)
class PatchSpec:
    """The patch encoder and decoder (the config's `patch` section)."""

    kind: str  # "linear" or "unet"
    time_embed_dim: int
    unet_channels: tuple[int, ...]
    unet_blocks: int
    unet_attention_resolution: int
    unet_head_dim: int


@dataclasses.dataclass(frozen=True)
class DiffusionSpec:
    """The diffusion objective and its training settings (the config's `diffusion` section)."""

    objective: str  # "epsilon" or "flow"
    num_timesteps: int
    loss_weight: float
    noise_limit: int
    cond_drop_rate: float
    timestep_sampling: str  # "uniform" or "logit_normal"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything that defines the model, resolved and checked: see `from_config`."""

    transformer: TransformerSpec
    image: ImageSpec
    patch: PatchSpec
    diffusion: DiffusionSpec

    @classmethod
    def from_config(cls, cfg) -> "ModelSpec":
        """The spec of a ConfigDict, after `resolve_model` filled in its defaults and checked it
        (a bad value raises ValueError naming the config field)."""
        cfg = resolve_model(cfg)
        transformer = from_section(TransformerSpec, cfg.model)
        # discrete images: code c is token model.vocab_size + c (`image_token_offset`)
        vocab_size = transformer.vocab_size + cfg.image.codebook_size
        return cls(
            transformer=dataclasses.replace(transformer, vocab_size=vocab_size),
            image=from_section(ImageSpec, cfg.image),
            patch=from_section(PatchSpec, cfg.patch),
            diffusion=from_section(DiffusionSpec, cfg.diffusion),
        )

    @property
    def num_patches(self) -> int:
        """N, the sequence positions one image takes."""
        return self.image.num_patches

    @property
    def image_token_offset(self) -> int:
        """Discrete images: the token id of code 0 (the text vocabulary's size)."""
        return self.transformer.vocab_size - self.image.codebook_size

    @property
    def unet_levels(self) -> int:
        """Resolution levels of the U-Net: log2(patch_size) + 1, halving between levels, so the
        last one is the patch grid."""
        return int(math.log2(self.image.patch_size)) + 1

    @property
    def unet_widths(self) -> tuple[int, ...]:
        """The U-Net's width at each of its levels (the first `unet_levels` unet_channels)."""
        return self.patch.unet_channels[: self.unet_levels]


def as_model_spec(spec_or_config) -> ModelSpec:
    """A `ModelSpec` as it is, or the spec of a ConfigDict (`ModelSpec.from_config`): for the
    entry points that also take a config (`Transfusion`, `parameter_counts`, ...)."""
    if isinstance(spec_or_config, ModelSpec):
        return spec_or_config
    return ModelSpec.from_config(spec_or_config)
