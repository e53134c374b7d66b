"""The settings of a fine-tuning run: gemma_kit.training.config.TrainConfig (the base class of
every objective's settings), kept importable under its earlier name."""

from gemma_kit.training.config import (
    DATA_ORDER_FIELDS,
    DTYPES,
    METHODS,
    MODEL_FIELDS,
    PATH_FIELDS,
    TrainConfig,
    parse_overrides,
)

__all__ = [
    "DATA_ORDER_FIELDS",
    "DTYPES",
    "METHODS",
    "MODEL_FIELDS",
    "PATH_FIELDS",
    "TrainConfig",
    "parse_overrides",
]
