"""Transfusion in JAX/Flax NNX: one transformer trained with next-token prediction on text and
diffusion on image latents, causal over the sequence and bidirectional inside each image."""

from transfusion_jax.attention import key_ranges, make_attention_mask
from transfusion_jax.batch import (
    Batch,
    Image,
    SpecialTokens,
    build_batch,
    caption_first_document,
    image_first_document,
)
from transfusion_jax.config import base_config
from transfusion_jax.diffusion import Diffusion
from transfusion_jax.inference import Pipeline
from transfusion_jax.loss import transfusion_loss
from transfusion_jax.model import Transfusion, parameter_counts

__all__ = [
    "Batch",
    "Diffusion",
    "Image",
    "Pipeline",
    "SpecialTokens",
    "Transfusion",
    "base_config",
    "build_batch",
    "caption_first_document",
    "image_first_document",
    "key_ranges",
    "make_attention_mask",
    "parameter_counts",
    "transfusion_loss",
]
