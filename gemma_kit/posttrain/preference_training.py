"""What the objectives trained on preference pairs share (reward models, DPO): the settings of
such a run, and its data (training and held-out pairs, the pair order of each step, the
fingerprint a resumed run checks).

    data = load_preference_data(config, tokenizer)       # config: a PreferenceConfig
    rows = data.step_batch(step, config)                   # [grad_accum, micro_batch, ...]
    for batch in held_out_batches(data.eval, rows=8): ...  # [8, ...] with "valid" [8]

Pairs come from gemma_kit.posttrain.preferences (TRL's JSONL shapes; chosen and rejected
right-padded to one length T per file, so every training step has one shape and compiles once).
Pair g of the run (g = step * batch_size + j) is pair perm_e[g mod N] of epoch e = g // N, perm_e
drawn from (data_seed, e): gemma_kit.finetune.data's order, a pure function of the step, so a
resumed run takes the very pairs the stopped one would have. The held-out pairs are `eval_file`,
else a seeded split of `train_file` (eval_fraction, by `seed`), else none.

`seed` fixes the initialisation (LoRA factors, the reward head) and the held-out split;
`data_seed` (default: seed) only the order of the pairs. Runs that differ in data_seed alone
start from the very same parameters and hold out the same pairs, as WARM's members must
(gemma_kit.posttrain.warm).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np

from gemma_kit.errors import ConfigError
from gemma_kit.finetune.data import epoch_order, fingerprint, read_jsonl
from gemma_kit.posttrain.preferences import Preferences, load_preferences
from gemma_kit.tokenizer import Tokenizer
from gemma_kit.training.config import TrainConfig
from gemma_kit.training.trainer import micro_batches


@dataclasses.dataclass(frozen=True)
class PreferenceConfig(TrainConfig):
    """TrainConfig for runs on preference pairs: train_file (and eval_file) hold TRL-format
    pairs; max_length bounds prompt + completion of each side; packing does not apply.

    data_seed: the order of the pairs (default: seed, which also fixes the initialisation and
    the held-out split).
    """

    data_seed: int | None = None

    RESUME_FIELDS: ClassVar[tuple[str, ...]] = TrainConfig.RESUME_FIELDS + ("data_seed",)

    def validate(self) -> PreferenceConfig:
        super().validate()
        if self.data_seed is not None and (
            isinstance(self.data_seed, bool) or not isinstance(self.data_seed, int)
        ):
            raise ConfigError(f"data_seed must be an integer or unset, got {self.data_seed!r}")
        return self

    def validate_data(self) -> None:
        if not self.train_file:
            raise ConfigError(
                "train_file is required (a JSONL file of preference pairs "
                '{"prompt", "chosen", "rejected"})'
            )

    @property
    def order_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed


@dataclasses.dataclass
class PreferenceData:
    """The pairs of a run: train, held-out (or None), a fingerprint and facts for the log."""

    train: Preferences
    eval: Preferences | None
    fingerprint: str
    stats: dict[str, Any]

    @classmethod
    def from_pairs(
        cls, train: Preferences, held: Preferences | None = None, fingerprint: str = ""
    ) -> PreferenceData:
        """The data of a run from pairs already loaded (and the facts the log reports)."""
        stats = dict(
            train_pairs=len(train),
            eval_pairs=0 if held is None else len(held),
            skipped=train.stats.get("skipped", 0),
            train_length=int(train.chosen.shape[1]),
            with_margin=int(np.sum(train.margin != 0)),
        )
        return cls(train, held, fingerprint, stats)

    def batch_index(self, step: int, batch_size: int, seed: int) -> np.ndarray:
        """The training pairs of optimizer step `step` ([batch_size] indices)."""
        n = len(self.train)
        g = step * batch_size + np.arange(batch_size)
        return np.asarray(
            [epoch_order(seed, int(e), n)[int(i)] for e, i in zip(g // n, g % n)], np.int64
        )

    def step_batch(self, step: int, config: PreferenceConfig) -> dict[str, np.ndarray]:
        """Host arrays of step `step`'s pairs as [grad_accum, micro_batch, ...]."""
        index = self.batch_index(step, config.batch_size, config.order_seed)
        return micro_batches(self.train.take(index), config.grad_accum)

    def total_steps(self, config: PreferenceConfig) -> int:
        if config.steps is not None:
            return config.steps
        epochs = config.epochs if config.epochs is not None else 1.0  # validate: one is set
        return max(1, math.ceil(epochs * len(self.train) / config.batch_size))


def check_preference_files(config: TrainConfig) -> None:
    """DataError for a missing or empty data file, before the model loads."""
    for path in (config.train_file, config.eval_file):
        if path:
            read_jsonl(path)


def load_preference_data(config: PreferenceConfig, tokenizer: Tokenizer) -> PreferenceData:
    """The training and held-out pairs of a run (see the module docstring)."""

    def read(path: str) -> Preferences:
        return load_preferences(
            path, tokenizer, max_length=config.max_length, skip_bad_rows=config.skip_bad_rows
        )

    train = read(config.train_file)
    held: Preferences | None = None
    if config.eval_file:
        held = read(config.eval_file)
    elif config.eval_fraction > 0:
        train, held = train.split(config.eval_fraction, seed=config.seed)
    fp = fingerprint(
        config.train_file,
        config.eval_file,
        max_length=config.max_length,
        eval_fraction=config.eval_fraction,
        seed=config.seed,
        skip_bad_rows=config.skip_bad_rows,
        kind="preferences",
    )
    return PreferenceData.from_pairs(train, held, fp)


def held_out_batches(
    pairs: Preferences,
    rows: int,
    *,
    limit: int | None = None,
    extra: dict[str, np.ndarray] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of `rows` pairs over the first `limit` (default all) pairs, in order, each with
    "valid" [rows] float32 (1 for a real pair, 0 for the copies of pair 0 that fill the last
    batch: they count nothing). extra: more per-pair arrays [N, ...] to take alongside."""
    n = len(pairs) if limit is None else min(len(pairs), limit)
    for start in range(0, n, rows):
        index = np.arange(start, start + rows)
        real = index < n
        index = np.where(real, index, 0)
        batch = pairs.take(index)
        for name, values in (extra or {}).items():
            batch[name] = values[index]
        batch["valid"] = real.astype(np.float32)
        yield batch


def pair_token_count(batch: dict[str, np.ndarray], pad_id: int = 0) -> int:
    """Real (non-padding) tokens of a batch's chosen and rejected sequences (for tokens/s)."""
    return int(np.sum(batch["chosen"] != pad_id) + np.sum(batch["rejected"] != pad_id))
