"""CLIP (HF `CLIPModel`) in Flax NNX, and the CLIP score of image-caption pairs.

No weights ship with the project and none are downloaded: `--clip_weights` names a Hugging Face CLIP
directory the user downloaded (`openai/clip-vit-large-patch14`, `openai/clip-vit-base-patch32`,
...): `config.json` for the architecture, `model.safetensors` (read with numpy) for the weights,
`vocab.json` + `merges.txt` for the tokenizer and, when present, `preprocessor_config.json` for the
image preprocessing. The modules are named as HF's so a parameter's path is its state-dict key;
every parameter must come from the file and every tensor of the file must be used, so a layout we
do not understand fails loudly instead of scoring with random weights. tests/test_clip.py checks
the features against transformers.

CLIP score, as torchmetrics documents it: 100 * max(cos(image, caption), 0) per pair, averaged.
(torchmetrics' code clamps the mean instead of each pair; the two differ only when some pair's
cosine is negative, which trained CLIPs practically never give.)
"""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from PIL import Image
from safetensors.numpy import load_file

from transfusion_jax import paths
from transfusion_jax.evaluation.clip_tokenizer import MERGES, VOCAB, CLIPTokenizer
from transfusion_jax.layers import to_dtype
from transfusion_jax.weight_files import mismatch_report

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # sharded checkpoints (e.g. the largest LAION ones)
PREPROCESSOR = "preprocessor_config.json"
FLAG = "--clip_weights"
# Non-persistent buffers that older transformers versions saved; not weights.
BUFFERS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# HF's pre-PR-24773 text configs say eos_token_id=2 and pool at the argmax of the ids instead.
LEGACY_EOS = 2
_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class TowerConfig:
    """One transformer tower (text or vision), HF CLIPTextConfig / CLIPVisionConfig fields."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    text: TowerConfig
    vision: TowerConfig
    vocab_size: int = 49408
    context_length: int = 77  # text max_position_embeddings
    eos_token_id: int = 49407
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    projection_dim: int = 512


def missing_weights_error(path) -> FileNotFoundError:
    """The error for a --clip_weights that is not a usable CLIP directory: says what to fetch."""
    return FileNotFoundError(
        f"{FLAG} {path}: expected a Hugging Face CLIP directory such as "
        "openai/clip-vit-large-patch14 or openai/clip-vit-base-patch32 (config.json, "
        f"{WEIGHTS}, {VOCAB}, {MERGES}); nothing is downloaded here, so download it first, e.g. "
        "`hf download openai/clip-vit-large-patch14 config.json model.safetensors vocab.json "
        "merges.txt preprocessor_config.json --local-dir DIR`, and pass DIR"
    )


def read_config(directory) -> CLIPConfig:
    """Our CLIPConfig from an HF CLIP config.json (absent fields take HF's defaults)."""
    path = paths.as_path(directory) / CONFIG
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if raw.get("model_type", "clip") != "clip":
        raise ValueError(f"{path}: model_type={raw['model_type']!r}, expected a CLIPModel's 'clip'")
    text = raw.get("text_config") or raw.get("text_config_dict") or {}
    vision = raw.get("vision_config") or raw.get("vision_config_dict") or {}

    def tower(sub, hidden, inter, heads, layers):
        act = sub.get("hidden_act", "quick_gelu")
        if act not in _ACTIVATIONS:
            raise ValueError(
                f"{path}: hidden_act={act!r} is not supported ({sorted(_ACTIVATIONS)})"
            )
        return TowerConfig(
            hidden_size=int(sub.get("hidden_size", hidden)),
            intermediate_size=int(sub.get("intermediate_size", inter)),
            num_attention_heads=int(sub.get("num_attention_heads", heads)),
            num_hidden_layers=int(sub.get("num_hidden_layers", layers)),
            hidden_act=act,
            layer_norm_eps=float(sub.get("layer_norm_eps", 1e-5)),
        )

    cfg = CLIPConfig(
        text=tower(text, 512, 2048, 8, 12),
        vision=tower(vision, 768, 3072, 12, 12),
        vocab_size=int(text.get("vocab_size", 49408)),
        context_length=int(text.get("max_position_embeddings", 77)),
        eos_token_id=_one_id(text.get("eos_token_id", 49407), path),
        image_size=int(vision.get("image_size", 224)),
        patch_size=int(vision.get("patch_size", 32)),
        num_channels=int(vision.get("num_channels", 3)),
        projection_dim=int(raw.get("projection_dim", 512)),
    )
    for name, t in (("text_config", cfg.text), ("vision_config", cfg.vision)):
        if t.hidden_size % t.num_attention_heads:
            raise ValueError(f"{path}: {name} hidden_size is not a multiple of the heads")
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"{path}: image_size {cfg.image_size} % patch_size {cfg.patch_size} != 0")
    return cfg


