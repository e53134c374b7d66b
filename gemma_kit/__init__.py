"""gemma_kit: Gemma 2 and Gemma 3 in JAX / Flax NNX.

    import gemma_kit
    model, tokenizer = gemma_kit.default_model()          # the embedded Gemma 3 270M
    model = gemma_kit.load_model("path/to/checkpoint")    # an official Orbax checkpoint
    logits = model(tokens)                                # [B, T] ids -> [B, T, V]
    gemma_kit.Sampler(model, tokenizer).generate("The capital of France is")
    gemma_kit.ChatSession(model, tokenizer).send("Hello!")

Fine-tuning lives in gemma_kit.lora, gemma_kit.quant and gemma_kit.finetune; Hugging Face
interop in gemma_kit.checkpoint (hf_import, hf_export, hf_peft); the web demo in gemma_kit.demo.
"""

from gemma_kit.chat import ChatOverflowError, ChatSession
from gemma_kit.config import (
    PRESETS,
    Config,
    GlobalAttention,
    LocalAttention,
    VisionConfig,
    get_preset,
)
from gemma_kit.embedded import default_model
from gemma_kit.errors import (
    AdapterError,
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    ConversionError,
    DataError,
    DivergenceError,
    GemmaKitError,
    ImageError,
    TokenizerError,
    TrainingError,
)
from gemma_kit.loading import load_model, save_checkpoint
from gemma_kit.sampler import GenerationResult, Sampler
from gemma_kit.sharding import make_mesh, shard_model
from gemma_kit.tokenizer import Tokenizer
from gemma_kit.transformer import Transformer

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "Config",
    "GlobalAttention",
    "LocalAttention",
    "get_preset",
    "default_model",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigError",
    "ConversionError",
    "GemmaKitError",
    "TokenizerError",
    "load_model",
    "save_checkpoint",
    "GenerationResult",
    "Sampler",
    "ChatSession",
    "ChatOverflowError",
    "Tokenizer",
    "Transformer",
    "make_mesh",
    "shard_model",
    "VisionConfig",
    "DataError",
    "ImageError",
    "AdapterError",
    "TrainingError",
    "DivergenceError",
]
