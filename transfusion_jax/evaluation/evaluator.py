"""One model, its held-out data and the suites that score it: what `evaluate` and the trainer
share.

`Evaluator` holds a trained model (on one device, or on the training mesh) and its config, whose
`eval` section sets the suites' sizes, seed and weights. The suites (`suites.py`) use two scoring
passes compiled once per evaluator (text negative log likelihoods and diffusion errors at given
noise levels, on fixed-size batches, padded) and the batched, KV-cached generation of
`inference.Pipeline`. During training `set_model` swaps in the newest weights and nothing is
compiled again.
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transfusion_jax import sharding as shd
from transfusion_jax.batch import Batch, build_batch
from transfusion_jax.config import base_config
from transfusion_jax.diffusion import Diffusion
from transfusion_jax.discrete import text_targets, with_image_tokens
from transfusion_jax.inference import Pipeline
from transfusion_jax.loss import loss_terms, next_token_ce


def eval_settings(cfg):
    """The run's config with an `eval` section (a run saved before evaluation existed has
    none: the defaults) and its suites' sizes checked."""
    cfg = cfg.copy_and_resolve_references()
    if "eval" not in cfg:
        cfg.eval = base_config().eval
    settings = cfg.eval
    for key in ("num_examples", "batch_size", "sampling_steps"):
        if settings[key] < 1:
            raise ValueError(f"config field eval.{key}: {settings[key]} must be at least 1")
    levels = tuple(settings.diffusion_levels)
    if not levels or not all(0.0 <= x <= 1.0 for x in levels):
        raise ValueError(f"config field eval.diffusion_levels: {levels} must be in [0, 1]")
    return cfg