def _one_id(value, path) -> int:
    """HF allows a list of eos ids; CLIP's pooling needs exactly one."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, int):
        raise ValueError(f"{path}: text_config eos_token_id={value!r}, expected one id")
    return value


# --- the model ---------------------------------------------------------------------------------


def _linear(rngs, d_in, d_out, dt, bias=True):
    return nnx.Linear(d_in, d_out, use_bias=bias, rngs=rngs, **dt)


def _layer_norm(rngs, d, eps, dt):
    """torch.nn.LayerNorm: two-pass biased variance, as torch computes it."""
    return nnx.LayerNorm(d, epsilon=eps, use_fast_variance=False, rngs=rngs, **dt)


class Attention(nnx.Module):
    """Multi-head self-attention with biased q/k/v/out projections; softmax in float32."""

    def __init__(self, cfg: TowerConfig, *, dt, rngs):
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj, self.k_proj = _linear(rngs, d, d, dt), _linear(rngs, d, d, dt)
        self.v_proj, self.out_proj = _linear(rngs, d, d, dt), _linear(rngs, d, d, dt)

    def __call__(self, x, causal: bool):
        n, length, d = x.shape
        split = lambda t: t.reshape(n, length, self.heads, d // self.heads)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        logits = jnp.einsum("nqhc,nkhc->nhqk", q, k, preferred_element_type=jnp.float32)
        logits = logits / math.sqrt(d // self.heads)
        if causal:
            mask = jnp.tril(jnp.ones((length, length), bool))
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return self.out_proj(jnp.einsum("nhqk,nkhc->nqhc", weights, v).reshape(n, length, d))


class MLP(nnx.Module):
    def __init__(self, cfg: TowerConfig, *, dt, rngs):
        self.fc1 = _linear(rngs, cfg.hidden_size, cfg.intermediate_size, dt)
        self.fc2 = _linear(rngs, cfg.intermediate_size, cfg.hidden_size, dt)
        self.act = cfg.hidden_act

    def __call__(self, x):
        return self.fc2(_ACTIVATIONS[self.act](self.fc1(x)))


class EncoderLayer(nnx.Module):
    """Pre-norm block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: TowerConfig, *, dt, rngs):
        self.layer_norm1 = _layer_norm(rngs, cfg.hidden_size, cfg.layer_norm_eps, dt)
        self.self_attn = Attention(cfg, dt=dt, rngs=rngs)
        self.layer_norm2 = _layer_norm(rngs, cfg.hidden_size, cfg.layer_norm_eps, dt)
        self.mlp = MLP(cfg, dt=dt, rngs=rngs)

    def __call__(self, x, causal: bool):
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nnx.Module):
    def __init__(self, cfg: TowerConfig, *, dt, rngs):
        self.layers = nnx.List(
            [EncoderLayer(cfg, dt=dt, rngs=rngs) for _ in range(cfg.num_hidden_layers)]
        )

    def __call__(self, x, causal: bool):
        for layer in self.layers:
            x = layer(x, causal)
        return x


class TextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPConfig, *, dt, rngs):
        d = cfg.text.hidden_size
        self.token_embedding = nnx.Embed(cfg.vocab_size, d, rngs=rngs, **dt)
        self.position_embedding = nnx.Embed(cfg.context_length, d, rngs=rngs, **dt)

    def __call__(self, ids):
        tokens = self.token_embedding(ids)
        return tokens + self.position_embedding.embedding[: ids.shape[1]].astype(tokens.dtype)


