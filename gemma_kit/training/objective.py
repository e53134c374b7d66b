"""What a run optimises: the loss, the data of each step, and the objective's own state.

The run loop (gemma_kit.training.loop.run) owns everything that every objective shares: the
model and its trained variables, the compiled step, the mesh, checkpoints and --resume, Ctrl-C,
the NaN stop, metrics.jsonl, loss.png, summary.json and the final adapter/ or model/ folder. An
objective subclasses `Objective` and supplies the rest; the hooks run in this order:

    check_inputs(config)           before loading the model: report missing files early
    prepare(context) -> steps      load data (and e.g. a teacher); the number of steps; may
                                   replace context.model by what trains (a head around it)
    --- the Trainer is built with `loss`, training the variables `trainable(config)` selects ---
    restore_state(arrays, info)    on --resume: what checkpoint_state saved
    evaluate(trainer)              held-out metrics before training (fresh runs only)
    for each step s:
        host_batch(s, trainer)     host arrays [grad_accum, micro_batch, ...] (on-policy
                                   objectives draw rollouts here from trainer.trainable)
        frozen(s, trainer)         the frozen pytrees of step s (arguments of the step)
        step_metrics(metrics)      the row written to metrics.jsonl (after the shared fields)
        after_step(s, trainer, m)  e.g. update an EMA anchor from trainer.trainable
        evaluate(trainer)          every eval_every steps
        checkpoint_state(s + 1)    (arrays, JSON info) saved with each checkpoint
    evaluate(trainer), save_result(...), plots(...), summary()   at the end

Determinism: a resumed run is bit-identical to an uninterrupted one when host_batch(s) and
frozen(s) are pure functions of s and of the state checkpoint_state saves (draw randomness
from (seed, s), e.g. jax.random.fold_in(key, s), never from a counter that is not saved).

Frozen pytrees are ARGUMENTS of the compiled step: they may change every step (new anchor
values, another teacher of the same shapes) without compiling again, as long as their shapes,
dtypes and structure stay the same. They must not alias trainer.trainable, whose buffers the
step donates: copy (jnp.copy) what is taken from it.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np

from gemma_kit.training.config import TrainConfig
from gemma_kit.training.model import trainable_filter
from gemma_kit.training.step import LossFn


@dataclasses.dataclass
class RunContext:
    """What prepare() gets: the run's settings, the model to train, and where to report."""

    config: TrainConfig
    model: Any  # the model about to be trained (LoRA added; not yet split); prepare may replace it
    tokenizer: Any
    out_dir: pathlib.Path
    lead: bool  # process 0: the one that writes files and prints
    say: Callable[[str], None]  # a line to stderr (lead process, progress on)


class Objective:
    """Base class of objectives: every hook has a default but `prepare` and `host_batch`.

    Attributes a subclass sets:
      name      what the progress bar says ("fine-tuning", "distillation", ...)
      loss      the loss function (gemma_kit.training.losses): hashable, since it keys the
                compiled step
      eval_key  the held-out metric reported as TrainResult.eval_before / eval_after
      stats     a dict of facts about the data, returned as TrainResult.stats
    """

    name: str = "training"
    loss: LossFn
    eval_key: str = "eval_loss"
    loss_label: str = "loss"  # the y axis of loss.png
    stats: dict[str, Any]  # optional

    def check_inputs(self, config: TrainConfig) -> None:
        """Raises (a gemma_kit error) for inputs that are missing, before the model loads."""

    def prepare(self, context: RunContext) -> int:
        """Loads what the objective needs; returns the number of optimizer steps of the run."""
        raise NotImplementedError

    def host_batch(self, step: int, trainer) -> dict[str, np.ndarray]:
        """The host arrays of optimizer step `step`, [grad_accum, micro_batch, ...] each.

        `trainer` holds the current parameters (trainer.trainable, trainer.model()): an
        on-policy objective samples its rollouts from them here.
        """
        raise NotImplementedError

    def frozen(self, step: int, trainer) -> Any:
        """The frozen pytrees the loss gets at step `step` (None: none)."""
        return None

    def trainable(self, config: TrainConfig):
        """The nnx filter of the variables the step trains. Default: the LoRA factors, or every
        text-model Param (gemma_kit.training.model.trainable_filter); an objective whose model
        has parts of its own (a reward head) adds them."""
        return trainable_filter(config)

    def count_tokens(self, batch: dict[str, np.ndarray]) -> int:
        """Tokens the step processes (for tokens/s): non-padding slots of packed rows."""
        if "segments" in batch:
            return int((batch["segments"] > 0).sum())
        return int(np.size(batch["tokens"])) if "tokens" in batch else 0

    def step_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """The objective's part of a metrics.jsonl row, from the step's metrics (loss,
        grad_norm, normaliser and the loss function's sums). Default: the loss's sums."""
        return {k: v for k, v in metrics.items() if k not in ("loss", "grad_norm", "normaliser")}

    def after_step(self, step: int, trainer, metrics: dict[str, float]) -> None:
        """Runs after optimizer step `step` (0-based) has updated trainer.trainable."""

    def evaluate(self, trainer) -> dict[str, float]:
        """Held-out metrics under the current parameters ({} when there is nothing held out)."""
        return {}

    def checkpoint_state(self, step: int) -> tuple[Any, dict]:
        """(pytree of arrays or None, JSON dict) saved with checkpoint `step` (steps done)."""
        return None, {}

    def restore_state(self, arrays: Any, info: dict) -> None:
        """Takes back what checkpoint_state saved (arrays as jax arrays), on --resume."""

    def fingerprint(self) -> str | None:
        """The identity of the data; a resumed run refuses data whose fingerprint changed."""
        return None

    def save_result(
        self, model, tokenizer, out_dir: pathlib.Path, base: str
    ) -> pathlib.Path | None:
        """Writes the trained model in the objective's own format (process 0, at the end) and
        returns its folder; None (the default): the core writes adapter/ or model/."""
        return None

    def plots(self, metrics_path: pathlib.Path, out_dir: pathlib.Path) -> dict[str, Any]:
        """Plots beyond loss.png, written at the end: {name: path}."""
        return {}

    def summary(self) -> dict[str, Any]:
        """Entries the objective adds to summary.json."""
        return {}
