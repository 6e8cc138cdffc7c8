"""Configs free of ablation confounds: image slots derived from the row and the patch count (rows
fill at every patch size), a U-Net of one size at every patch size, and the paper's data recipe
and guidance scales stated where they are used."""

import inspect
import math

import jax
import numpy as np
import pytest
from flax import nnx

from tests.helpers import ROOT, tiny_config
from transfusion_jax.config import (
    CFG_SCALE_ABLATION,
    CFG_SCALE_CHAMELEON_COMPARISON,
    base_config,
    data_recipe_warnings,
    load_config,
    matched_unet_channels,
    resolve_model,
    unet_parameter_count,
)
from transfusion_jax.data import make_source
from transfusion_jax.model import parameter_counts
from transfusion_jax.model_config import ModelSpec
from transfusion_jax.unet import UNetPatching

PAPER = str(ROOT / "configs" / "paper.py")
PAPER_UNET = 0.27e9  # the paper's U-Net, "~0.27B at every size"


# -- image.max_images = 0: derived --------------------------------------------------------------


def shapes_config(patch_size: int, max_images: int):
    """Tiny's model on 16 px shapes, rows of 1536 positions (5 images of 256 patches at 1x1)."""
    cfg = load_config(str(ROOT / "configs" / "tiny.py"))
    cfg.data.update(source="shapes", image_size=16, seq_len=1536, pack_window=256, num_threads=2)
    cfg.image.update(patch_size=patch_size, max_images=max_images)
    return cfg


def row_fill(cfg, batches: int = 4, rows: int = 8) -> float:
    """Share of the positions of `batches` x `rows` packed rows that hold a document."""
    source = make_source(cfg, rows)
    return float(np.mean([(next(source).segment_ids > 0).mean() for _ in range(batches)]))


def test_max_images_zero_is_the_most_image_documents_a_row_holds():
    paper = resolve_model(load_config(f"{PAPER}:0.76b"))  # 32x32 latents in 2x2 patches
    assert paper.image.max_images == 4096 // (256 + 4) == 15
    for k, slots in ((1, 3), (4, 60), (8, 204)):
        resolved = resolve_model(load_config(f"{PAPER}:0.76b,p{k}"))
        assert resolved.image.max_images == slots == 4096 // ((32 // k) ** 2 + 4)
    assert base_config().image.max_images == 0
    assert load_config(f"{PAPER}:0.16b").image.max_images == 0  # derived where resolved
    # The configs whose trained results were measured with 2 slots keep them.
    assert load_config("tiny").image.max_images == load_config("quickstart").image.max_images == 2
    text_only = tiny_config(image__max_images=0, data__source="text")
    assert resolve_model(text_only).image.max_images == 1  # no images: one (masked) slot
    # The ModelSpec (what the model's modules see) is the resolved number, too.
    assert ModelSpec.from_config(load_config(f"{PAPER}:0.16b")).image.max_images == 15


def test_derived_max_images_fills_rows_at_every_patch_size():
    fills = {}
    for k in (1, 2, 4):  # 256, 64 and 16 positions per 16 px image
        cfg = shapes_config(k, max_images=0)
        fills[k] = (resolve_model(cfg).image.max_images, row_fill(cfg))
    # The old fixed setting scaled down: 8 slots per 4096 positions are 3 per 1536.
    fixed = row_fill(shapes_config(4, max_images=3))
    print(
        f"fill with derived max_images (slots, fill) by patch size: {fills}; fixed 3 at 4x4: "
        f"{fixed:.3f}"
    )
    for k, (_, fill) in fills.items():
        assert fill >= 0.9, (k, fills)
    assert fixed < 0.5 and fixed < fills[4][1] - 0.4, (fixed, fills)


# -- a U-Net of one size at every patch size ----------------------------------------------------


