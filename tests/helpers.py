"""Shared test fixtures: the tiny config and random packed layouts."""

import os
import pathlib

import numpy as np

from transfusion_jax.batch import Image, SpecialTokens, build_batch, document_length
from transfusion_jax.config import load_config, resolve_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPECIAL = SpecialTokens()
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def command_env(devices: int = 1, **extra) -> dict:
    """The environment of a command a test starts: the CPU, and the session's environment (its
    compile settings, tests/conftest.py) with `devices` simulated devices instead of its 8."""
    flags = [
        f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)
    ]
    if devices > 1:
        flags.append(f"{DEVICE_COUNT_FLAG}={devices}")
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags), **extra)


def tiny_config(**overrides):
    """configs/tiny.py with `section.key=value` overrides given as section__key=value."""
    cfg = load_config(str(ROOT / "configs" / "tiny.py"))
    # The geometry the model tests are written for, whatever configs/tiny.py trains on.
    cfg.image.update(latent_size=16, latent_channels=4, patch_size=2, max_images=2)
    cfg.data.update(source="synthetic", seq_len=256)
    cfg.patch.kind = "linear"
    for name, value in overrides.items():
        section, key = name.split("__")
        cfg[section][key] = value
    return cfg


def tiny_shapes_config(**train_overrides):
    """configs/tiny.py (its U-Net, on the shapes data) shrunk to train in seconds: 16 px images in
    4x4 patches, width 64, depth 2, 6 steps with EMA weights; small evaluation sizes."""
    cfg = load_config(str(ROOT / "configs" / "tiny.py"))
    cfg.model.update(d_model=64, depth=2)
    cfg.image.update(latent_size=16, patch_size=4)
    cfg.data.update(image_size=16, seq_len=128, pack_window=16)
    cfg.train.update(num_steps=6, log_every=2, checkpoint_every=6, eval_every=0, ema_decay=0.9)
    cfg.train.update(**train_overrides)
    cfg.eval.update(num_examples=4, batch_size=4, sampling_steps=2)
    cfg.mesh.fsdp = -1
    return cfg


def small_eval_config(**eval_overrides):
    """configs/tiny.py (shapes) at 16 px in 4x4 linear patches, width 64 and depth 2, resolved:
    a model the evaluation tests build in a second; `eval_overrides` go to the eval section."""
    cfg = load_config(str(ROOT / "configs" / "tiny.py"))
    cfg.model.update(d_model=64, depth=2, num_heads=2)
    cfg.data.update(image_size=16, seq_len=96)
    cfg.image.update(patch_size=4)
    cfg.patch.kind = "linear"
    cfg.eval.update(eval_overrides)
    return resolve_model(cfg)


def latent(rng, cfg):
    s, c = cfg.image.latent_size, cfg.image.latent_channels
    return rng.normal(size=(s, s, c)).astype(np.float32)


def random_document(rng, cfg, images_left, vocab=300):
    """1 to 3 parts: text runs of 1-6 tokens and, while slots remain, images."""
    parts = []
    for _ in range(rng.integers(1, 4)):
        if images_left > 0 and rng.random() < 0.5:
            parts.append(Image(latent(rng, cfg), noise_limited=bool(rng.random() < 0.3)))
            images_left -= 1
        else:
            parts.append(list(rng.integers(5, vocab, size=rng.integers(1, 7))))
    return parts


def random_batch(rng, cfg, batch_size, seq_len):
    """Rows packed with random documents until the next one does not fit; the rest is padding."""
    k, m = cfg.image.patch_size, cfg.image.max_images
    num_patches = (cfg.image.latent_size // k) ** 2
    rows = []
    for _ in range(batch_size):
        row, used, images = [], 0, 0
        while True:
            doc = random_document(rng, cfg, m - images)
            length = document_length(doc, num_patches)
            if used + length > seq_len - int(rng.integers(0, 4)):
                break
            row.append(doc)
            used += length
            images += sum(isinstance(p, Image) for p in doc)
        rows.append(row)
    s, c = cfg.image.latent_size, cfg.image.latent_channels
    return build_batch(rows, seq_len, m, (s, s, c), k, SPECIAL)


def flat_attention_layout(path, x):
    """A state leaf as earlier versions saved it: q/k/v/o kernels as flat [embed, heads * dim]
    (o: [heads * dim, embed]) matrices; use with `jax.tree_util.tree_map_with_path`."""
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    if "attn" not in names or names[-1] != "kernel":
        return x
    if names[-2] == "o":  # [layers, heads, head_dim, embed]
        return x.reshape(x.shape[0], -1, x.shape[-1])
    return x.reshape(*x.shape[:2], -1)  # [layers, embed, heads, head_dim]


_TORCHVISION_OPS = []  # keeps the op-schema Library alive for the whole session


def importable_torchvision(torch):
    """torchvision (None if not installed), importable beside this CPU torch build.

    torchvision's compiled ops do not load beside some torch builds (PyPI's CUDA wheel beside
    torch+cpu); its import then fails while registering fake kernels for torchvision::nms / qnms,
    whose schemas only the compiled library would declare. Declaring the two schemas lets the
    pure-Python part (the Inception of pytorch-fid, transformers' image processors) import.
    """
    try:
        import torchvision
    except ImportError:
        return None
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_OPS.append(lib)
        import torchvision
    return torchvision
