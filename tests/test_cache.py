"""Cached decoding equals a full forward pass, far past the sliding window.

The tiny configs have a window of 4 and the sequences run to 40 tokens, so every local layer's
ring buffer wraps many times. Tolerance: logits <= 1e-4 in float32 (observed ~1e-6).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma_kit.cache import init_cache, layer_slots, write

ATOL = 1e-4
SEQ = 40


def _full_logits(model, tokens):
    return np.asarray(model(jnp.asarray(tokens)))


@functools.partial(jax.jit, static_argnames=("graphdef", "fresh"))
def _jit_extend(graphdef, state, tokens, positions, cache, fresh):
    # Compiled once per shape, so the token-by-token loops below take seconds, not minutes.
    model = nnx.merge(graphdef, state)
    hidden, cache = model.extend(tokens, positions, cache, fresh=fresh)
    return model.logits(hidden), cache


def _extend(model, tokens, positions, cache, fresh=False):
    graphdef, state = nnx.split(model)
    return _jit_extend(graphdef, state, jnp.asarray(tokens), jnp.asarray(positions), cache, fresh)


def _cached_logits(model, tokens, chunks, length=None):
    """Feeds `tokens` in chunks (the first fresh), returns the logits of every position."""
    B, T = tokens.shape
    cache = init_cache(model.config, B, length or T, dtype=jnp.float32)
    out, start = [], 0
    for n, size in enumerate(chunks):
        piece = tokens[:, start : start + size]
        pos = np.broadcast_to(np.arange(start, start + size), piece.shape)
        logits, cache = _extend(model, piece, pos, cache, fresh=n == 0)
        out.append(np.asarray(logits))
        start += size
    assert start == T
    return np.concatenate(out, axis=1), cache


@pytest.fixture(params=["gemma3", "gemma2"])
def model(request, tiny_gemma3_config, tiny_gemma2_config, tiny_model):
    config = tiny_gemma3_config if request.param == "gemma3" else tiny_gemma2_config
    return tiny_model(config, seed=3)


@pytest.mark.parametrize(
    "chunks",
    [
        [1] * SEQ,  # token by token from the start
        [3] + [1] * (SEQ - 3),  # short prefill, then decode
        [10] + [1] * (SEQ - 10),  # prefill longer than the window (4)
        [10, 7, 2, 1, 9] + [1] * (SEQ - 29),  # chat turns added to a filled cache
    ],
    ids=["decode-only", "short-prefill", "long-prefill", "multi-turn"],
)
def test_cached_decoding_equals_full_forward(model, chunks):
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, SEQ))
    assert any(k.is_local and k.window * 4 <= SEQ for k in model.config.layers)
    cached, cache = _cached_logits(model, tokens, chunks)
    np.testing.assert_allclose(cached, _full_logits(model, tokens), rtol=0, atol=ATOL)
    assert int(cache["index"]) == SEQ


def test_local_layers_keep_only_a_window_of_slots(model):
    cache = init_cache(model.config, 3, 1000)
    for i, kind in enumerate(model.config.layers):
        slots = cache[f"layer_{i}"]["k"].shape[1]
        assert (
            slots == (kind.window if kind.is_local else 1000) == layer_slots(model.config, i, 1000)
        )
    assert cache["layer_0"]["k"].dtype == jnp.bfloat16  # the default cache dtype


def test_left_padded_rows_decode_like_alone(model):
    """A row left-padded inside a batch gets the logits it gets alone (pads: position -1)."""
    rng = np.random.default_rng(1)
    V = model.config.vocab_size
    short, long_ = rng.integers(0, V, 6), rng.integers(0, V, 13)
    P = 13
    tokens = np.zeros((2, P), np.int32)
    tokens[0, P - 6 :], tokens[1] = short, long_
    pos = np.full((2, P), -1)
    pos[0, P - 6 :], pos[1] = np.arange(6), np.arange(13)
    cache = init_cache(model.config, 2, 40, dtype=jnp.float32)
    logits, cache = _extend(model, tokens, pos, cache, fresh=True)
    steps = [np.asarray(logits[:, -1:])]
    nxt = rng.integers(0, V, (2, 12))
    for t in range(12):
        step_pos = np.array([[6 + t], [13 + t]])
        logits, cache = _extend(model, nxt[:, t : t + 1], step_pos, cache)
        steps.append(np.asarray(logits))
    batched = np.concatenate(steps, axis=1)  # logits after the prompt and after each new token
    for row, prompt in enumerate([short, long_]):
        alone = _full_logits(model, np.concatenate([prompt, nxt[row]])[None])[0]
        np.testing.assert_allclose(batched[row], alone[len(prompt) - 1 :], rtol=0, atol=ATOL)


def test_ring_write_keeps_the_last_slots():
    layer = {
        "k": jnp.zeros((1, 4, 1, 1)),
        "v": jnp.zeros((1, 4, 1, 1)),
        "pos": jnp.full((1, 4), -1, jnp.int32),
    }
    vals = jnp.arange(10, dtype=jnp.float32).reshape(1, 10, 1, 1)
    pos = jnp.arange(10, dtype=jnp.int32)[None]
    # Ten tokens starting at index 3 into 4 slots: only tokens 6..9 survive, at (3+j) % 4.
    out = write(layer, vals, vals, pos, jnp.int32(3))
    assert np.asarray(out["pos"])[0].tolist() == [9, 6, 7, 8]
    # Two tokens at index 7: slots 3 and 0.
    out2 = write(out, vals[:, :2] + 100, vals[:, :2], pos[:, :2] + 100, jnp.int32(7))
    assert np.asarray(out2["pos"])[0].tolist() == [101, 6, 7, 100]
    # One token at index 9: slot 1.
    out3 = write(out2, vals[:, :1], vals[:, :1], pos[:, :1] + 200, jnp.int32(9))
    assert np.asarray(out3["pos"])[0].tolist() == [101, 200, 7, 100]
    jax.block_until_ready(out3)
