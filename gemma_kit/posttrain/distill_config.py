"""The settings of a distillation run: DistillConfig, TrainConfig plus the teacher, the data mix
and the divergence (see gemma_kit.posttrain.distill and docs/post-training-distill.md).

    config = DistillConfig.from_file("posttrain/configs/distill_gkd.toml")
    config = DistillConfig(base="students/half", teacher="default", prompts_file="p.jsonl",
                           out_dir="runs/gkd", steps=40, lmbda=1.0, divergence="jsd", beta=0.5)

`base` is the student (a checkpoint folder, e.g. one `gemma-kit shrink` wrote, or "default"),
trained by `method` (LoRA, QLoRA or full) as in fine-tuning; every TrainConfig field keeps its
meaning. `teacher` is a checkpoint folder, "default" (the embedded Gemma 3 270M) or "base" (the
student's own base network: with LoRA the adapter switched off, no second copy of the weights;
with `teacher_prefix` this is context distillation).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from gemma_kit.errors import ConfigError
from gemma_kit.training.config import TrainConfig

# Teacher values that name a model rather than a folder (not resolved as paths).
TEACHER_KEYWORDS = ("default", "base")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "alpha", "sampled_topk")
TEACHER_SAMPLES = ("fresh", "fixed")
REDUCTIONS = ("token-mean", "sequence-mean")


@dataclasses.dataclass(frozen=True)
class DistillConfig(TrainConfig):
    """Every TrainConfig field, and:

    teacher             checkpoint folder, "default" or "base" (required)
    teacher_prefix      text the teacher sees before each prompt, the student not (context
                        distillation): prepended to a {"prompt"}, or as the system prompt of a
                        {"messages"} prompt (before an existing one)
    prompts_file        JSONL prompts, {"prompt": str} or {"messages": [...]} ending with a
                        user turn (chat format applied), for student and teacher samples
    eval_prompts_file   held-out prompts (default: eval_fraction of prompts_file)
    train_file          finetune's JSONL rows: the dataset outputs of the off-policy steps
                        (supervised KD); its held-out split gives eval_data_* metrics
    lmbda               fraction of steps on student samples (on-policy, GKD's lambda); the
                        other steps use the dataset outputs, or teacher samples with seq_kd
    seq_kd              off-policy steps on teacher samples (sequence-level KD) rather than
                        on train_file's outputs
    teacher_samples     "fresh" (drawn at each step from (seed, step)) or "fixed" (drawn once
                        per prompt at the start: a fixed offline dataset)
    num_samples         completions per prompt in a step (batch_size must be a multiple)
    max_new_tokens      completion length of student and teacher samples
    sample_temperature  temperature of student and teacher samples (no filters)
    divergence          forward_kl KL(teacher || student), reverse_kl KL(student || teacher),
                        jsd (generalised JSD(beta), TRL's endpoints), alpha (2501.18537's
                        alpha-divergence loss, teacher probabilities as target), sampled_topk
                        (Gemma 3's sampled top-K targets: cross-entropy to K ids drawn per
                        position, renormalised)
    beta, alpha, topk   the divergence's parameter (jsd / alpha / sampled_topk)
    topk_targets        sampled_topk only: a file of (ids, probs) per position written once
                        (offline, lmbda = 0); the run writes it first when it is missing
    loss_temperature    divides both models' logits in the loss (no tau^2 factor)
    reduction           token-mean (over every completion token of a step) or sequence-mean
                        (each completion's mean, then the mean over completions)
    eval_samples        student samples per held-out prompt at each evaluation (and teacher
                        samples, drawn once)
    golden_teacher      a second teacher for the teacher-hacking probe (held-out KLs only)
    golden_prefix       the golden teacher's hidden prefix
    loss_chunk          positions per logits chunk; 128 here, not finetune's 1024: a divergence
                        makes several [chunk, V] float32 arrays per chunk (two models'), and
                        on the 2-core CPU the KD step ran fastest at 128 (3.0 s per 512 tokens,
                        against 3.2-3.6 s at 1024; benchmarks/bench_distill.py --chunk)
    """

    train_file: str = ""
    teacher: str = ""
    teacher_prefix: str = ""
    prompts_file: str = ""
    eval_prompts_file: str | None = None
    lmbda: float = 1.0
    seq_kd: bool = False
    teacher_samples: str = "fresh"
    num_samples: int = 1
    max_new_tokens: int = 64
    sample_temperature: float = 1.0
    divergence: str = "jsd"
    beta: float = 0.5
    alpha: float = 1.5
    topk: int = 256
    topk_targets: str | None = None
    loss_temperature: float = 1.0
    reduction: str = "token-mean"
    eval_samples: int = 4
    golden_teacher: str | None = None
    golden_prefix: str = ""
    loss_chunk: int = 128

    PATH_FIELDS: ClassVar[tuple[str, ...]] = TrainConfig.PATH_FIELDS + (
        "teacher",
        "prompts_file",
        "eval_prompts_file",
        "topk_targets",
        "golden_teacher",
    )
    RESUME_FIELDS: ClassVar[tuple[str, ...]] = TrainConfig.RESUME_FIELDS + (
        "teacher",
        "teacher_prefix",
        "prompts_file",
        "eval_prompts_file",
        "lmbda",
        "seq_kd",
        "teacher_samples",
        "num_samples",
        "max_new_tokens",
        "sample_temperature",
        "divergence",
        "beta",
        "alpha",
        "topk",
        "topk_targets",
        "loss_temperature",
        "reduction",
    )

    @classmethod
    def from_dict(
        cls, values: dict[str, Any], *, base_dir=None, source: str = "config"
    ) -> DistillConfig:
        """TrainConfig.from_dict, keeping the teacher keywords ("default", "base") as they
        are rather than reading them as paths relative to the config file."""
        keywords = {
            k: values[k] for k in ("teacher", "golden_teacher") if values.get(k) in TEACHER_KEYWORDS
        }
        config = super().from_dict(values, base_dir=base_dir, source=source)
        return config.replace(**keywords) if keywords else config  # type: ignore[return-value]

    # -- derived ----------------------------------------------------------------------------
    @property
    def uses_prompts(self) -> bool:
        """Whether steps draw samples from prompts (on-policy steps, or seq_kd)."""
        return self.lmbda > 0 or self.seq_kd

    @property
    def uses_dataset(self) -> bool:
        """Whether off-policy steps take train_file's outputs."""
        return self.lmbda < 1 and not self.seq_kd

    @property
    def offline_topk(self) -> bool:
        return self.divergence == "sampled_topk" and self.topk_targets is not None

    # -- checks -----------------------------------------------------------------------------
    def validate_data(self) -> None:
        if self.uses_prompts and not self.prompts_file:
            raise ConfigError(
                "prompts_file is required when steps draw samples (lmbda > 0 or seq_kd): a "
                'JSONL file of {"prompt": ...} or {"messages": [...]} rows'
            )
        if self.uses_dataset and not self.train_file:
            raise ConfigError(
                f"train_file is required: with lmbda = {self.lmbda} some steps are off-policy, "
                "on the outputs of train_file's rows (or set seq_kd = true to use teacher "
                "samples instead)"
            )

    def validate(self) -> DistillConfig:
        super().validate()

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(
            bool(self.teacher),
            "teacher is required: a checkpoint folder, 'default' (the embedded Gemma 3 270M) "
            "or 'base' (the student's own base model, e.g. with teacher_prefix for context "
            "distillation)",
        )
        for name in ("lmbda", "beta"):
            value = getattr(self, name)
            need(
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and 0.0 <= value <= 1.0,
                f"{name} must lie in [0, 1], got {value!r}",
            )
        need(
            self.divergence in DIVERGENCES,
            f"divergence must be one of {', '.join(DIVERGENCES)}, got {self.divergence!r}",
        )
        need(
            isinstance(self.alpha, (int, float)) and self.alpha >= 1.0,
            f"alpha must be >= 1 (1.5: entmax, 2: sparsemax), got {self.alpha!r}",
        )
        need(
            isinstance(self.topk, int) and not isinstance(self.topk, bool) and self.topk >= 1,
            f"topk (K sampled teacher ids per position) must be an integer >= 1, got {self.topk!r}",
        )
        need(
            self.teacher_samples in TEACHER_SAMPLES,
            f"teacher_samples must be fresh or fixed, got {self.teacher_samples!r}",
        )
        need(
            self.reduction in REDUCTIONS,
            f"reduction must be token-mean or sequence-mean, got {self.reduction!r}",
        )
        for name in ("num_samples", "max_new_tokens", "eval_samples"):
            value = getattr(self, name)
            need(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"{name} must be an integer >= 1, got {value!r}",
            )
        for name in ("sample_temperature", "loss_temperature"):
            value = getattr(self, name)
            need(
                isinstance(value, (int, float)) and value > 0, f"{name} must be > 0, got {value!r}"
            )
        need(
            not self.uses_prompts or self.batch_size % self.num_samples == 0,
            f"batch_size ({self.batch_size}) must be a multiple of num_samples "
            f"({self.num_samples}): each step samples batch_size / num_samples prompts",
        )
        need(
            not (self.teacher_prefix and self.uses_dataset),
            "teacher_prefix is for prompts: with lmbda < 1 and seq_kd = false the off-policy "
            "steps use train_file's rows, which the teacher sees as they are; set seq_kd = "
            "true, or lmbda = 1",
        )
        if self.topk_targets is not None:
            need(
                self.divergence == "sampled_topk",
                'topk_targets (offline targets) needs divergence = "sampled_topk"',
            )
            need(
                self.lmbda == 0,
                f"offline top-K targets are written once for fixed sequences, so every step "
                f"must be off-policy: set lmbda = 0 (got {self.lmbda})",
            )
            need(
                not self.seq_kd or self.teacher_samples == "fixed",
                'offline top-K targets on teacher samples need teacher_samples = "fixed" '
                "(samples drawn once)",
            )
        return self