class TextTransformer(nnx.Module):
    """Causal text tower; the output is the final-normed state at the end-of-text token."""

    def __init__(self, cfg: CLIPConfig, *, dt, rngs):
        self.embeddings = TextEmbeddings(cfg, dt=dt, rngs=rngs)
        self.encoder = Encoder(cfg.text, dt=dt, rngs=rngs)
        self.final_layer_norm = _layer_norm(rngs, cfg.text.hidden_size, cfg.text.layer_norm_eps, dt)
        self.eos_token_id = cfg.eos_token_id

    def __call__(self, ids):
        h = self.final_layer_norm(self.encoder(self.embeddings(ids), causal=True))
        return h[jnp.arange(ids.shape[0]), pool_positions(ids, self.eos_token_id)]


def pool_positions(ids, eos_token_id: int):
    """The position HF's CLIPTextModel pools at: the first eos_token_id, or with a legacy config
    (eos_token_id == 2) the argmax of the ids (the first end-of-text, the vocabulary's largest)."""
    if eos_token_id == LEGACY_EOS:
        return jnp.argmax(ids, axis=-1)
    return jnp.argmax(ids == eos_token_id, axis=-1)


class VisionEmbeddings(nnx.Module):
    """Bias-free patch conv, a learned class token in front, learned position embeddings."""

    def __init__(self, cfg: CLIPConfig, *, dt, rngs):
        d, p = cfg.vision.hidden_size, cfg.patch_size
        self.class_embedding = nnx.Param(jnp.zeros((d,), dt["param_dtype"]))
        self.patch_embedding = nnx.Conv(
            cfg.num_channels, d, (p, p), strides=(p, p), padding="VALID", use_bias=False,
            rngs=rngs, **dt,
        )  # fmt: skip
        positions = (cfg.image_size // p) ** 2 + 1
        self.position_embedding = nnx.Embed(positions, d, rngs=rngs, **dt)

    def __call__(self, pixels):
        patches = self.patch_embedding(pixels)  # [N, H/p, W/p, d], row-major like torch's flatten
        n, d = patches.shape[0], patches.shape[-1]
        cls = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype), (n, 1, d))
        tokens = jnp.concatenate([cls, patches.reshape(n, -1, d)], axis=1)
        return tokens + self.position_embedding.embedding[...].astype(tokens.dtype)


class VisionTransformer(nnx.Module):
    """ViT with pre-layernorm (HF's `pre_layrnorm`, sic); the output is the normed class token."""

    def __init__(self, cfg: CLIPConfig, *, dt, rngs):
        d, eps = cfg.vision.hidden_size, cfg.vision.layer_norm_eps
        self.embeddings = VisionEmbeddings(cfg, dt=dt, rngs=rngs)
        self.pre_layrnorm = _layer_norm(rngs, d, eps, dt)
        self.encoder = Encoder(cfg.vision, dt=dt, rngs=rngs)
        self.post_layernorm = _layer_norm(rngs, d, eps, dt)

    def __call__(self, pixels):
        h = self.encoder(self.pre_layrnorm(self.embeddings(pixels)), causal=False)
        return self.post_layernorm(h[:, 0])


class CLIP(nnx.Module):
    """Pixels [N, S, S, 3] (preprocessed) and ids [N, L] -> projections [N, projection_dim]."""

    def __init__(self, cfg: CLIPConfig, rngs: nnx.Rngs, *, dtype="float32", param_dtype="float32"):
        dt = dict(dtype=to_dtype(dtype), param_dtype=to_dtype(param_dtype))
        self.text_model = TextTransformer(cfg, dt=dt, rngs=rngs)
        self.vision_model = VisionTransformer(cfg, dt=dt, rngs=rngs)
        p = cfg.projection_dim
        self.visual_projection = _linear(rngs, cfg.vision.hidden_size, p, dt, bias=False)
        self.text_projection = _linear(rngs, cfg.text.hidden_size, p, dt, bias=False)
        self.logit_scale = nnx.Param(jnp.zeros((), dt["param_dtype"]))

    def image_embeds(self, pixels):
        """HF get_image_features: the projected class token, float32, not normalised."""
        return self.visual_projection(self.vision_model(pixels)).astype(jnp.float32)

    def text_embeds(self, ids):
        """HF get_text_features: the projected end-of-text state, float32, not normalised."""
        return self.text_projection(self.text_model(ids)).astype(jnp.float32)


def _unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@nnx.jit
def _image_features(model, pixels):
    return _unit(model.image_embeds(pixels))


