"""The one training core: every objective (fine-tuning, distillation, DPO, RL, ...) runs on it.

    from gemma_kit.training import Objective, run
    result = run(config, MyObjective())          # config: TrainConfig or a subclass

An objective supplies a loss function `(model, batch, frozen) -> (loss_sum, normaliser,
metrics)`, the host batch and the frozen pytrees of each step, and optionally an after-step hook,
extra checkpoint state, a held-out evaluation and plots. The core supplies the rest: one compiled
step per objective (gradient accumulation that sums and divides once by the explicit normaliser,
clipping, AdamW with warmup and cosine decay, the data x fsdp mesh, donation; frozen pytrees are
arguments, so new values do not compile again), Orbax checkpoints with bit-identical --resume,
Ctrl-C/SIGTERM save, NaN stop, metrics.jsonl, plots, summary.json and the final adapter/ or
model/ folder, on one process or many (jax.distributed).

Modules, in the order a run uses them:
    config.py      TrainConfig: the settings, the base class of every objective's config
    model.py       build_model (base, LoRA / QLoRA / full), the trainable filter, save_full
    losses.py      loss functions on packed rows: CrossEntropy (SFT), SignedCrossEntropy
                   (signed token weights over a given normaliser: the policy-gradient form)
    optimizer.py   make_optimizer: clipping + AdamW, warmup + cosine
    step.py        train_step over any loss, compiled once per objective (compiled_step)
    trainer.py     Trainer: variables and optimizer state on devices, placement, checkpoints
    objective.py   Objective: the hooks an objective implements
    loop.py        run: the loop; TrainResult
    metrics.py     metrics.jsonl and PNG plots

Needs the [finetune] extra (optax; matplotlib for the plots).
"""

from gemma_kit.training.config import TrainConfig
from gemma_kit.training.loop import TrainResult, initialize_distributed, run
from gemma_kit.training.losses import CrossEntropy, SignedCrossEntropy
from gemma_kit.training.objective import Objective, RunContext
from gemma_kit.training.step import LossFn
from gemma_kit.training.trainer import Trainer, micro_batches

__all__ = [
    "CrossEntropy",
    "LossFn",
    "Objective",
    "RunContext",
    "SignedCrossEntropy",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "initialize_distributed",
    "micro_batches",
    "run",
]
