"""The policy and its frozen companions: a reference, an EMA anchor, or a teacher that is the
same network under other values of the trained variables.

Post-training losses compare the model being trained (the policy) with frozen versions of it:
DPO and KL-regularised RL with the initial model (the reference), WARP and J-BOND with an
exponential moving average of the policy (the anchor). With LoRA these differ from the policy
only in the LoRA factors, so they are not separate models: a loss function receives their
factors as a frozen pytree (an argument of the compiled step, see gemma_kit.training.step) and
evaluates the policy's own network with the factors swapped in:

    ref = with_trained(model, frozen["reference"], kind)      # inside the loss function
    ref_logps = completion_logprobs(ref, batch, chunk)

`reference_values` gives the base model's values without a second copy of anything: the LoRA
factors with every B set to zero (the adapter then adds exactly nothing). For full fine-tuning
the frozen values are a full copy of the trained parameters (the memory of a second model).

An EMA anchor of LoRA factors, a <- (1 - mu) a + mu theta applied to A and B separately, is a
valid moving anchor but not the EMA of the merged weights (B A is bilinear); the RL code says so
where it offers it. gemma_kit.posttrain.merging.ema computes the update.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gemma_kit.lora import LoRAParam
from gemma_kit.posttrain.logprobs import DEFAULT_CHUNK, token_logprobs
from gemma_kit.training.losses import attention_mask


def snapshot(tree: Any) -> dict:
    """Fresh arrays of a model's trained variables (an nnx State, e.g. trainer.trainable, or a
    pure dict) as a pure dict: never an alias of the trainer's buffers, which its step donates."""
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    return jax.tree.map(jnp.array, tree)


def reference_values(trainable: Any, kind=LoRAParam) -> dict:
    """The values of the trained variables that make the policy's network the base model.

    LoRA (kind LoRAParam): the factors with every B zeroed (A kept, so shapes and dtypes match
    and the compiled step is shared). Full fine-tuning: a copy of the given parameters, which must
    then be the initial ones.
    """
    values = snapshot(trainable)
    if kind is not LoRAParam:
        return values

    def zero_b(path, x):
        return jnp.zeros_like(x) if path and getattr(path[-1], "key", None) == "b" else x

    return jax.tree_util.tree_map_with_path(zero_b, values)


def with_trained(model, values: Any, kind=LoRAParam):
    """`model` with its trained variables (selected by `kind`: LoRAParam, or the full
    fine-tuning filter of gemma_kit.training.model.trainable_filter) replaced by `values` (a pure
    dict of the same structure). Pure: works under jit; `model` itself is not changed."""
    # One State per filter: mypy cannot unpack nnx.split's variadic return type.
    graphdef, trained, rest = nnx.split(model, kind, ...)  # type: ignore[misc]
    nnx.replace_by_pure_dict(trained, values)
    return nnx.merge(graphdef, trained, rest)


def completion_logprobs(model, batch: dict, chunk: int = DEFAULT_CHUNK) -> jax.Array:
    """log pi(target) of every position of a batch of rows [B, T] (tokens, targets, positions,
    segments; the layout of gemma_kit.training.losses and of Rollout.training_batch) -> [B, T]
    float32, chunked (gemma_kit.posttrain.logprobs). Weight by the batch's completion mask to
    keep completion tokens only; padded positions hold log-probs of nothing in particular."""
    mask = attention_mask(batch["positions"], batch["segments"])
    hidden = model.hidden_states(batch["tokens"], batch["positions"], mask)
    targets = jnp.maximum(batch["targets"], 0)
    return token_logprobs(model, hidden, targets, chunk=chunk)
