"""One exception family, with messages that name the cause and what to do about it.

Every error gemma_kit raises on purpose derives from `GemmaKitError`, so callers (and the CLI,
which prints the message without a traceback) can catch the whole family at once. Each also
derives from the builtin exception a Python user would expect (ValueError, FileNotFoundError).
"""


class GemmaKitError(Exception):
    """Base class of every error raised on purpose by gemma_kit."""


class ConfigError(GemmaKitError, ValueError):
    """A model configuration or preset name is invalid."""


class CheckpointError(GemmaKitError, ValueError):
    """A checkpoint is missing, incomplete, corrupt, or does not match the requested model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint where one was expected."""


class TokenizerError(GemmaKitError, ValueError):
    """A tokenizer file is missing or is not a SentencePiece model."""


class ConversionError(GemmaKitError, ValueError):
    """A foreign-format file (GGUF, safetensors) cannot be converted."""


class TokenizerNotFoundError(TokenizerError, FileNotFoundError):
    """No tokenizer file where one was expected."""


class ChatFormatError(GemmaKitError, ValueError):
    """A list of chat messages that the Gemma chat format cannot express."""


class ImageError(GemmaKitError, ValueError):
    """An image that cannot be read or used: a damaged or unsupported file, an empty image,
    images that do not match the prompt's markers, or images given to a text-only model."""


class AdapterError(GemmaKitError, ValueError):
    """A LoRA adapter is missing, damaged, or does not fit the model."""


class DataError(GemmaKitError, ValueError):
    """Training data that cannot be used; the message names the file and line."""

    def __init__(self, message: str, *, path=None, line: int | None = None):
        where = (
            f"{path}:{line}: "
            if path is not None and line is not None
            else (f"{path}: " if path is not None else "")
        )
        super().__init__(where + message)
        self.path = path
        self.line = line


class TrainingError(GemmaKitError, RuntimeError):
    """A fine-tuning run cannot start or continue (bad settings, a checkpoint that does not fit)."""


class DivergenceError(TrainingError):
    """The training loss became NaN or infinite; the last good checkpoint is left intact."""


class RewardError(GemmaKitError, ValueError):
    """A reward function that cannot be loaded or used; the message names the function."""


class DemoError(GemmaKitError, RuntimeError):
    """The demo cannot start: Gradio missing, the port taken, an adapter that does not load."""


class InputError(GemmaKitError, ValueError):
    """A message the demo page refuses (empty, an image the model cannot take, a bad file)."""
