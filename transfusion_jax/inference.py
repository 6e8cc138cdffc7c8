"""From a trained run to pictures and text: `Pipeline`, the Python face of generation.

    from transfusion_jax import Pipeline

    pipe = Pipeline.from_workdir("workdirs/quickstart")
    images = pipe.text_to_image(["a small red circle"], steps=100)  # PIL images
    captions = pipe.caption(images)  # strings
    parts = pipe.generate("a large", max_new_tokens=32)  # text and PIL images, in order

It wraps `generate.Generator` (KV-cached decoding and denoising) with the run's tokenizer, and
picks the sampler from the model's objective (DDPM for epsilon, Heun for flow) unless told;
in pixel space DDPM/DDIM clip their x0 estimate to [-1, 1].

On several devices, `Pipeline.from_workdir(DIR, mesh="auto")` (all local devices, see
`auto_mesh_shape`; or a `sharding.make_mesh` mesh) reads only the weights it samples with, each
straight into its shards, and generation keeps the KV cache split by heads (and rows); the
outputs are those of one device.
"""

import contextlib
import logging
import math
import os

import jax
import numpy as np
from flax import nnx
from PIL import Image as PILImage
from tqdm import tqdm

from transfusion_jax.checkpoint import restore_trained
from transfusion_jax.config import CFG_SCALE_ABLATION, base_config, resolve_model
from transfusion_jax.data.images import load_image, to_uint8
from transfusion_jax.data.tokenizer import make_tokenizer
from transfusion_jax.diffusion import Diffusion
from transfusion_jax.generator import Generator, SamplingOptions
from transfusion_jax.paths import as_path
from transfusion_jax.sharding import make_mesh
from transfusion_jax.train_step import TrainProgram

log = logging.getLogger(__name__)

SAMPLERS_FOR = {"epsilon": ("ddpm", "ddim"), "flow": ("euler", "heun")}


