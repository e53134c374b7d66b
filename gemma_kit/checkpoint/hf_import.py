"""Hugging Face Gemma checkpoints (safetensors) -> gemma_kit: a loaded model or a model folder.

    model = gemma_kit.load_model("gemma-3-1b-it/")           # straight into a Transformer
    config, params, info = read_hf("gemma-3-1b-it/")        # canonical tree, numpy arrays
    convert_hf("gemma-3-1b-it/", "checkpoints/gemma3-1b")   # official Orbax + tokenizer.model

Reads Gemma2ForCausalLM, Gemma3ForCausalLM and Gemma3ForConditionalGeneration folders (one
file or sharded with an index). Every header is checked first (shards present, dtypes, every
tensor's shape against config.json, no tensor left over), so bad input fails before any data
is read. Tensors are then read from the memory-mapped files one rule at a time: peak memory is
the converted model plus the inputs of one parameter. The vision tower of the multimodal model
is converted by gemma_kit.checkpoint.hf_vision, or skipped when `vision=False` (with
info["skipped_vision"] counting its tensors).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from gemma_kit.checkpoint import convert, hf, hf_vision, official
from gemma_kit.checkpoint.safetensors_io import HFFolder
from gemma_kit.config import Config, get_preset
from gemma_kit.tokenizer import Tokenizer

TOKENIZER_FILE = "tokenizer.model"


def read_hf(
    path: str | os.PathLike,
    preset: str | Config | None = None,
    dtype=None,
    *,
    vision: bool = True,
    place=None,
    progress: bool = True,
) -> tuple[Config, dict, dict[str, Any]]:
    """Reads a Hugging Face Gemma folder into (config, canonical params, info).

    Args:
      path: the folder (config.json + safetensors).
      preset: a preset name or Config to check the weights against and use; default: the
        config built from config.json (an official preset when the shapes and settings match).
      dtype: dtype of the returned text-model arrays; default: the stored dtype of the
        embedding.
      vision: convert the vision tower of a Gemma3ForConditionalGeneration too (with
        gemma_kit.checkpoint.hf_vision); otherwise it is skipped.
      place: applied to each finished array (e.g. jax.device_put), so a host copy is freed
        as soon as the device holds it.
    Returns:
      info holds path, dtype, tokenizer (the tokenizer.model bytes, or None) and
      skipped_vision (how many vision-tower tensors were left out).
    """
    name = pathlib.Path(path).name or "hf"
    with HFFolder(path) as folder:
        vision_names = [n for n in folder if hf.is_vision_key(n)]
        with_vision = bool(vision and vision_names)
        if with_vision:
            config = hf_vision.config_from_hf(folder.config, name)
        else:
            config = hf.config_from_hf(folder.config, name=name)
        if preset is not None:
            wanted = get_preset(preset)
            official.check_shapes(wanted, official.abstract_params(config))
            config = wanted
        prefix = hf.find_prefix(folder.keys())
        if dtype is None:  # as stored
            dtype = folder.dtype(prefix + "embed_tokens.weight")
        dtype = np.dtype(dtype)

        def bar(rules):
            return tqdm(
                rules, desc="Hugging Face -> gemma_kit", unit="tensor", disable=not progress
            )

        params = hf.params_from_hf(folder, config, dtype=dtype, place=place, progress=bar)
        if with_vision:  # the encoder in its own dtype (float32), as official loads
            encoder = hf_vision.vision_params_from_hf(folder, config)
            if place is not None:
                encoder = official.unflatten(
                    {p: place(x) for p, x in official.flatten(encoder).items()}
                )
            params["embedder"].update(encoder.pop("embedder"))
            params.update(encoder)
    tokenizer_path = pathlib.Path(path).expanduser() / TOKENIZER_FILE
    tokenizer = None
    if tokenizer_path.is_file():
        tokenizer = tokenizer_path.read_bytes()
        Tokenizer.from_bytes(tokenizer, name=str(tokenizer_path))  # a Gemma SentencePiece model?
    info = dict(
        path=pathlib.Path(path),
        dtype=dtype,
        tokenizer=tokenizer,
        skipped_vision=0 if with_vision else len(vision_names),
    )
    return config, params, info


def convert_hf(
    path, out, *, dtype=None, overwrite: bool = False, progress: bool = True
) -> tuple[pathlib.Path, Config, dict[str, Any]]:
    """Hugging Face folder -> gemma_kit model folder (`out/checkpoint/` + `out/tokenizer.model`).

    The weights keep their stored dtype unless `dtype` is given. Returns (out, config, info);
    a config that is no official preset is stored with the checkpoint, so the result loads
    without `preset=`.
    """
    convert.check_model_folder_target(out, overwrite)  # fail before the work
    config, params, info = read_hf(path, dtype=dtype, progress=progress)
    written = convert.write_model_folder(
        out, params, info["tokenizer"], overwrite=overwrite, config=config
    )
    return written, config, info
