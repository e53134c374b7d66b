"""The model a run trains: built from the config (base checkpoint, method, LoRA), split into what
trains and what stays fixed, and written out at the end (adapter/ or model/)."""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
from flax import nnx

from gemma_kit.errors import TrainingError
from gemma_kit.lora import LoRAParam, apply_lora
from gemma_kit.training.config import TrainConfig

# Full fine-tuning trains the text model; the image encoder and its projection into the
# embedding space stay frozen (their output is computed once per image, see ImageBank).
FROZEN_IN_FULL = ("vision_encoder", "mm_input_projection", "mm_soft_embedding_norm")


def trainable_filter(config: TrainConfig):
    """The nnx filter of the trained variables: LoRA factors, or every text-model Param."""
    if config.trains_lora:
        return LoRAParam
    return nnx.All(nnx.Param, nnx.Not(nnx.Any(*map(nnx.PathContains, FROZEN_IN_FULL))))


def build_model(config: TrainConfig, model=None, tokenizer=None):
    """(model ready to train, tokenizer, description of the base) from the config.

    A model passed in is used as given (its LoRA, if any, is kept), else the base checkpoint (or
    the embedded 270M) is loaded in param_dtype. QLoRA quantizes the frozen base (int8 or int4,
    `quant`) before LoRA is added.
    """
    from gemma_kit.lora import has_lora

    dtype = jnp.dtype(config.resolved_param_dtype())
    compute = jnp.dtype(config.resolved_compute_dtype())
    if model is None:
        if config.base == "default":
            from gemma_kit.embedded import default_model

            model, default_tokenizer = default_model(dtype, compute_dtype=compute)
            tokenizer = tokenizer or default_tokenizer
            base = "default"
        else:
            from gemma_kit.checkpoint.official import find_checkpoint, find_tokenizer
            from gemma_kit.checkpoint.safetensors_io import is_hf_folder
            from gemma_kit.errors import TokenizerError
            from gemma_kit.loading import load_model
            from gemma_kit.tokenizer import Tokenizer

            if not is_hf_folder(config.base):  # a transformers folder loads too (its own size)
                find_checkpoint(config.base)
            if tokenizer is None:
                path = config.tokenizer or find_tokenizer(config.base)
                if path is None:
                    raise TokenizerError(
                        f"no tokenizer.model in or beside {config.base!r}; set `tokenizer`"
                    )
                tokenizer = Tokenizer(path)
            model = load_model(config.base, config.preset, dtype, compute_dtype=compute)
            base = str(pathlib.Path(config.base).expanduser().absolute())
    else:
        if tokenizer is None:
            raise TrainingError("a model passed to train() needs its tokenizer too")
        # A shallow copy (the arrays are shared): LoRA and the compute dtype are set on it,
        # never on the caller's model.
        model = nnx.merge(*nnx.split(model))
        model.dtype = compute
        base = getattr(model.config, "name", "model")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise TrainingError(
            f"the tokenizer has {tokenizer.vocab_size} pieces but the model only "
            f"{model.config.vocab_size} embedding rows; they do not belong together"
        )
    if config.method == "qlora":
        from gemma_kit.quant import quantize_model

        model = quantize_model(model, bits=4 if config.quant == "int4" else 8)
    if config.trains_lora and not has_lora(model):
        apply_lora(
            model, config.lora_rank, config.lora_alpha, config.lora_targets, seed=config.seed
        )
    if config.method == "full" and has_lora(model):
        raise TrainingError("full fine-tuning of a model that carries LoRA: merge it first")
    return model, tokenizer, base


def save_full(model, tokenizer, folder: pathlib.Path) -> pathlib.Path:
    """A fully fine-tuned model as a model folder: official-layout checkpoint + tokenizer."""
    from gemma_kit.checkpoint.convert import write_model_folder

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return write_model_folder(
        folder, params, tokenizer.to_bytes(), overwrite=True, config=model.config
    )