@nnx.jit
def _text_features(model, ids):
    return _unit(model.text_embeds(ids))


# --- weights -----------------------------------------------------------------------------------

_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def torch_name(path) -> str:
    """The HF state-dict key of the parameter at our module path (tuple of str / int)."""
    names = [str(p) for p in path]
    return ".".join([*names[:-1], _LEAF.get(names[-1], names[-1])])


def _to_ours(path, tensor: np.ndarray, shape: tuple) -> np.ndarray | None:
    """A torch tensor in our layout (linear [out, in] -> [in, out], conv OIHW -> HWIO), or None
    when its shape cannot be the parameter's."""
    if str(path[-1]) == "kernel":
        if tensor.ndim == 2:
            tensor = tensor.T
        elif tensor.ndim == 4:
            tensor = tensor.transpose(2, 3, 1, 0)
    return tensor if tuple(tensor.shape) == tuple(shape) else None


def _torch_shape(path, shape) -> tuple:
    if str(path[-1]) != "kernel":
        return tuple(shape)
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else tuple(reversed(shape))


def _read_tensors(directory: epath.Path) -> tuple[dict, str]:
    """All tensors of the directory's safetensors weights (one file or an index of shards)."""
    index = directory / WEIGHTS_INDEX
    if (directory / WEIGHTS).is_file():
        files = [directory / WEIGHTS]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index ({e})") from e
        files = [directory / name for name in sorted(set(weight_map.values()))]
    else:
        raise missing_weights_error(directory)
    tensors = {}
    for file in files:
        try:
            with paths.local_copy(file) as copy:  # safetensors reads only a local file name
                tensors.update(load_file(str(copy)))
        except FileNotFoundError:
            raise
        except Exception as e:  # safetensors raises its own error types for a damaged file
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from e
    return tensors, ", ".join(str(f) for f in files)


def _fill(abstract_params: dict, tensors: dict, where: str) -> dict:
    """Our params tree (numpy, our layouts) from the file's tensors, or a ValueError naming every
    missing, misshapen or unexpected key and the file."""
    used, missing, misshapen = set(), [], []

    def load(path, leaf):
        names = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
        name = torch_name(names)
        if name not in tensors:
            missing.append(f"{name} {_torch_shape(names, leaf.shape)}")
            return None
        used.add(name)
        ours = _to_ours(names, np.asarray(tensors[name]), leaf.shape)
        if ours is None:
            expected = _torch_shape(names, leaf.shape)
            misshapen.append(f"{name} {tuple(tensors[name].shape)}, expected {expected}")
        return ours

    filled = jax.tree_util.tree_map_with_path(load, abstract_params)
    unexpected = [
        f"{k} {tuple(v.shape)}" for k, v in tensors.items() if k not in used and k not in BUFFERS
    ]
    problems = mismatch_report(
        {"missing": missing, "misshapen": misshapen, "unexpected": unexpected}
    )
    if problems:
        raise ValueError(
            f"{where}: the tensors do not match a CLIPModel with the architecture in its {CONFIG} "
            f"({problems})"
        )
    return filled


def load_model(directory, *, dtype: str = "float32") -> tuple[CLIP, CLIPConfig]:
    """The CLIPModel saved in an HF directory as our `CLIP` (parameters stored in float32)."""
    directory = paths.as_path(directory)
    cfg = read_config(directory)
    tensors, where = _read_tensors(directory)
    abstract = nnx.eval_shape(lambda: CLIP(cfg, nnx.Rngs(0), dtype=dtype))
    graphdef, state = nnx.split(abstract)
    shapes = nnx.to_pure_dict(state)
    filled = _fill(shapes, tensors, where)
    arrays = jax.tree.map(lambda a, s: jnp.asarray(a, dtype=s.dtype), filled, shapes)
    nnx.replace_by_pure_dict(state, arrays)
    return nnx.merge(graphdef, state), cfg


