"""The functional training core: the train state, its sharded creation, and one optimizer step.

`TrainProgram` ties a config to a mesh: it knows the model's graph, the optimizer and the sharding
of every leaf of the state, creates the state already sharded (`jax.jit(init, out_shardings=...)`,
never whole on one device) and compiles `train_step` with in/out shardings and a donated state.

A step whose loss or gradient norm is not finite is never applied: the state keeps its weights and
optimizer moments, counts the step in `nonfinite_steps`, remembers the first such step and the
longest run of them in a row, so a checkpoint can never hold poisoned weights. The loop decides
whether to stop (`train.nan_policy`, `train.max_nonfinite_streak`).
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from transfusion_jax import sharding as shd
from transfusion_jax.batch import Batch
from transfusion_jax.config import images_arrive_as_pixels, resolve_model
from transfusion_jax.diffusion import Diffusion
from transfusion_jax.discrete import discrete_counts, discrete_loss, with_image_tokens
from transfusion_jax.loss import batch_counts, transfusion_loss
from transfusion_jax.model import Transfusion
from transfusion_jax.optimizer import learning_rate_schedule, make_optimizer
from transfusion_jax.vae.autoencoder import sample_posterior

ENCODE_STREAM = 0x5EED  # folded into a step's key for the VAE posterior samples


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 []: optimizer steps taken
    params: dict
    opt_state: optax.OptState
    ema_params: dict  # {} when train.ema_decay is 0
    rng: jax.Array  # uint32 key data; the step's key is fold_in(rng, step)
    nonfinite_steps: jax.Array  # int32 []: steps skipped for a non-finite loss or gradient
    first_nonfinite_step: jax.Array  # int32 []: -1 while there has been none
    nonfinite_streak: jax.Array  # int32 []: non-finite steps in a row, up to this one
    longest_nonfinite_streak: jax.Array  # int32 []: the longest such run so far


@dataclasses.dataclass
class TrainProgram:
    """The Transfusion program. Another model (the VAE, `vae/train_step.py`) subclasses it and
    replaces `resolve`, `make_model`, `setup` and `loss`; state, sharding and step are shared."""

    cfg: object
    mesh: Mesh
    # Load the frozen weights the step uses (the VAE encoder of a latent-space run). Restoring a
    # checkpoint for inference needs only the state's shapes: False skips them.
    frozen_weights: bool = True

    resolve = staticmethod(resolve_model)

    def make_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return Transfusion(self.cfg, rngs)

    def setup(self) -> None:
        """What `loss` needs besides the model: the diffusion schedule, and the frozen VAE
        encoder when batches carry pixels (`data.latents = "vae"` without a latent cache), or
        the frozen VQ tokenizer of a discrete run."""
        self.diffusion = Diffusion.from_config(self.cfg)
        self.vae = self.vq = None
        self.discrete = self.cfg.model.image_repr == "discrete"
        if self.discrete and self.frozen_weights and self.cfg.image.vae_path:
            from transfusion_jax.vae import load_vq

            try:
                self.vq = load_vq(self.cfg.image.vae_path, step=self.cfg.image.vae_step or None)
            except (OSError, ValueError) as e:
                raise ValueError(f"config field image.vae_path: {e}") from e
            self.vq_graphdef = nnx.graphdef(self.vq.module)
            self.freeze(self.vq.module)
        if images_arrive_as_pixels(self.cfg) and self.frozen_weights:
            from transfusion_jax.vae import load_vae
            from transfusion_jax.vae.latent_space import latent_space

            latent_space(self.cfg.image.vae_path)  # a missing path named as a config field
            try:
                self.vae = load_vae(self.cfg.image.vae_path, dtype=self.cfg.model.dtype)
            except (OSError, ValueError) as e:
                raise ValueError(f"config field image.vae_path: {e}") from e
            self.vae_graphdef = nnx.graphdef(self.vae.module)
            self.freeze(self.vae.module)

    def freeze(self, module: nnx.Module, replicate: bool = False) -> None:
        """Places `module`'s weights on the mesh (sharded by their logical axis names, or
        replicated) as the step's frozen weights: an argument of every step, used but not
        trained (the VAE encoder here, the perceptual network of the VAE trainer)."""
        state = nnx.state(module, nnx.Param)
        params = nnx.to_pure_dict(state)
        if replicate:
            self.frozen_shardings = jax.tree.map(lambda _: shd.replicated(self.mesh), params)
        else:
            logical = nnx.to_pure_dict(nnx.get_partition_spec(state))
            self.frozen_shardings = shd.param_shardings(logical, params, self.mesh)
        self.frozen = jax.device_put(params, self.frozen_shardings)

    def __post_init__(self):
        self.frozen = self.frozen_shardings = None
        self.cfg = self.resolve(self.cfg)
        abstract = nnx.eval_shape(lambda: self.make_model(nnx.Rngs(0)))
        self.graphdef, abstract_params = nnx.split(abstract, nnx.Param)  # fails on other state
        self.tx = make_optimizer(self.cfg)
        self.schedule = learning_rate_schedule(self.cfg)
        self.setup()
        logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
        abstract_params = nnx.to_pure_dict(abstract_params)
        self.param_shardings = shd.param_shardings(logical, abstract_params, self.mesh)
        self.state_shardings = self._state_shardings(abstract_params)
        self.batch_sharding = shd.batch_sharding(self.mesh)

    # -- creation -------------------------------------------------------------------------------

    def _init(self, key: jax.Array) -> TrainState:
        model = self.make_model(nnx.Rngs(params=jax.random.fold_in(key, 0)))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        ema = params if self.cfg.train.ema_decay > 0 else {}
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            ema_params=ema,
            rng=jax.random.key_data(jax.random.fold_in(key, 1)),
            nonfinite_steps=jnp.zeros((), jnp.int32),
            first_nonfinite_step=jnp.full((), -1, jnp.int32),
            nonfinite_streak=jnp.zeros((), jnp.int32),
            longest_nonfinite_streak=jnp.zeros((), jnp.int32),
        )

    def _state_shardings(self, abstract_params) -> TrainState:
        abstract = jax.eval_shape(self._init, jax.random.key(0))
        rep = shd.replicated(self.mesh)
        opt = optax.tree_map_params(
            self.tx,
            lambda _, s: s,
            abstract.opt_state,
            self.param_shardings,
            transform_non_params=lambda _: rep,
        )
        ema = self.param_shardings if self.cfg.train.ema_decay > 0 else {}
        return TrainState(
            step=rep,
            params=self.param_shardings,
            opt_state=opt,
            ema_params=ema,
            rng=rep,
            nonfinite_steps=rep,
            first_nonfinite_step=rep,
            nonfinite_streak=rep,
            longest_nonfinite_streak=rep,
        )

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs carrying this mesh's shardings: the restore target of a checkpoint."""
        shapes = jax.eval_shape(self._init, jax.random.key(0))
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            shapes,
            self.state_shardings,
        )

    def init_state(self, seed: int) -> TrainState:
        init = jax.jit(self._init, out_shardings=self.state_shardings)
        return init(jax.random.key(seed))

    # -- the step -------------------------------------------------------------------------------

    def model(self, params) -> Transfusion:
        return nnx.merge(self.graphdef, params)

    def loss(self, params, batch: Batch, rng, counts=None, step=None, frozen=None):
        """(loss, metrics) of a batch; `step` (the optimizer step) is for losses that change
        over a run (the VAE's discriminator starts late), `frozen` the frozen weights."""
        del step, frozen
        if self.discrete:
            offset = self.cfg.model.vocab_size
            return discrete_loss(self.model(params), batch, offset, counts)
        return transfusion_loss(
            self.model(params), batch, rng, self.diffusion, self.cfg.diffusion.loss_weight, counts
        )

    def _gradients(self, params, batch: Batch, rng, step=None, frozen=None):
        """Gradients and metrics of the whole batch, summed over `train.grad_accum_steps`
        micro-batches whose losses are normalised by the whole batch's counts."""
        k = self.cfg.train.grad_accum_steps
        grad_fn = jax.value_and_grad(self.loss, has_aux=True)
        if k == 1:
            (_, metrics), grads = grad_fn(params, batch, rng, step=step, frozen=frozen)
            return grads, metrics

        # Micro-batch i takes rows i, i+k, ...: every device keeps its share of every micro-batch.
        def split(x):
            return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

        micro = jax.tree.map(split, batch)

        counts = (
            discrete_counts(batch, self.cfg.model.vocab_size)
            if self.discrete
            else batch_counts(batch)
        )

        def micro_step(i, micro_batch):
            key = jax.random.fold_in(rng, i)
            (_, metrics), grads = grad_fn(
                params, micro_batch, key, counts, step=step, frozen=frozen
            )
            return grads, metrics

        def accumulate(carry, inputs):
            return jax.tree.map(jnp.add, carry, micro_step(*inputs)), None

        first = jax.tree.map(lambda x: x[0], micro)
        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(micro_step, 0, first))
        (grads, metrics), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(k), micro))
        return grads, metrics

    def encode_images(self, vae_params, batch: Batch, rng) -> Batch:
        """The batch with its pixel images replaced by normalised VAE latents (a posterior
        sample with `image.vae_sample`, else the mean). Every slot is encoded, used or not: a
        static shape; the loss masks the unused ones."""
        x = batch.latents  # [B, M, H, W, 3]
        module = nnx.merge(self.vae_graphdef, vae_params)
        mean, logvar = module.encode(x.reshape(-1, *x.shape[2:]))
        z = self.vae.normalize(
            sample_posterior(mean, logvar, rng if self.cfg.image.vae_sample else None)
        )
        return batch.replace(latents=z.reshape(*x.shape[:2], *z.shape[1:]).astype(jnp.float32))

    def tokenize_images(self, vq_params, batch: Batch) -> Batch:
        """A discrete run's batch: its pixel images replaced by their VQ code ids, written as
        tokens (discrete.py). Every slot is encoded, used or not: a static shape."""
        x = batch.latents  # [B, M, H, W, 3]
        module = nnx.merge(self.vq_graphdef, vq_params)
        ids = module.encode_ids(x.reshape(-1, *x.shape[2:]))  # [B * M, h, w]
        codes = ids.reshape(x.shape[0], x.shape[1], -1)
        return with_image_tokens(batch, codes, self.cfg.model.vocab_size)

    def train_step(self, state: TrainState, batch: Batch, frozen=None):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if self.vae is not None:
            batch = self.encode_images(frozen, batch, jax.random.fold_in(rng, ENCODE_STREAM))
        if self.vq is not None:
            batch = self.tokenize_images(frozen, batch)
        grads, metrics = self._gradients(state.params, batch, rng, state.step, frozen)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params, metrics = self.after_update(params, metrics, rng, state.step)
        ema_decay = self.cfg.train.ema_decay
        ema = state.ema_params
        if ema_decay > 0:
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)

        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
        new_state = state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            ema_params=keep(ema, state.ema_params),
            nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
            first_nonfinite_step=jnp.where(
                (state.first_nonfinite_step < 0) & ~finite, state.step, state.first_nonfinite_step
            ),
            nonfinite_streak=streak,
            longest_nonfinite_streak=jnp.maximum(state.longest_nonfinite_streak, streak),
        )
        # A skipped step's metrics are zeros and `finite_steps` counts the others, so a logged
        # window's means are over the steps that were applied, not NaN for the whole window.
        metrics = dict(metrics, grad_norm=grad_norm)
        metrics = {k: jnp.where(finite, v, jnp.zeros_like(v)) for k, v in metrics.items()}
        # The rate Adam used: its schedule counts applied updates, not skipped steps.
        metrics["learning_rate"] = self.schedule(state.step - state.nonfinite_steps)
        metrics["finite_steps"] = finite.astype(jnp.float32)
        return new_state, metrics

    def after_update(self, params, metrics: dict, rng, step):
        """(params, metrics) after the optimizer's update of step `step`: the place for updates
        that are not gradient steps (the VQ codebook's moving averages). Nothing here."""
        del rng, step
        return params, metrics

    def compile(self, batch_shapes: Batch):
        """The AOT-compiled step for batches shaped like `batch_shapes`: `step(state, batch)`."""
        abstract_batch = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.batch_sharding),
            batch_shapes,
        )
        frozen = () if self.frozen is None else (self.frozen_shardings,)
        step = jax.jit(
            self.train_step,
            in_shardings=(self.state_shardings, self.batch_sharding, *frozen),
            out_shardings=(self.state_shardings, shd.replicated(self.mesh)),
            donate_argnums=(0,),
        )
        abstract_state = self.abstract_state()  # outside the mesh context: it makes a key
        # The mesh as context: attention kernels run per device under it (attention._flash).
        with jax.set_mesh(self.mesh):
            if not frozen:
                return step.lower(abstract_state, abstract_batch).compile()
            compiled = step.lower(abstract_state, abstract_batch, self.frozen).compile()
        return FrozenBound(compiled, self.frozen)


class FrozenBound:
    """A compiled step with its frozen weights bound: called as `step(state, batch)`."""

    def __init__(self, compiled, frozen):
        self.compiled, self.frozen = compiled, frozen

    def __call__(self, state, batch):
        return self.compiled(state, batch, self.frozen)

    def memory_analysis(self):
        return self.compiled.memory_analysis()


def bytes_per_device(tree) -> dict:
    """Bytes of a tree of arrays held on each device (what sharding saved, measured)."""
    totals = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return totals
