"""The optimizer of every run: AdamW after global-norm clipping, linear warmup, cosine decay."""

from __future__ import annotations

try:
    import optax
except ImportError as err:  # optax is an extra: the core package does not need it
    raise ImportError("training needs optax: pip install 'gemma-kit[finetune]'") from err

from gemma_kit.training.config import TrainConfig

# The settings make_optimizer reads (with the number of steps): the key of a compiled step.
OPTIMIZER_FIELDS = (
    "learning_rate",
    "warmup_steps",
    "min_lr_fraction",
    "max_grad_norm",
    "adam_b1",
    "adam_b2",
    "weight_decay",
)


def optimizer_key(config: TrainConfig) -> tuple:
    """The optimizer settings of `config` as a hashable key (for caching compiled steps)."""
    return tuple((name, getattr(config, name)) for name in OPTIMIZER_FIELDS)


def make_optimizer(config: TrainConfig, steps: int):
    """(optax optimizer, learning-rate schedule) for a run of `steps` optimizer steps.

    AdamW after global-norm clipping; linear warmup to learning_rate, cosine to
    learning_rate * min_lr_fraction at the last step.
    """
    lr = config.learning_rate
    warmup = min(config.warmup_steps, steps)
    schedule = optax.warmup_cosine_decay_schedule(
        # Warmup starts one step in, so that the very first update is not a wasted lr = 0.
        init_value=lr / (warmup + 1),
        peak_value=lr,
        warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1),
        end_value=lr * config.min_lr_fraction,
    )
    optimizer = optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.adamw(
            schedule, b1=config.adam_b1, b2=config.adam_b2, weight_decay=config.weight_decay
        ),
    )
    return optimizer, schedule
