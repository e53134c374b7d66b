"""gemma_kit.decode: the one decode state and the compiled pieces, as the Sampler drives them.

A tiny random model (sliding window 4, shorter than every sequence here) and the small real
tokenizer; float32 caches, so cached and uncached computations agree to rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_kit import decode
from gemma_kit.sampler import Sampler
from tests.support.tiny import SMALL_TEXT, SMALL_VOCAB

_SHARED: dict = {}


@pytest.fixture
def sampler(tiny_gemma3_config, tiny_model, small_tokenizer) -> Sampler:
    if "sampler" not in _SHARED:
        config = tiny_gemma3_config.replace(vocab_size=SMALL_VOCAB, max_context=256)
        _SHARED["sampler"] = Sampler(
            tiny_model(config, seed=3), small_tokenizer, cache_dtype=jnp.float32, cache_length=128
        )
    return _SHARED["sampler"]


def _ids(tok, n: int) -> list[int]:
    ids = tok.encode(SMALL_TEXT[:2000])[:n]
    assert len(ids) == n
    return ids


def _host(state: decode.DecodeState):
    """The state with every array on the host (the key as its raw data)."""
    return jax.device_get(state.replace(key=jax.random.key_data(state.key)))


def test_the_loop_equals_the_step_repeated(sampler, small_tokenizer):
    """decode_loop (the while_loop of generate) and decode_step (streaming, chat) take the same
    DecodeState to the same state: tokens, log-probs, positions, the whole cache, the key."""
    settings = sampler.settings(8, temperature=1.0, stop_token_ids=())
    ids = [_ids(small_tokenizer, 11), _ids(small_tokenizer, 6)]
    looped = decode.decode_loop(
        sampler.params, sampler.start(ids, settings, 4), jnp.int32(8), settings=settings
    )
    stepped = sampler.start(ids, settings, 4)
    assert int(stepped.step) == 1  # the prefill draws the first token
    for _ in range(7):
        stepped = decode.decode_step(sampler.params, stepped, settings=settings)
    a, b = _host(looped), _host(stepped)
    assert int(a.step) == int(b.step) == 8
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.position, b.position)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6, rtol=0)
    for x, y in zip(jax.tree.leaves(a.cache), jax.tree.leaves(b.cache)):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(a.key, b.key)


def test_feed_continues_a_cache_as_one_prefill_would(sampler, small_tokenizer):
    """Sampler.feed (a chat turn: chunks of FEED_CHUNK, then single tokens) after a prefill
    draws what one prefill of the whole text draws, past the sliding window."""
    settings = sampler.settings(6, stop_token_ids=())
    ids = _ids(small_tokenizer, 50)
    head, tail = ids[:9], ids[9:]  # 41 new tokens: one chunk of 32, then 8 singles, then a step
    whole = decode.decode_loop(
        sampler.params, sampler.start([ids], settings, 0), jnp.int32(6), settings=settings
    )
    first = sampler.start([head], settings, 0)
    # The prefill drew a token after `head`; the continuation feeds `tail` instead.
    used = int(first.cache["index"])
    fed = sampler.feed(first.cache, int(first.position[0]), tail, settings, 0)  # donates it
    assert int(fed.cache["index"]) == used + len(tail)
    fed = decode.decode_loop(sampler.params, fed, jnp.int32(6), settings=settings)
    a, b = _host(whole), _host(fed)
    assert a.tokens[0, :6].tolist() == b.tokens[0, :6].tolist()
    np.testing.assert_allclose(a.logprobs[0, :6], b.logprobs[0, :6], atol=1e-5, rtol=0)
    assert int(a.position[0]) == int(b.position[0]) == len(ids) + 5


def test_one_constructor_makes_every_state(sampler, small_tokenizer):
    """DecodeState.create is the only way a state starts: nothing drawn, empty buffers."""
    settings = sampler.settings(5)
    cache = sampler.start([_ids(small_tokenizer, 4)], settings, 0).cache
    state = decode.DecodeState.create(
        cache,
        jnp.asarray([7], jnp.int32),
        jnp.asarray([4], jnp.int32),
        jax.random.key(0),
        settings.max_new,
    )
    assert state.tokens.shape == state.logprobs.shape == (1, settings.max_new) == (1, 16)
    assert (int(state.step), state.stopped_at.tolist(), state.done.tolist()) == (0, [-1], [False])
    assert state.capacity == 128
    # A pytree: its leaves go through jit and come back as the same structure.
    same = jax.jit(lambda s: s)(state)
    assert jax.tree.structure(same) == jax.tree.structure(state)
