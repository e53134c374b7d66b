"""Logits of a gemma_kit model and of a transformers model for the same token ids, as numpy
arrays: the two sides of every parity check. `ours` is also the one compiled forward pass of the
tests that compare two gemma_kit models (a reloaded checkpoint, a quantized copy). `theirs` needs
torch (the [test] extra): call it after pytest.importorskip("torch")."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx


@nnx.jit
def _forward(model, tokens):
    # One compile per model structure: eager op-by-op execution would compile every small op
    # anew and make the tests several times slower. Both sides of a comparison take this path.
    return model(tokens)


def ours(model, tokens) -> np.ndarray:
    """[B, T] token ids -> [B, T, V] logits of a gemma_kit model (compiled)."""
    return np.asarray(_forward(model, jnp.asarray(tokens)))


def theirs(model, tokens) -> np.ndarray:
    """[B, T] token ids -> [B, T, V] float32 logits of a transformers causal LM."""
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(np.asarray(tokens))).logits.float().numpy()
