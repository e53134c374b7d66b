"""Conversions that write a model folder: `DIR/checkpoint/` (official Orbax) + `DIR/tokenizer.model`.

That is the shape of a released download, so `load_model(DIR)` and `gemma-kit info DIR` find
both parts. The folder is written under a temporary name beside DIR and renamed when complete,
so an interrupted conversion never leaves a folder that looks whole.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

from gemma_kit.checkpoint import official
from gemma_kit.errors import CheckpointError

CHECKPOINT_SUBDIR = "checkpoint"
TOKENIZER_FILE = "tokenizer.model"


def _prepare_target(out: pathlib.Path, overwrite: bool) -> None:
    if out.exists():
        if not overwrite:
            raise CheckpointError(
                f"{str(out)!r} already exists; choose another --out folder or pass --overwrite"
            )
        is_model_folder = (out / CHECKPOINT_SUBDIR).is_dir() or (out / TOKENIZER_FILE).is_file()
        if any(out.iterdir()) and not is_model_folder:
            raise CheckpointError(
                f"refusing to overwrite {str(out)!r}: it is not empty and not a gemma_kit model "
                "folder, so it may hold data that is not ours to delete"
            )


def write_model_folder(out, params: dict, tokenizer_proto: bytes | None, *,
                       overwrite: bool = False) -> pathlib.Path:
    """Writes canonical params (+ a serialized SentencePiece model) as a model folder."""
    out = pathlib.Path(out).expanduser().absolute()
    _prepare_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        official.save_params(params, staging / CHECKPOINT_SUBDIR, overwrite=True)
        if tokenizer_proto is not None:
            (staging / TOKENIZER_FILE).write_bytes(tokenizer_proto)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out


def convert_gguf(gguf_path, out, *, dtype=None, overwrite: bool = False) -> pathlib.Path:
    """GGUF file -> model folder (bf16 weights by default, as the official checkpoints)."""
    import jax.numpy as jnp

    from gemma_kit.checkpoint import gguf

    _prepare_target(pathlib.Path(out).expanduser(), overwrite)  # fail before the slow part
    reader = gguf.open_gguf(gguf_path)  # parsing the header (262k vocab) takes ~20 s: once
    _, params = gguf.read_gguf(reader, dtype=jnp.dtype(dtype or jnp.bfloat16))
    return write_model_folder(out, params, gguf.build_sentencepiece(reader),
                              overwrite=overwrite)