def patch_parameters(cfg) -> int:
    """The patch layers' parameters, counted on the abstract module (nothing is allocated)."""
    spec = ModelSpec.from_config(cfg)
    abstract = nnx.eval_shape(lambda: UNetPatching(spec, nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def count_of(cfg) -> int:
    """`unet_parameter_count` of a config's U-Net."""
    r = resolve_model(cfg)
    levels = int(math.log2(r.image.patch_size)) + 1
    return unet_parameter_count(
        tuple(r.patch.unet_channels[:levels]),
        blocks=r.patch.unet_blocks,
        latent_size=r.image.latent_size,
        latent_channels=r.image.latent_channels,
        attention_resolution=r.patch.unet_attention_resolution,
        time_embed_dim=r.patch.time_embed_dim,
        d_model=r.model.d_model,
    )


@pytest.mark.parametrize(
    "spec", ["paper:0.16b,unet,p1", "paper:7b,unet,p8", "paper:0.76b,unet,p4", "tiny"]
)
def test_unet_parameter_count_is_the_modules(spec):
    cfg = load_config(spec)
    assert count_of(cfg) == patch_parameters(cfg) == parameter_counts(cfg)["patch"]


def test_paper_unet_has_about_the_papers_size_at_every_patch_size():
    from configs.paper import SIZES, UNET_CHANNELS

    counts = {}
    for k in (1, 2, 4, 8):
        cfg = load_config(f"{PAPER}:0.76b,unet,p{k}")
        assert cfg.image.patch_size == k and cfg.patch.kind == "unet"
        counts[k] = patch_parameters(cfg)
    print("paper:0.76b U-Net parameters by patch size:", counts)
    for k, n in counts.items():
        assert abs(n / PAPER_UNET - 1) < 0.1, (k, counts)
    assert max(counts.values()) / min(counts.values()) < 1.1, counts
    # The table is the rule's, at every model size.
    for size in SIZES:
        cfg = load_config(f"{PAPER}:{size},unet")
        for k, widths in UNET_CHANNELS.items():
            assert matched_unet_channels(cfg, k) == widths, (size, k)
            assert abs(count_of(load_config(f"{PAPER}:{size},unet,p{k}")) / PAPER_UNET - 1) < 0.1


@pytest.mark.parametrize("reference", [2, 4])
def test_tiny_unet_widths_keep_its_size_at_every_patch_size(reference):
    """The ablation scale: tiny's U-Net on 16 px images at 1x1, 2x2 and 4x4 patches."""
    base = shapes_config(reference, max_images=0)
    counts = {}
    for k in (1, 2, 4):
        cfg = shapes_config(k, max_images=0)
        cfg.patch.unet_channels = matched_unet_channels(base, k, reference, multiple=8)
        counts[k] = (tuple(cfg.patch.unet_channels), patch_parameters(cfg))
    print(
        f"tiny U-Net (widths, parameters) by patch size, matched to {reference}x{reference}:",
        counts,
    )
    target = counts[reference][1]
    for k, (_, n) in counts.items():
        assert abs(n / target - 1) < 0.1, (k, counts)


def test_unmatched_unet_grows_with_the_patch_size():
    """Why the table exists: the base widths add a level, and parameters, per patch doubling."""
    cfg = load_config(f"{PAPER}:0.76b,unet")
    cfg.patch.unet_channels = base_config().patch.unet_channels
    cfg.image.patch_size = 8
    assert count_of(cfg) > 2.5 * PAPER_UNET


def test_the_paper_config_argument():
    plain, unet = load_config(f"{PAPER}:0.76b"), load_config(f"{PAPER}:0.76b,unet")
    assert (plain.patch.kind, plain.image.patch_size) == ("linear", 2)
    assert (unet.patch.kind, unet.image.patch_size) == ("unet", 2)
    assert tuple(unet.patch.unet_channels) == (640, 1280)
    p8 = load_config(f"{PAPER}:0.16b,p8")  # linear 8x8: the U-Net widths follow for kind=unet
    assert (p8.patch.kind, p8.image.patch_size, len(p8.patch.unet_channels)) == ("linear", 8, 4)
    assert load_config(f"{PAPER}:7b,p4,unet").image.patch_size == 4  # any order
    with pytest.raises(ValueError, match="'p3' in '0.76b,unet,p3' is not a patch kind"):
        load_config(f"{PAPER}:0.76b,unet,p3")
    unet.image.patch_size = 4  # a patch size given past the argument: the widths do not follow
    with pytest.raises(ValueError, match="patch.unet_channels: .* paper:0.76b,unet,p4"):
        resolve_model(unet)


# -- the paper's data recipe and guidance -------------------------------------------------------


def test_paper_configs_warn_about_missing_paper_data():
    cfg = load_config(f"{PAPER}:0.76b")
    cfg.data.update(source="imagefolder", path="/data/coco")
    warnings = data_recipe_warnings(cfg)
    assert len(warnings) == 2
    assert warnings[0].startswith("data.text_path is not set") and (
        "--config.data.text_path=" in warnings[0]
    )
    assert warnings[1].startswith("data.tokenizer is 'bytes'") and (
        "--config.data.tokenizer=sentencepiece:" in warnings[1]
    )
    cfg.model.vocab_size = 384  # bytes with a vocabulary of their size: a choice, not a slip
    assert len(data_recipe_warnings(cfg)) == 1
    cfg.data.update(text_path="/data/text", tokenizer="sentencepiece:/llama/tokenizer.model")
    assert data_recipe_warnings(cfg) == []
    assert cfg.data.text_ratio == 1.0  # the 1:1 mix, on with the corpus
    # Configs that are not the paper's recipe, and the synthetic benchmark data, say nothing.
    assert data_recipe_warnings(load_config("tiny")) == []
    synthetic = load_config(f"{PAPER}:0.16b")
    synthetic.data.source = "synthetic"
    assert data_recipe_warnings(synthetic) == []


def test_the_trainer_prints_the_recipe_warnings_once_at_start(capsys):
    from transfusion_jax import sharding as shd
    from transfusion_jax.train import TransfusionTask

    cfg = tiny_config(data__source="shapes", data__image_size=16, data__recipe="paper")
    cfg.model.vocab_size = 32_128  # the paper's vocabulary, with the default byte tokenizer
    cfg.image.update(latent_size=0, latent_channels=0)
    cfg = TransfusionTask.resolve(cfg)
    TransfusionTask(cfg, shd.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("warning: data.text_path is not set") for line in lines) == 1
    assert sum(line.startswith("warning: data.tokenizer is 'bytes'") for line in lines) == 1
    cfg.data.recipe = ""
    TransfusionTask(cfg, shd.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    assert "data.text_path" not in capsys.readouterr().out


def test_guidance_defaults_are_the_ablation_scale(capsys):
    from transfusion_jax import sample
    from transfusion_jax.inference import Pipeline

    assert (CFG_SCALE_ABLATION, CFG_SCALE_CHAMELEON_COMPARISON) == (3.0, 5.0)
    assert base_config().eval.cfg_scale == CFG_SCALE_ABLATION
    for method in (Pipeline.text_to_image, Pipeline.generate):
        assert inspect.signature(method).parameters["cfg_scale"].default == CFG_SCALE_ABLATION
    with pytest.raises(SystemExit):
        sample.main(["--help"])
    assert "5 against Chameleon) (default: 3.0)" in " ".join(capsys.readouterr().out.split())
