"""Training a reward model (Bradley-Terry) as one objective on the training core.

    from gemma_kit.posttrain.reward_train import RewardConfig, train_reward_model
    result = train_reward_model(RewardConfig(train_file="prefs.jsonl", out_dir="runs/rm",
                                             steps=100))
    rm = load_reward_model(result.model_dir)              # OUT_DIR/reward_model

The command line is `gemma-kit reward train --config FILE [--resume] [--set key=value ...]`.

The network is gemma_kit.posttrain.reward_model.RewardTransformer: the base (LoRA, QLoRA or full,
as `method` says) with a scalar head on the final-normed hidden state of the last real token;
the head always trains in full beside the LoRA factors. The head starts at zero (head_init_std
draws it instead): every reward is 0 and the loss log 2 before the first step. The loss is
reward_model.reward_loss: TRL's RewardTrainer's -log sigmoid(r_chosen - r_rejected - margin)
per pair (use_margin: each row's "margin", 0 where absent), plus center_coefficient *
(r_chosen + r_rejected)^2 (reward centering, Eisenstein et al. 2023; 0.01 suggested; 0 = off),
summed over the pairs of a step and divided by their number.

Pairs: gemma_kit.posttrain.preference_training (train_file, eval_file or a split; the pair order
a pure function of (data_seed, step), so --resume is bit-identical). Held-out metrics before,
every eval_every steps and after: eval_accuracy (chosen scored strictly above rejected, TRL's
count), eval_loss, eval_margin, eval_chosen_reward, eval_rejected_reward.

OUT_DIR receives what every run writes (config.json, checkpoints/, metrics.jsonl with per-step
accuracy, margin and rewards, loss.png, summary.json), accuracy.png, and reward_model/: the
reward model folder (RewardModel.save: a LoRA adapter over the base it names, or a full
backbone, and the head), which `gemma-kit reward score --rm`, `rm:DIR` reward specs and
RewardModel.export_hf read. WARM trains several of these from one initialisation and averages
them: gemma_kit.posttrain.warm.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from typing import Any, ClassVar

import numpy as np

from gemma_kit.errors import ConfigError
from gemma_kit.posttrain.preference_training import (
    PreferenceConfig,
    PreferenceData,
    check_preference_files,
    held_out_batches,
    load_preference_data,
    pair_token_count,
)
from gemma_kit.posttrain.reward_model import (
    TRAINABLE,
    RewardModel,
    RewardTransformer,
    reward_loss,
)
from gemma_kit.training.config import TrainConfig
from gemma_kit.training.loop import TrainResult, run
from gemma_kit.training.model import trainable_filter
from gemma_kit.training.objective import Objective, RunContext

RESULT_DIR = "reward_model"


@dataclasses.dataclass(frozen=True)
class RewardConfig(PreferenceConfig):
    """The settings of a reward-model run: every TrainConfig / PreferenceConfig field, plus

    use_margin: subtract each pair's "margin" from the reward difference (TRL's margin column).
    center_coefficient: weight of the reward-centering term (0 = off; 0.01 suggested).
    head_init_std: the head's initial N(0, std^2) draw (0: zeros, the default; drawn from
      `seed`, so WARM's members still share it).
    """

    use_margin: bool = True
    center_coefficient: float = 0.0
    head_init_std: float = 0.0

    RESUME_FIELDS: ClassVar[tuple[str, ...]] = PreferenceConfig.RESUME_FIELDS + ("head_init_std",)

    def validate(self) -> RewardConfig:
        super().validate()
        if not isinstance(self.use_margin, bool):
            raise ConfigError(f"use_margin must be true or false, got {self.use_margin!r}")
        for name in ("center_coefficient", "head_init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
        return self


@dataclasses.dataclass(frozen=True)
class BradleyTerryLoss:
    """reward_model.reward_loss as the core's loss function (hashable: it keys the step)."""

    use_margin: bool = True
    center_coefficient: float = 0.0

    def __call__(self, model, batch, frozen=None):
        return reward_loss(
            model,
            batch,
            frozen,
            use_margin=self.use_margin,
            center_coefficient=self.center_coefficient or None,
        )


def pair_means(sums: dict[str, float], pairs: float, prefix: str = "") -> dict[str, float]:
    """Metric sums over `pairs` pairs -> means, named with `prefix`."""
    return {f"{prefix}{k}": v / max(pairs, 1.0) for k, v in sums.items()}


