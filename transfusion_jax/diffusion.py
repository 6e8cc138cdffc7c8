"""Noise schedules and the two training objectives behind one interface.

Time is an integer index t in [0, T) for both objectives (the paper's t = index + 1), so noise
limiting, the timestep embedding and respaced samplers speak one language:
- "epsilon" (the paper, DDPM, Ho et al.): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, predict eps,
  with the cosine schedule of Nichol & Dhariwal (s = 0.008, betas clipped at 0.999).
- "flow" (rectified flow): sigma = (t + 1) / T, x_t = (1 - sigma) x0 + sigma eps, predict the
  velocity eps - x0.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from transfusion_jax.model_config import DiffusionSpec, from_section


def cosine_alphas_cumprod(
    num_timesteps: int, s: float = 0.008, max_beta: float = 0.999
) -> np.ndarray:
    """abar_t for t = 0 .. T-1 from the cosine schedule, via its clipped betas (float64)."""

    def f(u):
        return np.cos((u / num_timesteps + s) / (1 + s) * np.pi / 2) ** 2

    steps = np.arange(num_timesteps, dtype=np.float64)
    betas = np.minimum(1.0 - f(steps + 1) / f(steps), max_beta)
    return np.cumprod(1.0 - betas)


@dataclasses.dataclass(frozen=True)
class Diffusion:
    """The forward process and regression target of one objective."""

    objective: str = "epsilon"
    num_timesteps: int = 1000
    noise_limit: int = 500
    timestep_sampling: str = "uniform"

    @classmethod
    def from_spec(cls, spec: DiffusionSpec) -> "Diffusion":
        return cls(
            objective=spec.objective,
            num_timesteps=spec.num_timesteps,
            noise_limit=spec.noise_limit,
            timestep_sampling=spec.timestep_sampling,
        )

    @classmethod
    def from_config(cls, cfg) -> "Diffusion":
        """`from_spec` of a config's `diffusion` section, for the call sites that hold a config
        (it needs nothing resolved, so the rest of the config is not checked again)."""
        return cls.from_spec(from_section(DiffusionSpec, cfg.diffusion))

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return cosine_alphas_cumprod(self.num_timesteps)

    def sample_timesteps(self, rng: jax.Array, noise_limited: jax.Array) -> jax.Array:
        """One t per image: int32 in [0, T), or in [0, noise_limit) where flagged; uniform, or
        t = floor(sigmoid(n) * range) with n ~ N(0, 1) for "logit_normal"."""
        high = jnp.where(noise_limited, self.noise_limit, self.num_timesteps)
        if self.timestep_sampling == "logit_normal":
            u = jax.nn.sigmoid(jax.random.normal(rng, noise_limited.shape))
        else:
            u = jax.random.uniform(rng, noise_limited.shape)
        return jnp.minimum((u * high).astype(jnp.int32), high - 1)

    def coefficients(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(a, b) with x_t = a * x0 + b * eps, float32, shaped like t."""
        if self.objective == "epsilon":
            abar = jnp.asarray(self.alphas_cumprod, jnp.float32)[t]
            return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
        if self.objective == "flow":
            sigma = (t.astype(jnp.float32) + 1.0) / self.num_timesteps
            return 1.0 - sigma, sigma
        raise ValueError(f"diffusion objective {self.objective!r} is not 'epsilon' or 'flow'")

    def add_noise(self, x0: jax.Array, eps: jax.Array, t: jax.Array):
        """Noised images and the regression target. x0, eps: [B, M, h, w, c]; t: [B, M]."""
        a, b = self.coefficients(t)
        a, b = a[..., None, None, None], b[..., None, None, None]
        x_t = a * x0 + b * eps
        target = eps if self.objective == "epsilon" else eps - x0
        return x_t, target
