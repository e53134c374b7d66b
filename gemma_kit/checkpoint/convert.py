"""Conversions that write a model folder: `DIR/checkpoint/` (official Orbax), `DIR/tokenizer.model`.

That is the shape of a released download, so `load_model(DIR)` and `gemma-kit info DIR` find
both parts. The folder is written under a temporary name beside DIR and renamed when complete,
so an interrupted conversion never leaves a folder that looks whole.
"""

from __future__ import annotations

import os
import pathlib

import jax.numpy as jnp

from gemma_kit.checkpoint import official, staging
from gemma_kit.config import Config

CHECKPOINT_SUBDIR = "checkpoint"
TOKENIZER_FILE = "tokenizer.model"


def is_model_folder(path: pathlib.Path) -> bool:
    return (path / CHECKPOINT_SUBDIR).is_dir() or (path / TOKENIZER_FILE).is_file()


def check_model_folder_target(out: str | os.PathLike, overwrite: bool) -> None:
    """Raises CheckpointError where write_model_folder would refuse `out`: called before the
    slow reading, so a conversion fails in a moment rather than after minutes of work."""
    staging.check_target(
        pathlib.Path(out).expanduser().absolute(),
        overwrite,
        is_model_folder,
        "gemma_kit model folder",
    )


def write_model_folder(
    out: str | os.PathLike,
    params: dict,
    tokenizer_proto: bytes | None,
    *,
    overwrite: bool = False,
    config: Config | None = None,
) -> pathlib.Path:
    """Writes canonical params (+ a serialized SentencePiece model) as a model folder; a
    `config` that is no preset is stored with the checkpoint (official.write_config)."""
    with staging.staged_folder(
        out, overwrite=overwrite, replaceable=is_model_folder, what="gemma_kit model folder"
    ) as folder:
        official.save_params(params, folder / CHECKPOINT_SUBDIR, overwrite=True, config=config)
        if tokenizer_proto is not None:
            (folder / TOKENIZER_FILE).write_bytes(tokenizer_proto)
    return pathlib.Path(out).expanduser().absolute()


def convert_gguf(
    gguf_path: str | os.PathLike, out: str | os.PathLike, *, dtype=None, overwrite: bool = False
) -> pathlib.Path:
    """GGUF file -> model folder (bf16 weights by default, as the official checkpoints)."""
    # Imported here: reading GGUF needs the gguf package, an optional extra ([default-model]).
    from gemma_kit.checkpoint import gguf

    check_model_folder_target(out, overwrite)  # fail before the slow part
    reader = gguf.open_gguf(gguf_path)  # parsing the header (262k vocab) takes ~20 s: once
    _, params = gguf.read_gguf(reader, dtype=jnp.dtype(dtype or jnp.bfloat16))
    return write_model_folder(out, params, gguf.build_sentencepiece(reader), overwrite=overwrite)
