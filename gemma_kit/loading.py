"""load_model / save_checkpoint: the public entry points over gemma_kit.checkpoint."""

from __future__ import annotations

import os
import pathlib

import jax.numpy as jnp
from flax import nnx

from gemma_kit.checkpoint import official
from gemma_kit.config import Config
from gemma_kit.transformer import Transformer


def model_from_params(config: Config, params: dict, *, compute_dtype=jnp.float32) -> Transformer:
    """Builds a Transformer around existing parameter arrays (no initialisation, no copy).

    `params` is the canonical tree (gemma_kit.checkpoint.official); each array keeps its dtype.
    """
    abstract = nnx.eval_shape(lambda: Transformer(config, dtype=compute_dtype))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def load_model(
    path: str | os.PathLike,
    preset: str | Config | None = None,
    dtype=None,
    *,
    compute_dtype=jnp.float32,
) -> Transformer:
    """Loads a Gemma 2 / Gemma 3 text model from an official Orbax checkpoint.

    Args:
      path: the checkpoint folder, or a downloaded folder that contains it one level down.
      preset: a preset name ("gemma3-1b", ...) or a Config. Default: inferred from the shapes;
        a given preset is checked against them.
      dtype: dtype to hold the weights in (cast while restoring). Default: as stored.
      compute_dtype: dtype activations are computed in (float32 by default).
    Returns:
      The model; `model(tokens)` gives logits [B, T, V]. A vision encoder stored in the
      checkpoint is not read.
    """
    config, params, _ = official.load_params(path, preset, dtype)
    return model_from_params(config, params, compute_dtype=compute_dtype)


def save_checkpoint(
    model: Transformer,
    path: str | os.PathLike,
    *,
    layout: official.Layout = "flat",
    overwrite: bool = False,
) -> pathlib.Path:
    """Saves the model's weights as an official Orbax checkpoint ("flat", as released, or "nested")."""
    from gemma_kit.layers import Einsum
    from gemma_kit.errors import CheckpointError

    if any(isinstance(m, Einsum) and m.matvec for _, m in model.iter_modules()):
        raise CheckpointError(
            "this model's weights are in the sampler's transposed decode layout "
            "(gemma_kit.layers.to_matvec_layout); save the original model instead"
        )
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return official.save_params(params, path, layout=layout, overwrite=overwrite)
