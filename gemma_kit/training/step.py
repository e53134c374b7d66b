"""The compiled optimizer step over any loss function, and its cache (one compile per objective).

    step(trainable, opt_state, fixed, frozen, batch) -> (trainable, opt_state, metrics)

trainable: the variables being trained (LoRA factors, or the text model's Params); fixed: the
model's other variables (the base weights); frozen: the objective's pytrees of this step (a
teacher's parameters, a reference's or an EMA anchor's LoRA factors, ...), None when it has none;
batch: host arrays made device arrays, [A, b, ...] for A micro-batches of b rows.

For each micro-batch (a lax.scan when A > 1) the loss function gives (loss_sum, normaliser,
metrics) and the gradient of loss_sum with respect to `trainable`; loss sums, normalisers,
gradients (in float32) and metrics are added up over the micro-batches, and the sums are divided
once by the summed normaliser N. A micro-batches of b rows therefore give the update of one batch
of A * b rows, and the normaliser is whatever the loss says it is (a token count for SFT, a count
of completion tokens or sequences for signed policy-gradient weights), never the weights' sum
behind the loss's back. A step whose N is 0 counts nothing: its loss and update are 0 (N is taken
as 1 instead of dividing by zero).

The gradient is then clipped by global norm and fed to AdamW (gemma_kit.training.optimizer).
metrics of the step: loss (loss_sum / N), grad_norm (of the gradient before clipping),
normaliser (N), and each metric the loss function returned, as its SUM over the micro-batches in
float32 (a loss that wants a mean reports a sum and a count, and the objective divides on the
host).

trainable and opt_state are donated (their buffers are reused for the outputs); fixed and frozen
are arguments, never closed over, so new frozen values of the same shapes and placement run the
same compiled program. The compiled functions are cached by (model structure, loss function,
optimizer settings, number of steps, output placement), so a second run of the same objective in
one process (a resume, a test, a notebook) reuses them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gemma_kit.errors import TrainingError
from gemma_kit.training.config import TrainConfig
from gemma_kit.training.optimizer import make_optimizer

# (model, batch, frozen) -> (loss_sum, normaliser, metrics); see gemma_kit.training.losses.
LossFn = Callable[[Any, dict, Any], tuple[jax.Array, jax.Array, dict]]

STEP_METRICS = ("loss", "grad_norm", "normaliser")


def train_step(graphdef, optimizer, loss_fn: LossFn, trainable, opt_state, fixed, frozen, batch):
    """One optimizer step over batch [A, b, ...] (A micro-batches); see the module docstring."""

    def micro_loss(params, micro):
        loss, normaliser, metrics = loss_fn(nnx.merge(graphdef, params, fixed), micro, frozen)
        return loss, (normaliser, metrics)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def accumulate(carry, micro):
        grads, loss, normaliser, metrics = carry
        (l, (n, m)), g = grad_fn(trainable, micro)
        grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
        metrics = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), metrics, m)
        return (grads, loss + l, normaliser + n, metrics), None

    first = jax.tree.map(lambda x: x[0], batch)
    _, (_, shapes) = jax.eval_shape(micro_loss, trainable, first)
    clash = sorted(set(shapes) & set(STEP_METRICS))
    if clash:
        raise TrainingError(
            f"the loss function returns metrics named {clash}, which the step "
            "reports itself; rename them"
        )
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
    carry = (
        zeros,
        jnp.float32(0),
        jnp.float32(0),
        jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes),
    )
    if jax.tree.leaves(batch)[0].shape[0] == 1:  # no accumulation: no loop
        (grads, loss, normaliser, metrics), _ = accumulate(carry, first)
    else:
        (grads, loss, normaliser, metrics), _ = jax.lax.scan(accumulate, carry, batch)
    divisor = jnp.where(normaliser == 0, jnp.float32(1), normaliser)
    grads = jax.tree.map(lambda g: g / divisor, grads)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    out = dict(
        loss=loss / divisor, grad_norm=optax.global_norm(grads), normaliser=normaliser, **metrics
    )
    return trainable, opt_state, out


def loss_step(graphdef, loss_fn: LossFn, trainable, fixed, frozen, batch):
    """The loss function on one batch [b, ...] without gradients (held-out evaluation)."""
    return loss_fn(nnx.merge(graphdef, trainable, fixed), batch, frozen)


@functools.lru_cache(maxsize=8)
def cached_optimizer(optimizer_settings: tuple, steps: int):
    """make_optimizer for hashable settings (gemma_kit.training.optimizer.optimizer_key): one
    optimizer object per settings, the one the compiled step closes over."""
    return make_optimizer(TrainConfig(steps=steps, **dict(optimizer_settings)), steps)


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """The jitted step and held-out loss of one (model structure, loss, optimizer) triple."""

    optimizer: Any
    schedule: Callable[[int], Any]
    step: Callable  # (trainable, opt_state, fixed, frozen, batch) -> (trainable, opt_state, m)
    loss: Callable  # (trainable, fixed, frozen, batch) -> (loss_sum, normaliser, metrics)


@functools.lru_cache(maxsize=8)
def compiled_step(
    graphdef, loss_fn: LossFn, optimizer_settings: tuple, steps: int, placement: tuple | None = None
) -> CompiledStep:
    """The jitted functions, shared by every run with the same key in this process.

    placement: None (one device), or (treedef, shardings) of the step's (trainable, opt_state)
    outputs: pinned to the inputs' placement, since left free XLA may split a replicated LoRA
    factor in the output, and the second step would compile again for it.
    """
    optimizer, schedule = cached_optimizer(optimizer_settings, steps)
    pinned = {}
    if placement is not None:
        treedef, leaves = placement
        pinned["out_shardings"] = jax.tree.unflatten(treedef, leaves)
    step = jax.jit(
        functools.partial(train_step, graphdef, optimizer, loss_fn), donate_argnums=(0, 1), **pinned
    )
    loss = jax.jit(functools.partial(loss_step, graphdef, loss_fn))
    return CompiledStep(optimizer, schedule, step, loss)