# --- preprocessing -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """CLIPImageProcessor's steps for the standard configs, in PIL + numpy.

    Resizing uses PIL (bicubic by default), which is what HF's PIL backend calls and what OpenAI's
    CLIP used; HF's default torchvision backend resizes with torch's antialiased bicubic, which can
    differ by one level in 255 at some pixels.
    """

    shortest_edge: int | None = 224  # resize so the short side is this (aspect kept) ...
    resize_to: tuple[int, int] | None = None  # ... or to exactly (height, width)
    crop: tuple[int, int] | None = (224, 224)  # center crop (height, width); None: no crop
    resample: int = int(Image.Resampling.BICUBIC)
    rescale: float | None = 1 / 255
    mean: tuple[float, ...] | None = CLIP_MEAN  # None: no normalisation
    std: tuple[float, ...] = CLIP_STD

    def __call__(self, images) -> np.ndarray:
        """float32 pixels [N, h, w, 3] from uint8 [N, H, W, 3], one [H, W, 3], a PIL image or a
        list of either (any sizes)."""
        if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim == 3):
            images = [images]
        return np.stack([self.one(image) for image in images])

    def one(self, image) -> np.ndarray:
        if not isinstance(image, Image.Image):
            array = np.asarray(image)
            if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
                raise ValueError(
                    f"expected uint8 [H, W, 3] images or PIL images, got {array.dtype} "
                    f"{array.shape}"
                )
            image = Image.fromarray(array)
        image = image.convert("RGB")
        if self.resize_to is not None:
            image = image.resize(self.resize_to[::-1], resample=self.resample)
        elif self.shortest_edge is not None:
            w, h = image.size
            short, long = min(w, h), max(w, h)
            size = (self.shortest_edge, int(self.shortest_edge * long / short))
            image = image.resize(size if w <= h else size[::-1], resample=self.resample)
        x = np.asarray(image)
        if self.crop is not None:
            (ch, cw), (h, w) = self.crop, x.shape[:2]
            if ch > h or cw > w:
                raise ValueError(f"center crop {self.crop} is larger than the resized {(h, w)}")
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[top : top + ch, left : left + cw]
        x = x.astype(np.float32) if self.rescale is None else x.astype(np.float64) * self.rescale
        x = x.astype(np.float32)
        if self.mean is not None:
            x = (x - np.float32(self.mean)) / np.float32(self.std)
        return x


def _hw(value, what, path) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, dict) and {"height", "width"} <= value.keys():
        return (int(value["height"]), int(value["width"]))
    raise ValueError(f"{path}: {what}={value!r} is not supported (an int or height/width)")


def read_preprocess(directory, image_size: int) -> Preprocess:
    """The directory's preprocessor_config.json as a Preprocess; CLIP's defaults without one."""
    path = paths.as_path(directory) / PREPROCESSOR
    if not path.is_file():
        return Preprocess(shortest_edge=image_size, crop=(image_size, image_size))
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    shortest, resize_to, crop = None, None, None
    if raw.get("do_resize", True):
        size = raw.get("size", {"shortest_edge": image_size})
        if isinstance(size, int) or (isinstance(size, dict) and "shortest_edge" in size):
            shortest = int(size if isinstance(size, int) else size["shortest_edge"])
        else:
            resize_to = _hw(size, "size", path)
    if raw.get("do_center_crop", True):
        crop = _hw(raw.get("crop_size", image_size), "crop_size", path)
    mean = tuple(raw.get("image_mean", CLIP_MEAN)) if raw.get("do_normalize", True) else None
    return Preprocess(
        shortest_edge=shortest,
        resize_to=resize_to,
        crop=crop,
        resample=int(raw.get("resample", Image.Resampling.BICUBIC)),
        rescale=float(raw.get("rescale_factor", 1 / 255)) if raw.get("do_rescale", True) else None,
        mean=mean,
        std=tuple(raw.get("image_std", CLIP_STD)),
    )


# --- scoring -----------------------------------------------------------------------------------


def pair_scores(image_features: np.ndarray, text_features: np.ndarray) -> np.ndarray:
    """100 * max(cos, 0) per (image, caption) pair, [N], from L2-normalised features."""
    cos = np.sum(np.asarray(image_features) * np.asarray(text_features), axis=-1)
    return 100 * np.maximum(cos, 0.0)


class CLIPScorer:
    """A loaded CLIP: L2-normalised image / text features and the CLIP score of pairs.

    Inputs go through the jitted towers in batches of exactly `batch_size` (the last one padded),
    so each tower compiles once.
    """

    def __init__(
        self,
        model: CLIP,
        cfg: CLIPConfig,
        tokenizer: CLIPTokenizer,
        preprocess: Preprocess,
        batch_size: int = 32,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be positive")
        self.model, self.cfg, self.tokenizer = model, cfg, tokenizer
        self.preprocess, self.batch_size = preprocess, batch_size

    def _batched(self, fn, inputs: np.ndarray, width: int) -> np.ndarray:
        out = np.zeros((len(inputs), width), np.float32)
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start : start + self.batch_size]
            pad = self.batch_size - len(chunk)
            if pad:  # filler rows (copies of a real one), dropped below
                chunk = np.concatenate([chunk, np.repeat(chunk[:1], pad, axis=0)])
            features = np.asarray(fn(self.model, chunk))
            out[start : start + self.batch_size] = features[: self.batch_size - pad]
        return out

    def pixel_features(self, pixels: np.ndarray) -> np.ndarray:
        """float32 [N, projection_dim] unit vectors of already preprocessed pixels [N, S, S, 3]."""
        pixels = np.asarray(pixels, np.float32)
        size = self.cfg.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (size, size, self.cfg.num_channels):
            raise ValueError(f"pixels {pixels.shape}: expected [N, {size}, {size}, 3]")
        return self._batched(_image_features, pixels, self.cfg.projection_dim)

    def image_features(self, images) -> np.ndarray:
        """float32 [N, projection_dim] unit vectors of uint8 [N, H, W, 3] or PIL images."""
        return self.pixel_features(self.preprocess(images))

    def text_features(self, texts) -> np.ndarray:
        """float32 [N, projection_dim] unit vectors of captions (longer ones are truncated)."""
        return self._batched(_text_features, self.tokenizer(texts), self.cfg.projection_dim)

    def pair_scores(self, images, texts) -> np.ndarray:
        """100 * max(cos, 0) for each (image, caption) pair, [N]."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        image_features = self.image_features(images)
        if len(image_features) != len(texts):
            raise ValueError(f"{len(image_features)} images but {len(texts)} captions")
        return pair_scores(image_features, self.text_features(texts))

    def clip_score(self, images, texts) -> float:
        """The mean over pairs of 100 * max(cos(image, caption), 0)."""
        scores = self.pair_scores(images, texts)
        if not len(scores):
            raise ValueError("clip_score of no pairs")
        return float(np.mean(scores))


