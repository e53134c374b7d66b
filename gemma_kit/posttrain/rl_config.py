"""The settings of an RL run (REINFORCE / RLOO, BOND / J-BOND): TrainConfig plus the rollout,
reward, KL and BOND fields, read from TOML or JSON like every training config.

    config = RLConfig.from_file("posttrain/configs/rl_rloo.toml")
    config = RLConfig(prompts_file="prompts.jsonl", reward="my_rewards:score", out_dir="runs/rl",
                      steps=50, algo="rloo", num_samples=4, kl_coef=0.05, anchor="ema")

`batch_size` counts PROMPTS per optimizer step; each prompt gives `num_samples` rollouts (and,
for BOND, anchor_samples / best_of more rows: the best of each group of `best_of` anchor
samples), so a step trains on
batch_size x rows_per_prompt rows, split into grad_accum micro-batches (`micro_batch` counts
rows). See gemma_kit.posttrain.rl for what each setting does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

from gemma_kit.errors import ConfigError
from gemma_kit.training.config import TrainConfig

ALGOS = ("rloo", "reinforce", "bond", "jbond")
ANCHORS = ("reference", "ema")
KL_PENALTIES = ("reward", "loss")
NORMALISERS = ("sequences", "tokens")
JBOND_REWARDS = ("paper", "quantile")
# kl_coef when it is not set: TRL's RLOOConfig default for the policy-gradient algorithms;
# 1 for BOND, whose backward reward (N - 1) log p<= - (log pi - log pi_anchor) is the gradient
# of KL(pi || pi_BoN) with exactly that coefficient (BOND section 4.2).
DEFAULT_KL_COEF = {"rloo": 0.05, "reinforce": 0.05, "bond": 1.0, "jbond": 1.0}


@dataclasses.dataclass(frozen=True)
class RLConfig(TrainConfig):
    """Every setting of an RL run; the fields of TrainConfig keep their meaning except
    batch_size (prompts per step), max_length (the longest prompt + max_new_tokens allowed) and
    eval_max_rows (held-out prompts evaluated). train_file, eval_file and packing are unused."""

    PATH_FIELDS: ClassVar[tuple[str, ...]] = TrainConfig.PATH_FIELDS + (
        "prompts_file",
        "eval_prompts_file",
    )
    RESUME_FIELDS: ClassVar[tuple[str, ...]] = TrainConfig.RESUME_FIELDS + (
        "prompts_file",
        "eval_prompts_file",
        "algo",
        "num_samples",
        "max_new_tokens",
        "stop_token_ids",
        "anchor",
        "best_of",
        "anchor_samples",
        "ppo_epochs",
    )

    # Prompts and rewards.
    prompts_file: str = ""  # JSONL prompts (gemma_kit.posttrain.prompts)
    eval_prompts_file: str | None = None  # default: hold out eval_fraction of prompts_file
    reward: str = ""  # "pkg.module:function" or "rm:DIR"; the Python API also takes a callable
    reward_timeout: float = 120.0  # seconds a reward worker may take for one call

    # Rollouts: temperature 1, no filters (the on-policy distribution).
    num_samples: int = 4  # k: rollouts per prompt
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] | None = None  # default: <eos> and <end_of_turn>

    # The objective.
    algo: str = "rloo"  # rloo | reinforce | bond | jbond
    kl_coef: float | None = None  # beta; default 0.05 (rloo, reinforce) or 1 (bond, jbond)
    kl_penalty: str = "reward"  # reward: beta * sum k1 off each reward; loss: beta * k3 per token
    anchor: str = "reference"  # the KL's other side: reference (the initial model) | ema
    ema_rate: float = 0.01  # mu: anchor <- (1 - mu) anchor + mu policy
    anchor_every: int = 1  # optimizer steps between anchor updates
    loss_normaliser: str = "sequences"  # sequences | tokens (what the loss is a mean over)
    ppo_epochs: int = 1  # optimizer steps on each batch of rollouts
    clip_epsilon: float | None = None  # PPO clipping of pi / pi_behaviour (None: no clipping)

    # BOND (algo bond / jbond).
    best_of: int = 2  # N of Best-of-N (J-BOND: 2)
    anchor_samples: int | None = None  # per prompt, a multiple of best_of; default best_of
    jeffreys_beta: float = 0.5  # 0: forward KL only (SFT on Best-of-N), 1: backward only
    jbond_reward: str = "paper"  # paper (-log 16 when worse than both) | quantile
    quantile_smoothing: str = "laplace"  # p<= from counts: laplace | none

    # Held-out evaluation (before, every eval_every steps, after).
    eval_samples: int = 4  # rollouts per held-out prompt
    log_samples: int = 8  # completions written to samples.jsonl per evaluation

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    # -- derived ---------------------------------------------------------------------------
    @property
    def is_bond(self) -> bool:
        return self.algo in ("bond", "jbond")

    @property
    def resolved_kl_coef(self) -> float:
        return DEFAULT_KL_COEF[self.algo] if self.kl_coef is None else float(self.kl_coef)

    @property
    def resolved_anchor_samples(self) -> int:
        return self.best_of if self.anchor_samples is None else self.anchor_samples

    @property
    def forward_rows(self) -> bool:
        """Whether a step trains on Best-of-N anchor samples (BOND's forward part)."""
        return self.is_bond and self.jeffreys_beta < 1.0

    @property
    def best_of_groups(self) -> int:
        """Best-of-N samples per prompt for the forward part: anchor_samples / best_of."""
        return self.resolved_anchor_samples // self.best_of

    @property
    def rows_per_prompt(self) -> int:
        return self.num_samples + (self.best_of_groups if self.forward_rows else 0)

    @property
    def micro_batch(self) -> int:
        """Rows per micro-batch: (batch_size / grad_accum) prompts x rows_per_prompt."""
        return self.batch_size // self.grad_accum * self.rows_per_prompt

    # -- checking --------------------------------------------------------------------------
    def validate_data(self) -> None:
        if not self.prompts_file:
            raise ConfigError('prompts_file is required (a JSONL file of {"prompt": ...} rows)')

    def validate(self) -> RLConfig:
        super().validate()

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        def integer(name: str, low: int) -> None:
            value = getattr(self, name)
            need(
                isinstance(value, int) and not isinstance(value, bool) and value >= low,
                f"{name} must be an integer >= {low}, got {value!r}",
            )

        def number(value) -> bool:
            return (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
            )

        need(self.algo in ALGOS, f"algo must be one of {', '.join(ALGOS)}, got {self.algo!r}")
        for name in ("num_samples", "max_new_tokens", "anchor_every", "ppo_epochs", "eval_samples"):
            integer(name, 1)
        integer("log_samples", 0)
        need(
            self.algo != "rloo" or self.num_samples >= 2,
            f"RLOO needs num_samples (k) >= 2 rollouts per prompt: each one's baseline is the "
            f'mean reward of the others; got k = {self.num_samples} (use algo = "reinforce" '
            "for one sample per prompt)",
        )
        need(
            self.kl_coef is None or (number(self.kl_coef) and self.kl_coef >= 0),
            f"kl_coef (the KL coefficient beta) must be a number >= 0, got {self.kl_coef!r}",
        )
        need(
            self.kl_penalty in KL_PENALTIES,
            f"kl_penalty must be reward or loss, got {self.kl_penalty!r}",
        )
        need(self.anchor in ANCHORS, f"anchor must be reference or ema, got {self.anchor!r}")
        need(
            number(self.ema_rate) and 0 <= self.ema_rate <= 1,
            f"ema_rate must lie in [0, 1], got {self.ema_rate!r}",
        )
        need(
            self.loss_normaliser in NORMALISERS,
            f"loss_normaliser must be sequences or tokens, got {self.loss_normaliser!r}",
        )
        need(
            self.clip_epsilon is None or (number(self.clip_epsilon) and self.clip_epsilon > 0),
            f"clip_epsilon must be > 0 (or unset: no clipping), got {self.clip_epsilon!r}",
        )
        need(
            number(self.reward_timeout) and self.reward_timeout > 0,
            f"reward_timeout must be > 0 seconds, got {self.reward_timeout!r}",
        )
        need(
            self.stop_token_ids is None
            or all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0
                for i in self.stop_token_ids
            ),
            f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}",
        )
        need(
            self.max_new_tokens < self.max_length,
            f"max_new_tokens ({self.max_new_tokens}) must be below max_length "
            f"({self.max_length}), which bounds prompt + completion",
        )
        need(
            not self.distributed,
            "RL runs on one process (any number of its devices); distributed = true is not "
            "supported for RL yet",
        )
        integer("best_of", 2)
        need(
            self.anchor_samples is None
            or (
                isinstance(self.anchor_samples, int)
                and not isinstance(self.anchor_samples, bool)
                and self.anchor_samples >= self.best_of
                and self.anchor_samples % self.best_of == 0
            ),
            f"anchor_samples must be a multiple of best_of ({self.best_of}), got "
            f"{self.anchor_samples!r}",
        )
        need(
            number(self.jeffreys_beta) and 0 <= self.jeffreys_beta <= 1,
            f"jeffreys_beta must lie in [0, 1], got {self.jeffreys_beta!r}",
        )
        need(
            self.jbond_reward in JBOND_REWARDS,
            f"jbond_reward must be paper or quantile, got {self.jbond_reward!r}",
        )
        need(
            self.quantile_smoothing in ("laplace", "none"),
            f"quantile_smoothing must be laplace or none, got {self.quantile_smoothing!r}",
        )
        if self.is_bond:
            need(
                self.algo != "jbond" or (self.best_of == 2 and self.anchor_samples in (None, 2)),
                "J-BOND draws n = 2 anchor samples per prompt: keep best_of = 2 (and "
                'anchor_samples unset), or use algo = "bond"',
            )
            need(
                self.kl_penalty == "reward",
                "BOND's KL to the anchor is part of its backward reward: use kl_penalty = "
                '"reward"',
            )
            need(
                self.clip_epsilon is None and self.ppo_epochs == 1,
                "BOND trains on each batch once, without PPO clipping (its forward part is "
                "maximum likelihood of anchor samples, which a policy ratio does not apply "
                "to): unset clip_epsilon and keep ppo_epochs = 1",
            )
            need(
                self.loss_normaliser == "sequences",
                "BOND's Jeffreys mix is a sum of two sequence-level KL divergences: use "
                'loss_normaliser = "sequences"',
            )
        return self