class RewardTraining(Objective):
    """A reward model trained with the Bradley-Terry loss on preference pairs (module doc)."""

    name = "reward model"
    eval_key = "eval_accuracy"
    loss_label = "Bradley-Terry loss (nats / pair)"

    config: RewardConfig
    data: PreferenceData  # set by prepare

    def __init__(self, *, given_model: bool = False):
        self.given_model = given_model
        self.stats: dict[str, Any] = {}
        self.saved: pathlib.Path | None = None

    def check_inputs(self, config: TrainConfig) -> None:
        check_preference_files(config)

    def prepare(self, context: RunContext) -> int:
        config = context.config
        if not isinstance(config, RewardConfig):
            raise ConfigError("reward-model training takes a RewardConfig")
        return self.prepare_with(context, load_preference_data(config, context.tokenizer))

    def prepare_with(self, context: RunContext, data: PreferenceData) -> int:
        """prepare() with the pairs given (tests, notebooks): the head and the loss."""
        config = context.config
        if not isinstance(config, RewardConfig):
            raise ConfigError("reward-model training takes a RewardConfig")
        self.config, self.pad_id = config, context.tokenizer.pad_id
        self.data = data
        self.stats = self.data.stats
        context.model = RewardTransformer(
            context.model, pad_id=self.pad_id, init_std=config.head_init_std, seed=config.seed
        )
        self.loss = BradleyTerryLoss(config.use_margin, float(config.center_coefficient))
        s = self.data.stats
        context.say(
            f"data: {s['train_pairs']} training pairs, {s['eval_pairs']} held out "
            f"(sequences of up to {s['train_length']} tokens; {s['skipped']} skipped)"
        )
        return self.data.total_steps(config)

    def trainable(self, config: TrainConfig):
        # The head (HeadParam, an nnx.Param) trains in full beside the LoRA factors.
        return TRAINABLE["lora"] if config.trains_lora else trainable_filter(config)

    def host_batch(self, step: int, trainer=None) -> dict[str, np.ndarray]:
        return self.data.step_batch(step, self.config)

    def count_tokens(self, batch: dict[str, np.ndarray]) -> int:
        return pair_token_count(batch, self.pad_id)

    def step_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        sums = {k: metrics[k] for k in ("accuracy", "margin", "chosen_reward", "rejected_reward")}
        return pair_means(sums, metrics["normaliser"])

    def evaluate(self, trainer) -> dict[str, float]:
        if self.data.eval is None:
            return {}
        loss = pairs = 0.0
        sums: dict[str, float] = {}
        for batch in held_out_batches(
            self.data.eval, self.config.micro_batch, limit=self.config.eval_max_rows
        ):
            s, n, m = trainer.loss_sums(trainer.place(batch, batch_axis=0))
            loss, pairs = loss + s, pairs + n
            sums = {k: sums.get(k, 0.0) + v for k, v in m.items()}
        return dict(eval_loss=loss / pairs, **pair_means(sums, pairs, "eval_"))

    def checkpoint_state(self, step: int):
        return None, dict(
            pairs_seen=step * self.config.batch_size,
            epoch=step * self.config.batch_size / len(self.data.train),
        )

    def fingerprint(self) -> str:
        return self.data.fingerprint

    def save_result(self, model, tokenizer, out_dir, base) -> pathlib.Path | None:
        """OUT_DIR/reward_model. A LoRA reward model is an adapter over the base it names:
        the base the run loaded, or, for a model passed in, config.base when that is a
        checkpoint folder; otherwise (a base nobody could reload) it is saved merged, as a full
        backbone."""
        import jax

        if jax.process_count() > 1 and not self.config.trains_lora:
            return None  # the core says why a multi-process full run writes no model folder
        recorded = base
        if self.given_model:
            candidate = self.config.base
            recorded = (
                candidate
                if candidate != "default" and pathlib.Path(candidate).expanduser().is_dir()
                else None
            )
        rm = RewardModel(model, tokenizer, base=recorded)
        if rm.method == "lora" and recorded is None:
            print(
                "note: the model passed in names no base checkpoint (config.base); the "
                "reward model is saved with its adapter merged into a full backbone",
                file=sys.stderr,
            )
            rm = rm.merged()
        self.saved = rm.save(out_dir / RESULT_DIR, overwrite=True)
        return self.saved

    def plots(self, metrics_path, out_dir) -> dict[str, Any]:
        from gemma_kit.training.metrics import plot_metrics

        png = plot_metrics(
            metrics_path,
            out_dir / "accuracy.png",
            {"accuracy": "training pairs", "eval_accuracy": "held-out pairs"},
            ylabel="pairwise accuracy",
            smooth=("accuracy",),
            markers=("eval_accuracy",),
        )
        return {"accuracy": png} if png else {}

    def summary(self) -> dict[str, Any]:
        return dict(data=self.stats, reward_model=self.saved)


def train_reward_model(
    config: RewardConfig, *, model=None, tokenizer=None, resume: bool = False
) -> TrainResult:
    """Runs (or resumes) a reward-model run as `config` describes (see the module docstring);
    result.model_dir is the reward model folder, result.model the trained RewardTransformer.

    model / tokenizer: the base model to train instead of loading `config.base` (tests,
    notebooks); LoRA is added to it unless it has some. Name its checkpoint folder in
    config.base so that the saved LoRA reward model can reload it.
    """
    return run(
        config,
        RewardTraining(given_model=model is not None),
        model=model,
        tokenizer=tokenizer,
        resume=resume,
    )