class Pipeline:
    """Text -> image, captioning and text (with images) generation for one trained model."""

    def __init__(self, model, cfg, step: int | None = None, vae=None):
        """`vae` (a `vae.VAE`) decodes latent-space models' images; by default the one at the
        config's image.vae_path."""
        self.cfg = cfg = resolve_model(cfg)
        self.step, self.model = step, model
        if vae is None and cfg.data.latents == "vae":
            from transfusion_jax.vae import load_vae

            vae = load_vae(cfg.image.vae_path)
        self.vae = vae
        # a discrete run's images are code grids, made and read by its VQ tokenizer
        self.vq = None
        if cfg.model.image_repr == "discrete":
            from transfusion_jax.vae import load_vq

            self.vq = load_vq(cfg.image.vae_path, step=cfg.image.get("vae_step", 0) or None)
        self.tokenizer = make_tokenizer(cfg.data.tokenizer)
        image = cfg.image
        self.image_shape = (image.latent_size, image.latent_size, image.latent_channels)
        self._bar, self._reporting = None, None
        self.generator = self._generator(progress=None)

    def _generator(self, progress) -> Generator:
        if self.vq is not None:
            from transfusion_jax.discrete_generator import DiscreteGenerator

            image = self.cfg.image
            return DiscreteGenerator(
                self.model,
                self.tokenizer.special,
                image.latent_size // image.patch_size,
                self.cfg.model.vocab_size,
                image.codebook_size,
                num_ids=self.tokenizer.num_ids,
            )
        return Generator(
            self.model,
            Diffusion.from_config(self.cfg),
            self.tokenizer.special,
            self.image_shape,
            progress=progress,
            num_ids=self.tokenizer.num_ids,
        )

    def set_model(self, model, step: int | None = None) -> None:
        """Other weights of the same architecture (the trainer's newest, for evaluation during
        training): the compiled generation functions are reused."""
        self.model, self.step = model, step
        self.generator.set_model(model)
        self._reporting = None

    @classmethod
    def from_workdir(cls, workdir, ema: bool = False, step: int | None = None, mesh=None):
        """The newest checkpoint that restores (or `step`), with the config stored with it;
        `ema` takes the EMA weights; `mesh` places the weights, and generation runs on it
        (default: one device; "auto": all local devices, see `auto_mesh_shape`)."""
        model, cfg, step = load_trained(workdir, use_ema=ema, step=step, mesh=mesh)
        return cls(model, cfg, step)

    # -- the three tasks ------------------------------------------------------------------------

    def text_to_image(
        self,
        prompts,
        num_per_prompt: int = 1,
        steps: int = 250,
        cfg_scale: float = CFG_SCALE_ABLATION,
        sampler: str | None = None,
        seed: int = 0,
        progress: bool = False,
        max_prompt_tokens: int | None = None,
        image_temperature: float = 1.0,
        image_top_k: int = 0,
    ) -> list[PILImage.Image]:
        """One image per prompt (a string or a list), `num_per_prompt` times, in prompt order;
        prompts are cut to `max_prompt_tokens` tokens when given (training cuts captions to
        data.max_caption_tokens). A discrete (VQ token) run samples its code tokens at
        `image_temperature` among the `image_top_k` likeliest (0: all); `steps` and `sampler`
        are the diffusion sampler's, unused there."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        _check_positive(num_per_prompt=num_per_prompt)
        tokens = [
            self._prompt(p, max_prompt_tokens) for p in prompts for _ in range(num_per_prompt)
        ]
        # One text token after the image: nothing past it is returned.
        options = self.options(
            steps=steps,
            cfg_scale=cfg_scale,
            sampler=sampler,
            max_new_tokens=1,
            image_temperature=image_temperature,
            image_top_k=image_top_k,
        )
        generator = self.generator
        if progress and self.vq is None:  # a host callback per denoising step, for the bar
            self._reporting = self._reporting or self._generator(progress=self._progress)
            generator = self._reporting
        with self._progress_bar(progress, options):
            result = generator.generate(tokens, jax.random.key(seed), options, force_image=True)
        return self.to_pil_images([row[0] for row in result.images])

    def caption(
        self,
        images,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> list[str]:
        """The text the model writes after each image: PIL images, paths, uint8 arrays
        [h, w, 3], float arrays in [-1, 1], or a list (or batch array) of them."""
        pixels = self._images(images)
        if self.vae is not None:  # the posterior mean, as the model saw images in training
            pixels = np.asarray(self.vae.latents(pixels))
        if self.vq is not None:  # the code grids, as the train step tokenized images
            pixels = np.asarray(self.vq.encode_ids(pixels))
        options = self.options(
            max_new_tokens=max_new_tokens,
            max_images=0,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
        )
        prompts = [[self.tokenizer.special.bos]] * len(pixels)
        result = self.generator.generate(prompts, jax.random.key(seed), options, images=pixels)
        return [self.tokenizer.decode(row).strip() for row in result.text]

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        max_images: int = 1,
        steps: int = 250,
        cfg_scale: float = CFG_SCALE_ABLATION,
        sampler: str | None = None,
        seed: int = 0,
        image_temperature: float = 1.0,
        image_top_k: int = 0,
    ) -> list:
        """The continuation of `prompt`: text, and an image wherever the model opens one (up to
        `max_images`), as a list of strings and PIL images in document order (a discrete run's
        image codes sampled with `image_temperature` and `image_top_k`)."""
        options = self.options(
            max_new_tokens=max_new_tokens,
            max_images=max_images,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            steps=steps,
            cfg_scale=cfg_scale,
            sampler=sampler,
            image_temperature=image_temperature,
            image_top_k=image_top_k,
        )
        result = self.generator.generate([self._prompt(prompt)], jax.random.key(seed), options)
        return self._parts(result.tokens[0], result.images[0])

    # -- helpers --------------------------------------------------------------------------------

    def options(self, sampler: str | None = None, **kw) -> SamplingOptions:
        """SamplingOptions with the model's default sampler, checked (ValueError names the
        argument)."""
        objective = self.cfg.diffusion.objective
        valid = SAMPLERS_FOR[objective]
        sampler = sampler or valid[0 if objective == "epsilon" else 1]
        if sampler not in valid:
            raise ValueError(
                f"sampler {sampler!r}: a model trained with diffusion.objective={objective!r} "
                f"samples with {' or '.join(valid)}"
            )
        cfg_scale = kw.get("cfg_scale", 1.0)
        if not math.isfinite(cfg_scale) or cfg_scale < 0:
            raise ValueError(f"cfg_scale {cfg_scale}: must be finite and >= 0 (1 = no guidance)")
        _check_positive(**{k: kw[k] for k in ("steps", "max_new_tokens") if k in kw})
        for key in ("temperature", "image_temperature", "top_k", "image_top_k"):
            if kw.get(key, 0) < 0:
                raise ValueError(f"{key} {kw[key]}: must be >= 0")
        clip = 1.0 if self.cfg.data.latents == "pixels" and sampler in ("ddpm", "ddim") else None
        return SamplingOptions(sampler=sampler, clip_x0=clip, **kw)

    def to_pil(self, image: np.ndarray) -> PILImage.Image:
        """A generated image (pixels in [-1, 1], a normalised latent, or a code grid) as a PIL
        image."""
        return self.to_pil_images([image])[0]

    def to_pil_images(self, images) -> list[PILImage.Image]:
        """Generated images as PIL images; latents are decoded together through the VAE."""
        if not len(images):
            return []
        images = np.stack([np.asarray(x) for x in images])
        if self.vae is not None:
            images = np.asarray(self.vae.decode(self.vae.denormalize(images)))
        if self.vq is not None:  # code grids
            images = np.asarray(self.vq.decode_ids(images))
        return [PILImage.fromarray(to_uint8(x)) for x in images]

    def _prompt(self, text: str, limit: int | None = None) -> list[int]:
        return [self.tokenizer.special.bos, *self.tokenizer.encode(text)[:limit]]

    def _images(self, images) -> np.ndarray:
        if isinstance(images, str | os.PathLike | PILImage.Image):
            images = [images]
        elif hasattr(images, "shape"):  # numpy or jax arrays: a batch [N, h, w, 3] or one image
            images = list(np.asarray(images)) if np.ndim(images) == 4 else [np.asarray(images)]
        else:
            images = list(images)
        size = self.cfg.data.image_size
        return np.stack([_as_model_image(x, size) for x in images])

    def _parts(self, tokens: list[int], images: list[np.ndarray]) -> list:
        special, parts, text, images = self.tokenizer.special, [], [], iter(images)
        inside_image = False
        for token in tokens:
            if token == special.boi:
                if text:
                    parts.append(self.tokenizer.decode(text))
                text, inside_image = [], True
            elif token == special.eoi and inside_image:
                parts.append(self.to_pil(next(images)))
                inside_image = False
            elif not inside_image:
                text.append(token)
        if text:
            parts.append(self.tokenizer.decode(text))
        return parts

    def _progress(self, t) -> None:
        if self._bar is not None:
            self._bar.update(1)

    @contextlib.contextmanager
    def _progress_bar(self, show: bool, options: SamplingOptions):
        evaluations = 2 * options.steps - 1 if options.sampler == "heun" else options.steps
        show = show and self.vq is None  # a discrete run's images do not denoise
        self._bar = tqdm(total=evaluations, desc="denoising", unit="step", disable=not show)
        try:
            yield self._bar
        finally:
            jax.effects_barrier()  # the last step's callback has run before the bar closes
            self._bar.close()
            self._bar = None


def _as_model_image(image, size: int) -> np.ndarray:
    """float32 [size, size, 3] in [-1, 1] from a path, PIL image or array."""
    if isinstance(image, str | os.PathLike | PILImage.Image):
        return load_image(image, size)
    array = np.asarray(image)
    if array.dtype.kind in "iub":  # integer pixels: 0-255
        if array.min(initial=0) < 0 or array.max(initial=0) > 255:
            raise ValueError("integer images must hold pixel values in 0-255")
        return load_image(PILImage.fromarray(array.astype(np.uint8)), size)
    if array.shape != (size, size, 3):
        raise ValueError(f"image of shape {array.shape}: float images must be {size}x{size}x3")
    if np.abs(array).max(initial=0) > 1.01:
        raise ValueError("float images must be scaled to [-1, 1] (uint8 images: 0-255)")
    return array.astype(np.float32)


def _check_positive(**values) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} {value}: must be at least 1")


def image_grid(images, min_cell: int = 128, border: int = 2) -> np.ndarray:
    """Images (uint8 arrays [h, w, 3] or PIL images) tiled in a near-square grid on white, each
    cell enlarged (nearest neighbour) to at least `min_cell` pixels so small images stay
    visible."""
    images = [np.asarray(x) for x in images]
    n = len(images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    scale = max(1, math.ceil(min_cell / images[0].shape[0]))
    h, w = images[0].shape[0] * scale, images[0].shape[1] * scale
    grid = np.full((rows * (h + border) + border, cols * (w + border) + border, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        big = image.repeat(scale, axis=0).repeat(scale, axis=1)
        top, left = border + r * (h + border), border + c * (w + border)
        grid[top : top + h, left : left + w] = big
    return grid


def load_trained(workdir, use_ema: bool = False, step: int | None = None, mesh=None):
    """(model, config, step) from a training run's directory (or a file written by
    `transfusion_jax.export`), placed on `mesh` (default: the first local device; "auto": all
    local devices, shaped by `auto_mesh_shape`).

    Restores the given step, or else the newest one that restores (a damaged latest checkpoint
    is named in a warning and skipped), with the config stored in that checkpoint (DIR/config.json
    for checkpoints saved before configs were stored); `use_ema` takes the EMA weights. Only
    those weights are read (an Orbax partial restore, each array straight into its shards on
    `mesh`): not the optimizer state, not the other set of weights.
    """
    workdir = as_path(workdir)
    if isinstance(mesh, str) and mesh != "auto":
        raise ValueError(f"mesh {mesh!r}: a jax.sharding.Mesh, None (one device) or 'auto'")
    # imported here: `python -m transfusion_jax.export` runs that module as a script, which
    # warns when the package's import of the Pipeline had imported it already
    from transfusion_jax.export import exported_config, is_export, load_exported

    if is_export(workdir):
        if use_ema or step is not None:
            raise ValueError(f"{workdir}: an export holds one set of weights (no ema, no step)")
        if isinstance(mesh, str):
            mesh = _auto_mesh(exported_config(workdir))
        return load_exported(workdir, mesh)
    meshes = {}  # one mesh for every step tried, made from the first config read

    def make_program(cfg):
        if "mesh" not in meshes:
            auto = isinstance(mesh, str)
            meshes["mesh"] = (
                _auto_mesh(cfg) if auto else mesh or make_mesh(1, 1, 1, jax.local_devices()[:1])
            )
        program = TrainProgram(cfg, meshes["mesh"], frozen_weights=False)
        if use_ema and program.cfg.train.ema_decay <= 0:
            raise ValueError(
                f"--workdir {workdir}: the run kept no EMA weights (train.ema_decay=0)"
            )
        return program

    def restore(checkpoints, candidate, program):
        abstract = program.abstract_state().params
        return checkpoints.restore_params(candidate, abstract, ema=use_ema)

    program, params, step = restore_trained(workdir, make_program, step, base_config, restore)
    return nnx.merge(program.graphdef, params), program.cfg, step


def _auto_mesh(cfg):
    """All local devices, shaped by `auto_mesh_shape` for a (stored) config's KV heads."""
    model = cfg.get("model", {})
    heads = model.get("num_kv_heads") or model.get("num_heads") or 1
    devices = jax.local_devices()
    return make_mesh(*auto_mesh_shape(len(devices), heads), devices)


def auto_mesh_shape(num_devices: int, num_kv_heads: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) for sampling: `tensor` as many devices as split whole KV heads
    (the largest common divisor: the attention weights and the KV cache, what grows with the
    context, split by heads), `fsdp` the rest (the other weights split along the model width,
    the prompts by rows)."""
    tensor = math.gcd(num_devices, num_kv_heads)
    return 1, num_devices // tensor, tensor
