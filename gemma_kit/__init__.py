"""gemma_kit: Gemma 2 and Gemma 3 in Flax NNX."""

from gemma_kit.config import PRESETS, Config, GlobalAttention, LocalAttention, get_preset
from gemma_kit.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    ConversionError,
    GemmaKitError,
    TokenizerError,
)
from gemma_kit.transformer import Transformer

__version__ = "0.1.0"