@dataclasses.dataclass
class Evaluator:
    cfg: object  # the run's resolved config (eval section included, see eval_settings)
    model: nnx.Module
    mesh: object = None  # None: the model's weights sit on one device
    vae: object = None  # a latent-space run's VAE (default: the one at image.vae_path)
    step: int | None = None

    def __post_init__(self):
        self.cfg = eval_settings(self.cfg)
        self.settings = self.cfg.eval
        self.pipeline = Pipeline(self.model, self.cfg, self.step, vae=self.vae)
        self.vae = self.pipeline.vae
        self.vq = self.pipeline.vq  # a discrete run's tokenizer (images_as_tokens)
        self.tokenizer = self.pipeline.tokenizer
        self.diffusion = Diffusion.from_config(self.cfg)
        self.graphdef, self.params = nnx.split(self.model)
        self.artifacts: dict = {}  # suite -> what it drew or wrote, for the CLI to save
        self.seconds: dict = {}  # suite -> seconds the last run of it took
        self._examples = None
        # On a mesh the results come back replicated: every process can read them.
        out = {} if self.mesh is None else {"out_shardings": shd.replicated(self.mesh)}
        self._text_nll = jax.jit(self._text_nll_fn, **out)
        self._image_errors = jax.jit(self._image_errors_fn, **out)

    def set_model(self, model, step: int | None = None) -> None:
        """The same architecture with other weights (the trainer's newest)."""
        self.model, self.step = model, step
        self.graphdef, self.params = nnx.split(model)
        self.pipeline.set_model(model, step)

    def run(self, suites) -> dict[str, float]:
        """{"suite/metric": value} of every suite named, in order; `seconds` (suite -> s) says
        how long each took."""
        from transfusion_jax.evaluation.suites import SUITES

        unknown = [s for s in suites if s not in SUITES]
        if unknown:
            raise ValueError(f"--suite {','.join(unknown)}: not one of {', '.join(SUITES)}")
        results, self.seconds = {}, {}
        for name in suites:
            start = time.perf_counter()
            results.update(SUITES[name](self))
            self.seconds[name] = time.perf_counter() - start
        return results

    # -- batches --------------------------------------------------------------------------------

    @property
    def rows_per_batch(self) -> int:
        """eval.batch_size, rounded up to split evenly over the mesh's data axes."""
        ways = 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        return -(-self.settings.batch_size // ways) * ways

    def place(self, tree):
        """Host arrays onto the devices: one device, or the mesh's batch sharding (every process
        holds the whole evaluation batch, so each takes its own part of it)."""
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, tree)
        sharding = shd.batch_sharding(self.mesh)
        return jax.tree.map(
            lambda x: jax.make_array_from_callback(x.shape, sharding, lambda index: x[index]),
            tree,
        )

    def batches(self, rows: list, extra: list[np.ndarray]):
        """Fixed-size batches of `rows` (lists of documents, one list per row) with the matching
        rows of each array in `extra`; the last batch is padded with empty rows. Yields (batch,
        extras, real_rows)."""
        cfg, n = self.cfg, self.rows_per_batch
        image = cfg.image
        shape = (image.latent_size, image.latent_size, image.latent_channels)
        for start in range(0, len(rows), n):
            chunk = rows[start : start + n]
            real = len(chunk)
            chunk = chunk + [[]] * (n - real)
            batch = build_batch(
                chunk,
                cfg.data.seq_len,
                image.max_images,
                shape,
                image.patch_size,
                self.tokenizer.special,
            )
            padded = []
            for array in extra:
                part = array[start : start + n]
                fill = np.zeros((n - real, *part.shape[1:]), part.dtype)
                padded.append(np.concatenate([part, fill]))
            yield batch, padded, real

    # -- compiled scoring -----------------------------------------------------------------------

    def token_ce(self, params, batch: Batch) -> tuple[jax.Array, jax.Array]:
        """(next-token cross-entropy [B, L], 0 where there is no text target; the target mask)
        with every image clean (t = 0): how text is scored here and by the experiments that rank
        captions (experiments/class_captions.py). Traceable; a discrete model's batch holds its
        images as code tokens (`images_as_tokens`), and only text targets count."""
        model = nnx.merge(self.graphdef, params)
        if model.patching is None:
            mask = text_targets(batch, self.cfg.model.vocab_size)
            ce = next_token_ce(model(batch, None, None)[0], batch.tokens)
            return jnp.where(mask, ce, 0.0), mask
        zeros_t = jnp.zeros(batch.noise_limited.shape, jnp.int32)
        terms = loss_terms(model, batch, zeros_t, jnp.zeros_like(batch.latents), self.diffusion)
        return terms["token_ce"], terms["token_mask"]

    def _text_nll_fn(self, params, batch: Batch, weights):
        """Summed negative log likelihood (nats) of the weighted next-token targets."""
        ce, mask = self.token_ce(params, batch)
        return jnp.sum(ce * weights), jnp.sum(mask * weights)

    def text_nll(self, batch: Batch, weights) -> tuple[float, float]:
        batch = self.images_as_tokens(batch)
        nll, count = self._text_nll(self.params, *self.place((batch, weights)))
        return float(nll), float(count)

    def images_as_tokens(self, batch: Batch) -> Batch:
        """A discrete run's batch with its images written as their code tokens, as the train
        step writes them (discrete.py); any other run's batch as it is."""
        vq = self.vq
        if vq is None or not np.any(np.asarray(batch.image_ids) >= 0):
            return batch
        x = np.asarray(batch.latents)  # [B, M, S, S, 3] pixels
        codes = np.asarray(vq.encode_ids(x.reshape(-1, *x.shape[2:])))
        codes = codes.reshape(x.shape[0], x.shape[1], -1)
        converted = with_image_tokens(batch, codes, self.cfg.model.vocab_size)
        return jax.tree.map(np.asarray, converted)

    def _image_errors_fn(self, params, batch: Batch, t, noise):
        """Per-image diffusion errors [B, M] (mean over each latent) at noise levels t [B, M]."""
        model = nnx.merge(self.graphdef, params)
        terms = loss_terms(model, batch, t, noise, self.diffusion)
        return terms["image_mse"], terms["image_mask"]

    def image_errors(self, batch: Batch, t, noise) -> tuple[np.ndarray, np.ndarray]:
        errors, used = self._image_errors(self.params, *self.place((batch, t, noise)))
        return np.asarray(errors), np.asarray(used)

    def examples(self) -> list:
        """The held-out images and captions (`heldout.py`), read once per evaluator."""
        num = self.settings.num_examples
        if self._examples is None or self._examples[0] != num:
            from transfusion_jax.evaluation.heldout import held_out_examples

            self._examples = (num, held_out_examples(self.cfg, num))
        return self._examples[1]

    def model_images(self, pixels: np.ndarray) -> np.ndarray:
        """What the model sees of images [N, S, S, 3] in [-1, 1]: the pixels, or the VAE's
        normalised posterior means."""
        if self.vae is None:
            return pixels
        return np.asarray(self.vae.latents(pixels))
