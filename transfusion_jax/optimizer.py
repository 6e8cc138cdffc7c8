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
    opt = cfg.optimizer
    decay_steps = opt.decay_steps or cfg.train.num_steps
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=opt.peak_lr,
        warmup_steps=opt.warmup_steps,
        decay_steps=max(decay_steps, opt.warmup_steps + 1),
        end_value=opt.min_lr,
    )


def decay_mask(params):
    """True for the leaves that get weight decay (see the module docstring)."""

    def is_decayed(path, _):
        return getattr(path[-1], "key", None) in DECAYED_NAMES

    return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(cfg) -> optax.GradientTransformation:
    opt = cfg.optimizer
    return optax.chain(
        optax.clip_by_global_norm(opt.clip_norm),
        optax.adamw(
            learning_rate_schedule(cfg),
            b1=opt.b1,
            b2=opt.b2,
            eps=opt.eps,
            weight_decay=opt.weight_decay,
            mask=decay_mask,
        ),
    )
