"""load_model / save_checkpoint: the public entry points over gemma_kit.checkpoint."""

from __future__ import annotations

import os
import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

from gemma_kit.checkpoint import official
from gemma_kit.checkpoint.adapter import read_adapter_config
from gemma_kit.checkpoint.hf_import import read_hf
from gemma_kit.checkpoint.safetensors_io import is_hf_folder
from gemma_kit.config import Config
from gemma_kit.errors import CheckpointError
from gemma_kit.layers import Einsum
from gemma_kit.lora import has_lora, load_adapter
from gemma_kit.quant import is_quantized
from gemma_kit.transformer import Transformer


def model_from_params(config: Config, params: dict, *, compute_dtype=jnp.float32) -> Transformer:
    """Builds a Transformer around existing parameter arrays (no initialisation, no copy).

    `params` is the canonical tree (gemma_kit.checkpoint.official); each array keeps its dtype.
    """
    # An image encoder in the tree (vision_encoder/...) makes a model that takes images.
    vision = "vision_encoder" in params
    abstract = nnx.eval_shape(lambda: Transformer(config, dtype=compute_dtype, with_vision=vision))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def load_model(
    path: str | os.PathLike,
    preset: str | Config | None = None,
    dtype=None,
    *,
    compute_dtype=jnp.float32,
    text_only: bool = False,
    lora: str | os.PathLike | None = None,
) -> Transformer:
    """Loads a Gemma 2 / Gemma 3 text model from an official Orbax checkpoint or a Hugging Face
    folder (config.json + safetensors, see gemma_kit.checkpoint.hf_import).

    Args:
      path: the checkpoint folder, or a downloaded folder that contains it one level down.
      preset: a preset name ("gemma3-1b", ...) or a Config. Default: the config stored with
        the checkpoint (a size no preset describes, e.g. `gemma-kit shrink`'s), else inferred
        from the shapes; a given preset is checked against them.
      dtype: dtype to hold the weights in (cast while restoring). Default: as stored.
      compute_dtype: dtype activations are computed in (float32 by default).
      text_only: skip the image encoder of a Gemma 3 4B/12B/27B checkpoint (saves its ~0.4B
        float32 parameters; the model then rejects images).
      lora: a LoRA adapter folder (gemma_kit.lora.save_adapter, `gemma-kit finetune`) to add,
        unmerged, on top of the weights.
    Returns:
      The model; `model(tokens)` gives logits [B, T, V]. An image encoder stored in an
      official checkpoint is loaded too, in float32, unless `text_only` (`model.has_vision`
      says which; only then do the model and the sampler accept images).
    """
    if lora is not None:  # a bad adapter path is reported before seconds of loading
        read_adapter_config(lora)
    if is_hf_folder(path):
        config, params, _ = read_hf(
            path, preset, dtype, vision=not text_only, place=jax.device_put, progress=False
        )
    else:
        config, params, _ = official.load_params(path, preset, dtype, vision=not text_only)
    model = model_from_params(config, params, compute_dtype=compute_dtype)
    if lora is not None:
        load_adapter(model, lora)
    return model


def save_checkpoint(
    model: Transformer,
    path: str | os.PathLike,
    *,
    layout: official.Layout = "flat",
    overwrite: bool = False,
) -> pathlib.Path:
    """Saves the model's weights as an official Orbax checkpoint ("flat", as released, or
    "nested"), with its config when that is no preset. The model must hold plain weights: not
    the sampler's transposed layout, not int8, no unmerged LoRA."""
    if any(isinstance(m, Einsum) and m.matvec for _, m in model.iter_modules()):
        raise CheckpointError(
            "this model's weights are in the sampler's transposed decode layout "
            "(gemma_kit.layers.to_matvec_layout); save the original model instead"
        )
    if is_quantized(model):
        raise CheckpointError(
            "this model's weights are int8 (gemma_kit.quant); save the original model instead"
        )
    if has_lora(model):
        raise CheckpointError(
            "this model carries an unmerged LoRA adapter; save gemma_kit.lora.merge(model) for "
            "a full checkpoint, or gemma_kit.lora.save_adapter(model, DIR) for the adapter alone"
        )
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return official.save_params(
        params, path, layout=layout, overwrite=overwrite, config=model.config
    )
