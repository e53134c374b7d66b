"""ChatSession: multi-turn chat that keeps its KV cache, its overflow policy, its sampling
defaults with the DRY penalty; and `gemma-kit chat` in the terminal.

A tiny random model with the real Gemma 3 vocabulary (the embedded tokenizer) keeps this fast
while exercising the real chat markup. The reference for every reply is a greedy loop of full
forward passes over exactly the tokens the session says the model saw (with the DRY penalty of
the reply so far, computed by its definition in numpy, where a test turns it on).
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma_kit.chat import CHAT_SAMPLING, ChatOverflowError, ChatSession, instruction_tuned
from gemma_kit.cli import main
from gemma_kit.config import GlobalAttention, LocalAttention, get_preset
from gemma_kit.embedded import ensure_default_model
from gemma_kit.sampling import DryPenalty, SamplingError
from gemma_kit.tokenizer import Tokenizer

# ChatSession samples by default; the references below are greedy.
GREEDY = dict(temperature=0.0, dry=None)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(ensure_default_model() / "tokenizer.model")


@pytest.fixture
def model(tiny_model):
    config = get_preset("gemma3-270m").replace(
        name="tiny-vocab",
        embed_dim=32,
        hidden_dim=48,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        max_context=4096,
        layers=(LocalAttention(8), LocalAttention(8), GlobalAttention(rope_base=1e6)),
    )
    return tiny_model(config, seed=11)


@functools.partial(jax.jit, static_argnames="graphdef")
def _last_logits(graphdef, state, buffer, index):
    # One padded length for every call (causal attention ignores the padding after `index`).
    hidden = nnx.merge(graphdef, state).hidden_states(buffer)
    return nnx.merge(graphdef, state).logits(hidden[:, index][:, None])[0, 0]


def _dry(logits: np.ndarray, drawn: list[int], dry: DryPenalty) -> np.ndarray:
    """The DRY penalty by its definition: for each earlier position j of the reply, L is how far
    the tokens before j agree with the reply's end; drawn[j] loses multiplier * base ** (L -
    allowed_length) when L >= allowed_length (the largest such penalty)."""
    out = logits.astype(np.float64).copy()
    n = len(drawn)
    worst: dict[int, float] = {}
    for j in range(n):
        L = 0
        while L < min(j, dry.max_length) and drawn[j - 1 - L] == drawn[n - 1 - L]:
            L += 1
        if L >= dry.allowed_length:
            worst[drawn[j]] = max(
                worst.get(drawn[j], 0.0), dry.multiplier * dry.base ** (L - dry.allowed_length)
            )
    for token, penalty in worst.items():
        out[token] -= penalty
    return out


def _greedy_reference(model, ids, n, dry: DryPenalty | None = None):
    """n greedy tokens after ids, by full forward passes (no cache), with the DRY penalty of
    the tokens drawn so far if `dry`."""
    graphdef, state = nnx.split(model)
    buffer = np.zeros((1, 256), np.int32)
    buffer[0, : len(ids)] = ids
    out: list[int] = []
    for i in range(n):
        logits = np.array(_last_logits(graphdef, state, jnp.asarray(buffer), len(ids) + i - 1))
        logits[[255999, 256000]] = -np.inf  # image markers are never drawn
        if dry is not None:
            logits = _dry(logits, out, dry)
        out.append(int(np.argmax(logits)))
        buffer[0, len(ids) + i] = out[-1]
    return out


def test_turns_reuse_the_cache_and_match_full_forward(model, tokenizer):
    chat = ChatSession(
        model, tokenizer, system="Be brief.", cache_length=256, cache_dtype=jnp.float32
    )
    for turn, message in enumerate(["Hello there!", "Tell me more.", "Thanks."]):
        before = list(chat.token_ids)
        reply = chat.send(message, max_new_tokens=6, **GREEDY)
        result = chat.last_result
        assert reply == result.text
        # The session saw: the earlier conversation, then only the new turn's tokens.
        seen = chat.token_ids
        assert seen[: len(before)] == before
        prompt_len = len(seen) - (len(result.tokens) - (result.finish_reason == "length"))
        prompt = seen[:prompt_len]
        if turn == 0:
            assert prompt == tokenizer.encode(
                tokenizer.format_chat(
                    [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": message},
                    ]
                )
            )
        else:
            assert tokenizer.decode(prompt[len(before) :]).endswith(
                f"<start_of_turn>user\n{message}<end_of_turn>\n<start_of_turn>model\n"
            )
        assert result.tokens == _greedy_reference(model, prompt, len(result.tokens))
    assert [m["role"] for m in chat.messages] == ["user", "model"] * 3


def test_overflow_drops_the_oldest_turns(model, tokenizer):
    chat = ChatSession(model, tokenizer, system="S.", cache_length=96)
    for message in [
        "first message here",
        "second message here",
        "third message here",
        "fourth message here",
    ]:
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
    chat.send("Hello there!", max_new_tokens=6, **GREEDY)
    stream = chat.stream("Tell me more.", max_new_tokens=12, **GREEDY)
    shown = next(stream) + next(stream)
    stream.close()  # a stop button
    assert chat.last_result.finish_reason == "interrupted"
    assert chat.messages[-1] == {"role": "model", "content": shown}
    assert len(chat.last_result.tokens) == 2
    # The conversation goes on from the kept cache, as if the reply had ended there.
    chat.send("Thanks.", max_new_tokens=6, **GREEDY)
    assert tokenizer.decode(chat.token_ids).count(shown) == 1
    _check_reply_against_reference(chat, model)


def test_an_error_inside_a_turn_forgets_only_that_turn(model, tokenizer):
    chat = ChatSession(model, tokenizer, cache_length=256, cache_dtype=jnp.float32)
    chat.send("Hello there!", max_new_tokens=6, **GREEDY)
    kept = list(chat.messages)
    stream = chat.stream("Tell me more.", max_new_tokens=12, **GREEDY)
    next(stream)
    with pytest.raises(KeyboardInterrupt):
        stream.throw(KeyboardInterrupt)  # Ctrl-C while the reply streams
    assert chat.messages == kept
    reply = chat.send("Thanks.", max_new_tokens=6, **GREEDY)
    assert chat.messages[-2:] == [
        {"role": "user", "content": "Thanks."},
        {"role": "model", "content": reply},
    ]
    assert "Tell me more." not in tokenizer.decode(chat.token_ids)
    _check_reply_against_reference(chat, model)


def test_undo_then_resend_regenerates_the_same_reply(model, tokenizer):
    chat = ChatSession(
        model, tokenizer, system="Be brief.", cache_length=256, cache_dtype=jnp.float32
    )
    assert chat.undo() is None
    first = chat.send("Hello there!", max_new_tokens=6, **GREEDY)
    second = chat.send("Tell me more.", max_new_tokens=6, **GREEDY)
    ids_after_second = list(chat.token_ids)
    assert chat.undo() == {"role": "user", "content": "Tell me more."}
    assert chat.messages == [
        {"role": "user", "content": "Hello there!"},
        {"role": "model", "content": first},
    ]
    # Re-read from the messages rather than continued from the cache; the replies here
    # re-tokenize to the tokens drawn, so the model sees the same conversation again.
    assert chat.send("Tell me more.", max_new_tokens=6, **GREEDY) == second
    assert chat.token_ids == ids_after_second
    _check_reply_against_reference(chat, model)


# --------------------------------------------------------------------------------------------
# Sampling defaults and the DRY penalty.


def test_defaults_are_gemmas_recommended_sampling_with_dry(model, tokenizer):
    defaults = {
        name: p.default for name, p in inspect.signature(ChatSession.stream).parameters.items()
    }
    assert {k: defaults[k] for k in CHAT_SAMPLING} == dict(CHAT_SAMPLING)
    assert dict(CHAT_SAMPLING) == dict(
        temperature=1.0,
        top_k=64,
        top_p=0.95,
        dry=DryPenalty(multiplier=0.8, base=1.75, allowed_length=2),
    )
    # Sampled: the default reply is the one drawn with those settings spelled out, not greedy.
    kw = dict(max_new_tokens=12, seed=3)
    plain = ChatSession(model, tokenizer, cache_length=256).send("Hello there!", **kw)
    spelled = ChatSession(model, tokenizer, cache_length=256).send(
        "Hello there!", **kw, **CHAT_SAMPLING
    )
    greedy = ChatSession(model, tokenizer, cache_length=256).send("Hello there!", **kw, **GREEDY)
    assert plain == spelled and plain != greedy


def test_dry_replies_match_the_definition_over_turns(model, tokenizer):
    """Greedy replies with a strong DRY penalty (any repeated pair costs 5 nats) equal full
    forward passes with the penalty of the reply so far, in the first turn (prefill) and a
    later one (fed into the cache); the same replies without it repeat themselves."""
    dry = DryPenalty(multiplier=5.0, base=1.0, allowed_length=1)
    for with_dry in (None, dry):
        chat = ChatSession(model, tokenizer, cache_length=256, cache_dtype=jnp.float32)
        replies = []
        for message in ("Hello there!", "Tell me more."):
            chat.send(message, max_new_tokens=24, temperature=0.0, dry=with_dry)
            result = chat.last_result
            seen = chat.token_ids
            prompt = seen[: len(seen) - (len(result.tokens) - (result.finish_reason == "length"))]
            assert result.tokens == _greedy_reference(model, prompt, len(result.tokens), with_dry)
            replies.append(result.tokens)
        pairs = [list(zip(r, r[1:])) for r in replies]
        repeats = [len(p) - len(set(p)) for p in pairs]
        if with_dry is None:
            assert max(repeats) > 0  # the tiny model loops when greedy: the penalty has work
        else:
            assert repeats == [0, 0]  # 5 nats outweigh what this model puts between tokens


def test_speculative_sessions_leave_the_dry_penalty_off(model, tokenizer):
    """Speculative decoding does not apply the DRY penalty: a speculative session leaves it off
    by default (its replies are a plain session's with dry=None) and refuses it when asked."""
    chat = ChatSession(model, tokenizer, cache_length=256, speculative="ngram")
    plain = ChatSession(model, tokenizer, cache_length=256)
    assert chat.send("Hello there!", max_new_tokens=4, temperature=0.0) == plain.send(
        "Hello there!", max_new_tokens=4, **GREEDY
    )
    with pytest.raises(SamplingError, match="speculative decoding does not apply the DRY"):
        chat.send("Tell me more.", max_new_tokens=4, dry=DryPenalty())
    assert len(chat.messages) == 2  # the refused turn left nothing behind


@pytest.mark.parametrize(
    "name, tuned",
    [
        ("gemma-3-1b-it", True),
        ("~/models/gemma3-4b-it/checkpoint", True),
        ("/data/Gemma-3-270M-IT/", True),
        ("gemma-3-1b-it-qat-q4_0-unquantized", True),
        ("my-chat-model", True),
        ("gemma-3-1b-pt", False),
        ("gemma-3-270m", False),
        ("gemma-2-2b", False),
        ("gemma2_9b", False),
        ("~/.cache/gemma_kit/gemma3-270m", False),
        ("gemma-7b", False),
        ("runs/merged", None),
        ("gemma-2b-sft", None),
        ("checkpoints/step-100", None),
    ],
)
def test_instruction_tuned_from_the_checkpoint_name(name, tuned):
    assert instruction_tuned(name) is tuned


# --------------------------------------------------------------------------------------------
# `gemma-kit chat` in the terminal, on the tiny model in place of the embedded one.


@pytest.fixture
def terminal(model, tokenizer, monkeypatch, capsys):
    """chat(lines, *options) -> (stdout, stderr) of `gemma-kit chat` fed `lines`, with the
    tiny model standing in for the embedded 270M (its name and checkpoint folder are the
    embedded model's, so the CLI takes it for that pretrained model)."""
    import io

    monkeypatch.setattr("gemma_kit.embedded.default_model", lambda dtype=None: (model, tokenizer))

    def chat(lines, *options):
        monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{x}\n" for x in lines)))
        assert main(["chat", "--max-new-tokens", "8", *options]) == 0
        return capsys.readouterr()

    return chat


def _replies(out: str) -> list[str]:
    """The replies on stdout, which holds the prompts "> " and the replies only."""
    return [r.rstrip("\n") for r in out.split("> ") if r.strip()]


def test_cli_commands_reset_help_undo(terminal, model, tokenizer):
    out, err = terminal(
        [
            "Hello there!",
            "/reset",
            "Hello there!",
            "/help",
            "/undo",
            "/undo",
            "/nonsense",
            "Tell me more.",
            "/exit",
            "never read",
        ]
    )
    replies = _replies(out)
    assert len(replies) == 3  # one per message; the commands print to stderr
    # /reset forgot the first exchange: the same message gets the first reply again.
    assert replies[1] == replies[0]
    want = ChatSession(model, tokenizer)
    assert replies[0] == want.send("Hello there!", max_new_tokens=8)  # CHAT_SAMPLING, seed 0
    # /undo forgot the second exchange, so the third reply is a first turn's.
    assert replies[2] == ChatSession(model, tokenizer).send("Tell me more.", max_new_tokens=8)
    assert "[conversation cleared]" in err
    for command in ("/help", "/reset", "/undo", "/exit"):
        assert f"  {command} " in err
    assert "[the last exchange is forgotten]" in err and "[nothing to undo]" in err
    assert "[unknown command /nonsense: /help lists the commands]" in err


def test_cli_pretrained_notice_only_for_a_pretrained_model(terminal, tiny_model, model, tmp_path):
    from gemma_kit import lora

    _, err = terminal(["/exit"])
    assert "Chatting with tiny-vocab (/help lists the commands" in err
    assert "is a pretrained model, not a chat model" in err
    # Fine-tuned with a LoRA adapter (conversations, as a rule): a chat model, no notice.
    adapted = lora.apply_lora(tiny_model(model.config, seed=11), rank=2, alpha=4.0, targets="attn")
    folder = lora.save_adapter(adapted, tmp_path / "adapter")
    _, err = terminal(["/exit"], "--lora", str(folder))
    assert "Chatting with tiny-vocab" in err and "pretrained" not in err


def test_cli_dry_and_speculative(terminal, capsys):
    # Speculative decoding does not apply the penalty: off unless asked for, refused if asked.
    out, _ = terminal(["Hello there!"], "--speculative", "ngram")
    assert len(_replies(out)) == 1
    assert main(["chat", "--speculative", "ngram", "--dry", "0.8"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: --speculative does not apply the DRY penalty: leave --dry out or set it to 0\n"
    )
    assert main(["chat", "--dry", "-1"]) == 2
    assert "argument --dry: must be >= 0" in capsys.readouterr().err
