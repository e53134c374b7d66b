"""A base checkpoint plus a LoRA adapter -> a plain model folder (`gemma-kit merge`).

    merge_checkpoint("gemma-3-1b/", "runs/a/adapter", "checkpoints/gemma3-1b-a")

The result is the shape of an official download (checkpoint/ + tokenizer.model, see
gemma_kit.checkpoint.convert): it loads and samples without the adapter, and exports like any
other checkpoint.
"""

from __future__ import annotations

import os
import pathlib

from flax import nnx

from gemma_kit.checkpoint import convert
from gemma_kit.checkpoint.adapter import read_adapter_config
from gemma_kit.checkpoint.official import find_checkpoint, find_tokenizer
from gemma_kit.config import Config
from gemma_kit.loading import load_model
from gemma_kit.lora import merge


def merge_checkpoint(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    preset: str | Config | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """base checkpoint + adapter -> `out`/checkpoint (official layout) and `out`/tokenizer.model.

    The weights keep the base's stored dtype (the sum is taken in float32). A bad adapter, a
    missing base or an `out` that may not be written is reported before the base is loaded.
    The folder is written into a temporary folder renamed at the end, so an interrupted merge
    never leaves one that looks complete, and only an earlier model folder is ever replaced.
    """
    read_adapter_config(adapter)
    find_checkpoint(base)
    convert.check_model_folder_target(out, overwrite)
    merged = merge(load_model(base, preset, lora=adapter))
    tokenizer = find_tokenizer(base)
    params = nnx.to_pure_dict(nnx.state(merged, nnx.Param))
    return convert.write_model_folder(
        out,
        params,
        tokenizer.read_bytes() if tokenizer else None,
        overwrite=overwrite,
        config=merged.config,
    )
