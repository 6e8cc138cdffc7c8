"""The paper's optimizer: AdamW (0.9, 0.95, eps 1e-8), linear warm-up then cosine decay to the
minimum learning rate, weight decay 0.1, gradients clipped to global norm 1.0.

Weight decay applies to matrices and embeddings (parameters named `kernel` or `embedding`:
attention, MLP, LM head, patch and U-Net projections and convolutions) and not to norm scales or
biases. The rule goes by name rather than rank because stacked layers give every norm scale a
leading `layers` axis.
"""

import jax
import optax

DECAYED_NAMES = ("kernel", "embedding")


def learning_rate_schedule(cfg) -> optax.Schedule:
    o = cfg.optimizer
    decay_steps = o.decay_steps or cfg.train.num_steps
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=o.peak_lr,
        warmup_steps=o.warmup_steps,
        decay_steps=max(decay_steps, o.warmup_steps + 1),
        end_value=o.min_lr,
    )


def decay_mask(params):
    """True for the leaves that get weight decay (see the module docstring)."""

    def is_decayed(path, _):
        return getattr(path[-1], "key", None) in DECAYED_NAMES

    return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(cfg) -> optax.GradientTransformation:
    o = cfg.optimizer
    return optax.chain(
        optax.clip_by_global_norm(o.clip_norm),
        optax.adamw(
            learning_rate_schedule(cfg),
            b1=o.b1,
            b2=o.b2,
            eps=o.eps,
            weight_decay=o.weight_decay,
            mask=decay_mask,
        ),
    )
