"""A trained diffusers `AutoencoderKL` (SD, SDXL, FLUX, SD3 VAEs...) as our `VAE`, without torch.

Reads a diffusers model directory: `config.json` for the architecture and latent normalisation,
and `diffusion_pytorch_model.safetensors` (numpy) for the weights. Every weight of our module
must come from the file and every tensor of the file must be used, so a layout we do not
understand fails loudly instead of decoding noise.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file

from transfusion_jax.paths import as_path, local_copy
from transfusion_jax.vae.autoencoder import VAE, AutoencoderKL, vae_config
from transfusion_jax.weight_files import mismatch_report

CONFIG = "config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHT_VARIANTS = ("diffusion_pytorch_model.fp16.safetensors",)
CLASS = "AutoencoderKL"

# Our module path component -> diffusers name component (None: depends on encoder/decoder).
_RENAME = {
    "levels": None,
    "resample": None,
    "mid": "mid_block",
    "attention": "attentions.0",
    "norm": "group_norm",  # only the attention has a plain `norm`
    "query": "to_q",
    "key": "to_k",
    "value": "to_v",
    "out": "to_out.0",
    "shortcut": "conv_shortcut",
    "norm_out": "conv_norm_out",
    "kernel": "weight",
    "scale": "weight",
}
_SIDE = {
    "encoder": {"levels": "down_blocks", "resample": "downsamplers.0.conv"},
    "decoder": {"levels": "up_blocks", "resample": "upsamplers.0.conv"},
}
# diffusers' legacy attention names (checkpoints saved before diffusers 0.14), as it renames them.
_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_RE = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")


def torch_name(path) -> str:
    """The diffusers state-dict key of the parameter at our module path (tuple of str / int)."""
    side = _SIDE.get(str(path[0]), {})
    parts = []
    for p in map(str, path):
        parts.append(side.get(p) or _RENAME.get(p) or p)
    return ".".join(parts)


def _current_name(key: str) -> str:
    return _LEGACY_RE.sub(lambda m: m.group(1) + _LEGACY[m.group(2)] + ".", key)


def _to_ours(tensor: np.ndarray, shape: tuple) -> np.ndarray | None:
    """A torch tensor in our layout for a parameter of `shape`, or None when it cannot be."""
    if len(shape) == 4 and tensor.ndim == 4:  # conv OIHW -> HWIO
        tensor = tensor.transpose(2, 3, 1, 0)
    elif len(shape) == 2:  # linear [out, in] (or a 1x1 conv [out, in, 1, 1]) -> [in, out]
        if tensor.ndim == 4 and tensor.shape[2:] == (1, 1):
            tensor = tensor[:, :, 0, 0]
        if tensor.ndim == 2:
            tensor = tensor.T
    return tensor if tensor.shape == tuple(shape) else None


def read_config(directory) -> dict:
    """Our vae_config overrides and the latent normalisation from a diffusers config.json."""
    directory = as_path(directory)
    path = directory / CONFIG
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory (expected a diffusers VAE)")
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory}: no {CONFIG}; expected a diffusers AutoencoderKL directory "
            f"({CONFIG} + {WEIGHTS}), e.g. from AutoencoderKL.save_pretrained or the vae/ "
            "folder of a pipeline"
        )
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    cls = raw.get("_class_name")
    if cls is None and not {"block_out_channels", "latent_channels"} <= raw.keys():
        raise ValueError(f"{path}: not an {CLASS} config (no block_out_channels/latent_channels)")
    if cls is not None and cls != CLASS:
        raise ValueError(
            f"{path}: a {cls} config, not {CLASS}; point at the directory of a KL autoencoder "
            "(for a pipeline, its vae/ folder)"
        )

    def expect(key, wanted, default):
        got = raw.get(key, default)
        ok = all(v == wanted for v in got) if isinstance(got, list) else got == wanted
        if not ok:
            raise ValueError(f"{path}: {key}={got!r} is not supported (only {wanted!r})")

    channels = tuple(int(c) for c in raw.get("block_out_channels", (64,)))
    expect("down_block_types", "DownEncoderBlock2D", ["DownEncoderBlock2D"])
    expect("up_block_types", "UpDecoderBlock2D", ["UpDecoderBlock2D"])
    expect("act_fn", "silu", "silu")
    for key in ("down_block_types", "up_block_types"):
        if key in raw and len(raw[key]) != len(channels):
            raise ValueError(f"{path}: {len(raw[key])} {key}, {len(channels)} block_out_channels")
    in_channels = int(raw.get("in_channels", 3))
    if int(raw.get("out_channels", in_channels)) != in_channels:
        raise ValueError(f"{path}: in_channels != out_channels is not supported")
    latent = int(raw.get("latent_channels", 4))
    overrides = dict(
        channels=channels,
        blocks=int(raw.get("layers_per_block", 1)),
        latent_channels=latent,
        in_channels=in_channels,
        norm_groups=int(raw.get("norm_num_groups", 32)),
        quant_conv=bool(raw.get("use_quant_conv", True)),
        post_quant_conv=bool(raw.get("use_post_quant_conv", True)),
        mid_attention=bool(raw.get("mid_block_add_attention", True)),
        scaling_factor=float(raw.get("scaling_factor", 0.18215)),
        shift_factor=float(raw.get("shift_factor") or 0.0),
    )
    # Per-channel statistics (e.g. Playground v2.5): z_norm = (z - mean) * scaling_factor / std.
    scale = np.full(latent, overrides["scaling_factor"], np.float32)
    shift = np.full(latent, overrides["shift_factor"], np.float32)
    if raw.get("latents_mean") is not None and raw.get("latents_std") is not None:
        mean, std = np.asarray(raw["latents_mean"], np.float32), np.asarray(raw["latents_std"])
        if mean.shape != (latent,) or std.shape != (latent,):
            raise ValueError(f"{path}: latents_mean/latents_std need {latent} values each")
        scale, shift = scale / std.astype(np.float32), mean
    return dict(overrides=overrides, scale=scale, shift=shift)


def _weights_file(directory: epath.Path) -> epath.Path:
    for name in (WEIGHTS, *WEIGHT_VARIANTS):
        if (directory / name).is_file():
            return directory / name
    hint = ""
    if (directory / "diffusion_pytorch_model.bin").is_file():
        hint = (
            "; it has diffusion_pytorch_model.bin: convert .bin to safetensors once with "
            "AutoencoderKL.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)"
        )
    raise FileNotFoundError(f"{directory}: no {WEIGHTS}{hint}")


def check_weights(directory) -> None:
    """Raises (naming the file) unless the directory's safetensors file is there and its header
    parses: a quick check before a run starts, without reading the tensors."""
    file = _weights_file(as_path(directory))
    try:
        with local_copy(file) as local, safe_open(str(local), "np") as f:
            f.keys()
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from e


def _fill(abstract_params: dict, tensors: dict, file: epath.Path) -> dict:
    """Our params tree (numpy, our layouts) from the file's tensors, or a ValueError listing what
    is missing, unused or misshapen."""
    by_name, duplicates = {}, []
    for key, value in tensors.items():
        name = _current_name(key)
        if name in by_name:
            duplicates.append(key)
        by_name[name] = (key, value)
    used, missing, misshapen = set(), [], []

    def load(path, leaf):
        names = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
        name = torch_name(names)
        if name not in by_name:
            missing.append(f"{name} {_torch_shape(leaf.shape)}")
            return None
        key, value = by_name[name]
        used.add(name)
        ours = _to_ours(value, leaf.shape)
        if ours is None:
            misshapen.append(f"{key} {tuple(value.shape)}, expected {_torch_shape(leaf.shape)}")
            return None
        return ours

    filled = jax.tree_util.tree_map_with_path(load, abstract_params)
    unexpected = [f"{k} {tuple(v.shape)}" for n, (k, v) in by_name.items() if n not in used]
    problems = mismatch_report(
        {
            "missing": missing,
            "unexpected": unexpected,
            "misshapen": misshapen,
            "duplicate (legacy and current names)": duplicates,
        }
    )
    if problems:
        raise ValueError(
            f"{file}: the tensors do not match the architecture in its {CONFIG} ({problems}); "
            f"is the config from the same checkpoint?"
        )
    return filled


def _torch_shape(shape) -> tuple:
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(reversed(shape))


def load_diffusers(directory, *, dtype: str = "float32", param_dtype: str = "float32") -> VAE:
    """The diffusers AutoencoderKL saved in `directory` as a `VAE` (weights on the default device).

    `dtype`/`param_dtype` choose computation and storage precision (the file's dtype is cast).
    """
    directory = as_path(directory)
    found = read_config(directory)
    cfg = vae_config(**found["overrides"], dtype=dtype, param_dtype=param_dtype)
    file = _weights_file(directory)
    try:
        with local_copy(file) as local:
            tensors = load_file(str(local))
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from e

    abstract = nnx.eval_shape(lambda: AutoencoderKL(cfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shapes = nnx.to_pure_dict(state)
    filled = _fill(shapes, tensors, file)
    arrays = jax.tree.map(lambda a, s: jnp.asarray(a, dtype=s.dtype), filled, shapes)
    nnx.replace_by_pure_dict(state, arrays)
    return VAE(nnx.merge(graphdef, state), cfg, found["scale"], found["shift"])