def load_clip(path, *, batch_size: int = 32, dtype: str = "float32") -> CLIPScorer:
    """The HF CLIP directory `path` (the --clip_weights flag) as a CLIPScorer. Never downloads."""
    if path is None:
        raise missing_weights_error(path)
    directory = paths.as_path(path)
    needed = (CONFIG, VOCAB, MERGES)
    has_weights = (directory / WEIGHTS).is_file() or (directory / WEIGHTS_INDEX).is_file()
    if (
        not directory.is_dir()
        or not has_weights
        or not all((directory / n).is_file() for n in needed)
    ):
        raise missing_weights_error(path)
    model, cfg = load_model(directory, dtype=dtype)
    tokenizer = CLIPTokenizer.from_directory(directory, context_length=cfg.context_length)
    if max(tokenizer.vocab.values()) >= cfg.vocab_size:
        raise ValueError(f"{directory}: {VOCAB} has ids beyond the model's {cfg.vocab_size}")
    if cfg.eos_token_id == LEGACY_EOS:
        if tokenizer.end_id != max(tokenizer.vocab.values()):
            raise ValueError(
                f"{directory}: legacy eos_token_id=2 pools at the largest id, but <|endoftext|> "
                "is not the vocabulary's largest id"
            )
    elif cfg.eos_token_id != tokenizer.end_id:
        raise ValueError(
            f"{directory}: text_config eos_token_id={cfg.eos_token_id}, but {VOCAB} has "
            f"<|endoftext|> = {tokenizer.end_id}"
        )
    preprocess = read_preprocess(directory, cfg.image_size)
    if preprocess.crop is not None and preprocess.crop != (cfg.image_size, cfg.image_size):
        raise ValueError(
            f"{directory}: {PREPROCESSOR} crops to {preprocess.crop}, the model takes "
            f"{cfg.image_size}x{cfg.image_size}"
        )
    return CLIPScorer(model, cfg, tokenizer, preprocess, batch_size=batch_size)
