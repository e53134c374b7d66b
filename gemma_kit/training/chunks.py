"""Computing over the positions of a batch a chunk at a time: the mechanism that keeps the
[tokens, V] logits of a Gemma model (V = 262144) from ever existing whole.

Every loss over the vocabulary (the fine-tuning cross-entropy, post-training log-probs and
divergences) maps a function over chunks of positions with `map_chunks`; each chunk runs under
jax.checkpoint, so the backward pass recomputes a chunk's logits instead of storing them.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from gemma_kit.errors import ConfigError


def map_chunks(
    fn: Callable[..., tuple[jax.Array, ...]], inputs: Sequence[jax.Array], chunk: int
) -> tuple[jax.Array, ...]:
    """fn over chunks of the leading axis N of every input; fn returns a tuple of [n, ...].

    Inputs are padded with zeros to a whole number of chunks (padded rows are computed and
    dropped). Each call of fn runs under jax.checkpoint, so its intermediates (the chunk's
    logits) are recomputed in the backward pass rather than stored for every chunk.
    """
    if not (isinstance(chunk, numbers.Integral) and int(chunk) >= 1):
        raise ConfigError(f"chunk must be an integer >= 1, got {chunk!r}")
    n = inputs[0].shape[0]
    size = max(1, min(chunk, n))
    count = -(-n // size)
    pad = count * size - n
    if pad:
        inputs = [jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]) for x in inputs]
    body = jax.checkpoint(lambda args: tuple(fn(*args)))
    if count == 1:  # one chunk: no loop (a smaller program)
        return tuple(y[:n] for y in body(tuple(inputs)))
    outs = jax.lax.map(body, tuple(x.reshape(count, size, *x.shape[1:]) for x in inputs))
    return tuple(y.reshape(count * size, *y.shape[2:])[:n] for y in outs)
