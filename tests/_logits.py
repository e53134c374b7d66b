"""Logits of a gemma_kit model and of a transformers model for the same token ids, as numpy
arrays: the two sides of every parity check in the interop tests. Import after
pytest.importorskip("torch")."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx


@nnx.jit
def _logits(model, tokens):
    # One compile per model; eager op-by-op execution would compile every small op anew.
    return model(tokens)


def ours(model, tokens) -> np.ndarray:
    return np.asarray(_logits(model, jnp.asarray(tokens)))


def theirs(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens)).logits.float().numpy()
