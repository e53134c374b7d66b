"""ChatSession: multi-turn chat that keeps its KV cache, and its overflow policy.

A tiny random model with the real Gemma 3 vocabulary (the embedded tokenizer) keeps this fast
while exercising the real chat markup. The reference for every reply is a greedy loop of full
forward passes over exactly the tokens the session says the model saw.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma_kit.config import GlobalAttention, LocalAttention, get_preset
from gemma_kit.embedded import ensure_default_model
from gemma_kit.chat import ChatOverflowError, ChatSession
from gemma_kit.sampling import SamplingError
from gemma_kit.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(ensure_default_model() / "tokenizer.model")


@pytest.fixture
def model(tiny_model):
    config = get_preset("gemma3-270m").replace(
        name="tiny-vocab", embed_dim=32, hidden_dim=48, num_heads=2, num_kv_heads=1,
        head_dim=16, query_pre_attn_scalar=16, max_context=4096,
        layers=(LocalAttention(8), LocalAttention(8), GlobalAttention(rope_base=1e6)))
    return tiny_model(config, seed=11)


@functools.partial(jax.jit, static_argnames="graphdef")
def _last_logits(graphdef, state, buffer, index):
    # One padded length for every call (causal attention ignores the padding after `index`).
    hidden = nnx.merge(graphdef, state).hidden_states(buffer)
    return nnx.merge(graphdef, state).logits(hidden[:, index][:, None])[0, 0]


def _greedy_reference(model, ids, n):
    """n greedy tokens after ids, by full forward passes (no cache)."""
    graphdef, state = nnx.split(model)
    buffer = np.zeros((1, 256), np.int32)
    buffer[0, : len(ids)] = ids
    out = []
    for i in range(n):
        logits = np.array(_last_logits(graphdef, state, jnp.asarray(buffer), len(ids) + i - 1))
        logits[[255999, 256000]] = -np.inf  # image markers are never drawn
        out.append(int(np.argmax(logits)))
        buffer[0, len(ids) + i] = out[-1]
    return out


def test_turns_reuse_the_cache_and_match_full_forward(model, tokenizer):
    chat = ChatSession(model, tokenizer, system="Be brief.", cache_length=256,
                       cache_dtype=jnp.float32)
    for turn, message in enumerate(["Hello there!", "Tell me more.", "Thanks."]):
        before = list(chat.token_ids)
        reply = chat.send(message, max_new_tokens=6)
        result = chat.last_result
        assert reply == result.text
        # The session saw: the earlier conversation, then only the new turn's tokens.
        seen = chat.token_ids
        assert seen[: len(before)] == before
        prompt_len = len(seen) - (len(result.tokens) - (result.finish_reason == "length"))
        prompt = seen[:prompt_len]
        if turn == 0:
            assert prompt == tokenizer.encode(tokenizer.format_chat(
                [{"role": "system", "content": "Be brief."},
                 {"role": "user", "content": message}]))
        else:
            assert tokenizer.decode(prompt[len(before):]).endswith(
                f"<start_of_turn>user\n{message}<end_of_turn>\n<start_of_turn>model\n")
        assert result.tokens == _greedy_reference(model, prompt, len(result.tokens))
    assert [m["role"] for m in chat.messages] == ["user", "model"] * 3


def test_overflow_drops_the_oldest_turns(model, tokenizer):
    chat = ChatSession(model, tokenizer, system="S.", cache_length=96)
    for message in ["first message here", "second message here", "third message here",
                    "fourth message here"]:
        chat.send(message, max_new_tokens=16)
        assert chat.cached_tokens <= 96
    assert chat.dropped_turns >= 1
    assert chat.messages[-2]["content"] == "fourth message here"
    assert all(m["content"] != "first message here" for m in chat.messages)


def test_overflow_error_policy_keeps_the_conversation(model, tokenizer):
    chat = ChatSession(model, tokenizer, cache_length=64, overflow="error")
    chat.send("hello", max_new_tokens=16)
    with pytest.raises(ChatOverflowError, match="exceed the cache of 64 tokens"):
        for _ in range(5):
            chat.send("and one more message please", max_new_tokens=16)
    kept = list(chat.messages)
    assert kept and len(kept) % 2 == 0
    with pytest.raises(ChatOverflowError):
        chat.send("x " * 80, max_new_tokens=16)
    assert chat.messages == kept


def test_bad_messages(model, tokenizer):
    chat = ChatSession(model, tokenizer)
    with pytest.raises(SamplingError, match="empty"):
        chat.send("   ")
    with pytest.raises(SamplingError, match="overflow"):
        ChatSession(model, tokenizer, overflow="truncate")
    with pytest.raises(SamplingError, match="does not fit"):
        ChatSession(model, tokenizer, cache_length=32).send("word " * 40, max_new_tokens=4)


def _check_reply_against_reference(chat, model):
    """The last reply equals greedy full forward passes over what the session says it saw."""
    result = chat.last_result
    seen = chat.token_ids
    prompt = seen[: len(seen) - (len(result.tokens) - (result.finish_reason == "length"))]
    assert result.tokens == _greedy_reference(model, prompt, len(result.tokens))


def test_a_stream_closed_early_keeps_what_was_shown(model, tokenizer):
    chat = ChatSession(model, tokenizer, cache_length=256, cache_dtype=jnp.float32)
    chat.send("Hello there!", max_new_tokens=6)
    stream = chat.stream("Tell me more.", max_new_tokens=12)
    shown = next(stream) + next(stream)
    stream.close()  # a stop button
    assert chat.last_result.finish_reason == "interrupted"
    assert chat.messages[-1] == {"role": "model", "content": shown}
    assert len(chat.last_result.tokens) == 2
    # The conversation goes on from the kept cache, as if the reply had ended there.
    chat.send("Thanks.", max_new_tokens=6)
    assert tokenizer.decode(chat.token_ids).count(shown) == 1
    _check_reply_against_reference(chat, model)


def test_an_error_inside_a_turn_forgets_only_that_turn(model, tokenizer):
    chat = ChatSession(model, tokenizer, cache_length=256, cache_dtype=jnp.float32)
    chat.send("Hello there!", max_new_tokens=6)
    kept = list(chat.messages)
    stream = chat.stream("Tell me more.", max_new_tokens=12)
    next(stream)
    with pytest.raises(KeyboardInterrupt):
        stream.throw(KeyboardInterrupt)  # Ctrl-C while the reply streams
    assert chat.messages == kept
    reply = chat.send("Thanks.", max_new_tokens=6)
    assert chat.messages[-2:] == [{"role": "user", "content": "Thanks."},
                                  {"role": "model", "content": reply}]
    assert "Tell me more." not in tokenizer.decode(chat.token_ids)
    _check_reply_against_reference(chat, model)


def test_undo_then_resend_regenerates_the_same_reply(model, tokenizer):
    chat = ChatSession(model, tokenizer, system="Be brief.", cache_length=256,
                       cache_dtype=jnp.float32)
    assert chat.undo() is None
    first = chat.send("Hello there!", max_new_tokens=6)
    second = chat.send("Tell me more.", max_new_tokens=6)
    ids_after_second = list(chat.token_ids)
    assert chat.undo() == {"role": "user", "content": "Tell me more."}
    assert chat.messages == [{"role": "user", "content": "Hello there!"},
                             {"role": "model", "content": first}]
    # Re-read from the messages rather than continued from the cache; the replies here
    # re-tokenize to the tokens drawn, so the model sees the same conversation again.
    assert chat.send("Tell me more.", max_new_tokens=6) == second
    assert chat.token_ids == ids_after_second
    _check_reply_against_reference(chat, model)
