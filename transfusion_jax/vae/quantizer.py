"""Vector quantization for the discrete image tokenizer (the Chameleon baseline's VQ-VAE).

An encoder output z [..., D] becomes the nearest of K codebook vectors e_k (squared Euclidean), so
an image becomes a grid of code ids. Training follows VQ-VAE-2 / the "EMA" VQ-VAE:
- the decoder's gradient reaches the encoder straight through the lookup:
  z_q = z + stop_gradient(e_k - z), so d z_q / d z = I;
- the commitment loss beta * mean((z - stop_gradient(e_k))^2) pulls the encoder towards its codes;
- the codebook itself gets no gradient: each code is the exponential moving average of the encoder
  outputs assigned to it, count_k <- d count_k + (1 - d) n_k, sum_k <- d sum_k + (1 - d) s_k,
  e_k = sum_k / count_k (both terms carry the same EMA bias, so the ratio needs no correction);
- dead codes are restarted: a code whose EMA count falls below `restart_share` times its uniform
  share (N vectors per step / K codes) is moved onto a random encoder output of the step. At the
  first step every count is 0, so every unused code starts on a data vector (a random-sample
  initialisation of the codebook), and a code that stays unused keeps being moved until one wins.

The counts and sums are stored as parameters so that the shared training program shards and
checkpoints them with the rest; no loss term reads them, so their gradient is zero, and
`ema_codebook_update` overwrites them (and the codebook) after each optimizer step.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from transfusion_jax.layers import sharded


def nearest_codes(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """Ids [N] of the codebook rows [K, D] nearest to z [N, D]: argmin_k |z|^2 - 2 z.e_k + |e_k|^2
    (|z|^2 is the same for every k and is left out)."""
    z, codebook = z.astype(jnp.float32), codebook.astype(jnp.float32)
    distances = jnp.sum(jnp.square(codebook), axis=-1) - 2.0 * z @ codebook.T
    return jnp.argmin(distances, axis=-1).astype(jnp.int32)


def straight_through(z: jax.Array, quantized: jax.Array) -> jax.Array:
    """`quantized` forward, identity gradient to `z` backward."""
    return z + jax.lax.stop_gradient(quantized - z)


def commitment_loss(z: jax.Array, quantized: jax.Array) -> jax.Array:
    """mean((z - sg(e))^2) over every element: the encoder's pull towards its codes."""
    return jnp.mean(jnp.square(z.astype(jnp.float32) - jax.lax.stop_gradient(quantized)))


def code_histogram(ids: jax.Array, num_codes: int) -> jax.Array:
    """Float32 [K]: how many times each code occurs in `ids`."""
    return jnp.zeros((num_codes,), jnp.float32).at[ids.reshape(-1)].add(1.0)


def perplexity(counts: jax.Array) -> jax.Array:
    """exp(entropy) of the codes' frequencies: K when all are used equally, 1 when one is."""
    p = counts / jnp.maximum(jnp.sum(counts), 1.0)
    return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


class VectorQuantizer(nnx.Module):
    """The codebook [K, D] with its EMA statistics; `__call__` quantizes [..., D] vectors."""

    def __init__(self, num_codes: int, dim: int, rngs: nnx.Rngs):
        self.num_codes, self.dim = num_codes, dim
        replicated = lambda init, *shape: nnx.Param(
            sharded(init, *(None,) * len(shape))(rngs.params(), shape, jnp.float32)
        )
        self.codebook = replicated(nnx.initializers.normal(1.0), num_codes, dim)
        # EMA of how many vectors each code took per step, and of their sum (see the docstring).
        self.ema_count = replicated(nnx.initializers.zeros_init(), num_codes)
        self.ema_sum = replicated(nnx.initializers.zeros_init(), num_codes, dim)

    def lookup(self, ids: jax.Array) -> jax.Array:
        """Code vectors [..., D] of ids [...]."""
        return jnp.take(self.codebook[...], ids, axis=0)

    def codes(self, z: jax.Array) -> jax.Array:
        """Ids [...] of the codes nearest to z [..., D]."""
        flat = nearest_codes(z.reshape(-1, self.dim), self.codebook[...])
        return flat.reshape(z.shape[:-1])

    def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(z_q with straight-through gradients, ids, commitment loss) of z [..., D]."""
        ids = self.codes(z)
        quantized = self.lookup(ids).astype(jnp.float32)
        z_q = straight_through(z.astype(jnp.float32), quantized)
        return z_q, ids, commitment_loss(z, quantized)


def ema_codebook_update(
    quantizer: dict,
    z: jax.Array,
    ids: jax.Array,
    key: jax.Array,
    updates: jax.Array,
    decay: float,
    restart_share: float,
) -> tuple[dict, dict]:
    """The quantizer's parameters (a pure dict: codebook, ema_count, ema_sum) after the step
    numbered `updates` (1 for the first) whose encoder outputs were z [N, D] with nearest codes
    ids [N], and the step's codebook metrics. The dead-code rule reads the count divided by
    1 - decay^updates, the EMA's bias from its zero start, so young codes are not taken for dead."""
    count, total = quantizer["ema_count"], quantizer["ema_sum"]
    num_codes = count.shape[0]
    z = z.astype(jnp.float32)
    step_counts = code_histogram(ids, num_codes)
    step_sums = jnp.zeros_like(total).at[ids].add(z)
    count = decay * count + (1.0 - decay) * step_counts
    total = decay * total + (1.0 - decay) * step_sums

    share = z.shape[0] / num_codes  # vectors per code per step, were usage uniform
    bias = 1.0 - decay ** jnp.maximum(updates, 1).astype(jnp.float32)
    dead = count / bias < restart_share * share
    # Each dead code moves onto a random vector of this step (with replacement: cheap and static),
    # with the uniform share as its count, so it has time to win vectors before it counts as dead.
    picks = jax.random.randint(key, (num_codes,), 0, z.shape[0])
    count = jnp.where(dead, share * bias, count)
    total = jnp.where(dead[:, None], z[picks] * (share * bias), total)
    codebook = total / jnp.maximum(count, 1e-12)[:, None]
    metrics = dict(
        codebook_usage=jnp.mean((step_counts > 0).astype(jnp.float32)),
        codebook_perplexity=perplexity(step_counts),
        codes_restarted=jnp.sum(dead.astype(jnp.float32)),
    )
    params = dict(
        codebook=codebook.astype(quantizer["codebook"].dtype), ema_count=count, ema_sum=total
    )
    return params, metrics
