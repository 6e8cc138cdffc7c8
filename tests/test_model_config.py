"""The frozen model spec: resolved like `resolve_model`, checked with the same errors, and the
same model whether Transfusion is given the spec or the config."""

import dataclasses
import math
import typing

import jax
import numpy as np
import pytest
from flax import nnx

from tests.helpers import ROOT, tiny_config
from transfusion_jax.config import load_config, resolve_model
from transfusion_jax.diffusion import Diffusion
from transfusion_jax.flops import model_flops_per_token
from transfusion_jax.model import Transfusion, parameter_counts
from transfusion_jax.model_config import ModelSpec

PAPER = str(ROOT / "configs" / "paper.py")
SIZES = ("0.16b", "0.37b", "0.76b", "1.4b", "7b")
SECTIONS = {"transformer": "model", "image": "image", "patch": "patch", "diffusion": "diffusion"}


def shipped_configs():
    configs = {"tiny": load_config(str(ROOT / "configs" / "tiny.py")), "tests": tiny_config()}
    for size in SIZES:
        for kind in ("linear", "unet"):
            configs[f"paper:{size},{kind}"] = load_config(f"{PAPER}:{size},{kind}")
    return configs


def test_the_spec_is_frozen_and_hashable():
    spec = ModelSpec.from_config(tiny_config())
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.transformer.d_model = 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.image = spec.image
    assert hash(spec) == hash(ModelSpec.from_config(tiny_config()))  # static data under jit
    assert spec == ModelSpec.from_config(tiny_config())


@pytest.mark.parametrize("name", list(shipped_configs()))
def test_from_config_matches_resolve_model_field_by_field(name):
    cfg = shipped_configs()[name]
    spec, resolved = ModelSpec.from_config(cfg), resolve_model(cfg)
    assert [f.name for f in dataclasses.fields(spec)] == list(SECTIONS)
    for part_name, section in SECTIONS.items():
        part = getattr(spec, part_name)
        for field in dataclasses.fields(part):
            value, expected = getattr(part, field.name), resolved[section][field.name]
            if typing.get_origin(field.type) is tuple:
                assert value == tuple(expected) and all(type(v) is int for v in value), field.name
            else:
                assert value == expected and type(value) is field.type, field.name
    # The 0 = default fields are filled in, and the derived values are the formulas'.
    model = spec.transformer
    assert min(model.num_kv_heads, model.head_dim, model.ffn_dim) > 0
    image = spec.image
    assert spec.num_patches == (image.latent_size // image.patch_size) ** 2
    assert image.patch_dim == image.patch_size**2 * image.latent_channels
    assert spec.unet_levels == int(math.log2(image.patch_size)) + 1
    assert spec.unet_widths == tuple(resolved.patch.unet_channels[: spec.unet_levels])


def test_bad_values_raise_the_same_named_field_errors():
    for overrides, field in (
        (dict(image__patch_size=3), "image.patch_size"),
        (dict(model__num_kv_heads=3), "model.num_kv_heads"),
        (dict(diffusion__noise_limit=0), "diffusion.noise_limit"),
        (dict(model__image_attention="full"), "model.image_attention"),
    ):
        with pytest.raises(ValueError, match=field) as from_spec:
            ModelSpec.from_config(tiny_config(**overrides))
        with pytest.raises(ValueError) as from_resolve:
            resolve_model(tiny_config(**overrides))
        assert str(from_spec.value) == str(from_resolve.value)


def test_image_attention_reaches_the_spec():
    assert ModelSpec.from_config(tiny_config()).transformer.bidirectional_images
    spec = ModelSpec.from_config(tiny_config(model__image_attention="causal"))
    assert spec.transformer.image_attention == "causal"
    assert not spec.transformer.bidirectional_images


def param_tree(model_or_factory):
    """path -> (shape, dtype, logical axis names) of every variable of the state."""
    state = nnx.state(model_or_factory)
    leaves = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]
    return {
        jax.tree_util.keystr(path): (
            type(leaf).__name__,
            leaf.get_value().shape,
            leaf.get_value().dtype,
            leaf.get_metadata().get("out_sharding"),
        )
        for path, leaf in leaves
    }


@pytest.mark.parametrize(
    "name", ["tiny", "tests", "paper:0.16b,linear", "paper:0.16b,unet", "paper:7b,linear"]
)
def test_transfusion_of_the_spec_is_transfusion_of_the_config(name):
    cfg = shipped_configs()[name]
    spec = ModelSpec.from_config(cfg)
    of_spec = nnx.eval_shape(lambda: Transfusion(spec, nnx.Rngs(0)))
    of_config = nnx.eval_shape(lambda: Transfusion(cfg, nnx.Rngs(0)))
    assert param_tree(of_spec) == param_tree(of_config)
    assert nnx.graphdef(of_spec) == nnx.graphdef(of_config)
    assert of_config.spec == spec and of_spec.spec is spec
    assert parameter_counts(spec) == parameter_counts(cfg)
    assert model_flops_per_token(spec, 4096, parameter_counts(spec)) == model_flops_per_token(
        cfg, 4096, parameter_counts(cfg)
    )
    assert Diffusion.from_spec(spec.diffusion) == Diffusion.from_config(cfg)


def test_the_same_seed_gives_the_same_weights():
    cfg = tiny_config(patch__kind="unet", image__latent_size=8)
    of_spec = nnx.state(Transfusion(ModelSpec.from_config(cfg), nnx.Rngs(0)), nnx.Param)
    of_config = nnx.state(Transfusion(cfg, nnx.Rngs(0)), nnx.Param)
    for a, b in zip(jax.tree.leaves(of_spec), jax.tree.leaves(of_config), strict=True):
        np.testing.assert_array_equal(a, b)
