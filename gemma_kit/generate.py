"""Greedy completion without a KV cache: simple and exact, for short prompts.

Every step runs the model over a fixed-length token buffer (so the step compiles once) and
reads the logits of the last real position; causal attention makes the not-yet-filled tail of
the buffer irrelevant. The KV-cached sampler replaces this for real workloads.
"""

from __future__ import annotations

from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_kit.errors import GemmaKitError

_BUCKET = 64


def greedy_stream(model, tokenizer, prompt: str, *, max_new_tokens: int = 32) -> Iterator[str]:
    """Yields the decoded text of each new token as it is chosen (greedy, stops at <eos>)."""
    if not prompt:
        raise GemmaKitError("the prompt is empty; give some text to complete")
    if max_new_tokens < 1:
        raise GemmaKitError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids = tokenizer.encode(prompt, add_bos=True)
    total = len(ids) + max_new_tokens
    length = -(-total // _BUCKET) * _BUCKET
    buffer = np.zeros((1, length), np.int32)
    buffer[0, : len(ids)] = ids
    graphdef, state = nnx.split(model)

    @jax.jit
    def next_token(state, tokens, index):
        m = nnx.merge(graphdef, state)
        hidden = jax.lax.dynamic_slice_in_dim(m.hidden_states(tokens), index, 1, axis=1)
        return jnp.argmax(m.logits(hidden)[0, 0])

    stops = {tokenizer.eos_id, tokenizer.end_of_turn_id}
    new: list[int] = []
    text = ""
    for index in range(len(ids) - 1, total - 1):
        token = int(next_token(state, jnp.asarray(buffer), index))
        if token in stops:
            break
        buffer[0, index + 1] = token
        new.append(token)
        # Decode the whole continuation each time: a piece can depend on its neighbours
        # (byte-fallback sequences, leading spaces), so per-token decoding would garble text.
        full = tokenizer.decode(new)
        yield full[len(text):]
        text = full
