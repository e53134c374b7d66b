"""Speculative decoding (gemma_kit.speculative): greedy output token for token as plain greedy,
sampled output distributed as the target's, and the cache rolled back exactly.

Tiny random models (sliding window 4, shorter than every text here, so the rings wrap) and the
small real tokenizer, float32 caches. A random tiny model decodes greedily into one repeated
token (its tied embedding dominates the residual stream), which would make every draft right:
`_lively` raises the post-norm scales so that the layers steer and the text varies, and drafts
get rejected too. The draft model is the target with one weight matrix perturbed: it agrees
with the target on some tokens only.
"""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma_kit import cache as kv_cache
from gemma_kit import decode
from gemma_kit import speculative as spec
from gemma_kit.chat import ChatSession
from gemma_kit.sampler import Sampler
from gemma_kit.sampling import SamplingError, filter_logits
from tests.support import tiny
from tests.support.tiny import SMALL_TEXT, SMALL_VOCAB

WORDS = SMALL_TEXT.split()
PROMPT = " ".join(WORDS[:30])
NEW = 48


def _lively(seed: int = 1, noise: float = 0.0):
    config = tiny.tiny_gemma3().replace(vocab_size=SMALL_VOCAB, max_context=256)
    model = tiny.random_model(config, seed=seed)
    for block in model.blocks:
        for norm in (block.post_attention_norm, block.post_ffw_norm):
            norm.scale[...] = norm.scale[...] + 10.0
    if noise:
        w = model.blocks[1].mlp.linear.w
        w[...] = w[...] + np.random.default_rng(99).normal(0, noise, w.shape).astype(np.float32)
    return model


@pytest.fixture(scope="module")
def target():
    return _lively()


@pytest.fixture(scope="module")
def draft():
    return _lively(noise=0.3)


@pytest.fixture(scope="module")
def sampler(target, small_tokenizer):
    return Sampler(target, small_tokenizer, cache_dtype=jnp.float32)


@pytest.fixture(scope="module")
def plain(sampler):
    """Plain greedy decoding of PROMPT, NEW tokens, nothing stops it."""
    return sampler.generate(PROMPT, max_new_tokens=NEW, stop_token_ids=())


# ------------------------------------------------------------------------------------------
# Drafts.


def test_ngram_drafter_copies_what_followed_the_last_ngram():
    drafter = spec.NgramDrafter(k=4, max_ngram=3)
    # [9, 1, 2] never occurred before; [1, 2] did, twice: the latest with 4 tokens after it.
    assert drafter.propose([1, 2, 3, 4, 1, 2, 3, 9, 1, 2]) == [3, 9, 1, 2]
    assert spec.NgramDrafter(k=2).propose([1, 2, 3, 4, 1, 2, 3, 9, 1, 2]) == [3, 9]
    # In a repeating stretch the latest occurrence is right behind: the earlier one with a
    # full continuation is taken.
    assert spec.NgramDrafter(k=3).propose([5] * 6) == [5, 5, 5]
    assert drafter.propose([7, 8, 9]) == [] and drafter.propose([7]) == []
    # min_ngram: a single repeated token is no evidence at min_ngram=2.
    assert spec.NgramDrafter(k=2, min_ngram=2).propose([4, 6, 1, 6]) == []
    assert spec.NgramDrafter(k=2, min_ngram=1).propose([4, 6, 1, 6]) == [1, 6]
    with pytest.raises(SamplingError, match="NgramDrafter k must be an integer >= 1, got 0"):
        spec.NgramDrafter(k=0)


# ------------------------------------------------------------------------------------------
# Greedy: token for token.


@pytest.mark.parametrize("which", ["ngram", "ngram-k2", "draft", "draft-k6"])
def test_greedy_equals_plain_greedy(sampler, plain, draft, which):
    speculative = {
        "ngram": "ngram",
        "ngram-k2": spec.NgramDrafter(k=2),
        "draft": draft,
        "draft-k6": spec.DraftModel(draft, k=6),
    }[which]
    got = sampler.generate(PROMPT, max_new_tokens=NEW, stop_token_ids=(), speculative=speculative)
    assert got.tokens == plain.tokens and got.finish_reason == plain.finish_reason == "length"
    np.testing.assert_allclose(got.logprobs, plain.logprobs, atol=1e-5, rtol=0)
    stats = got.speculative
    print(f"{which}: {stats}, acceptance {stats.acceptance:.2f}")
    # Both paths of a round were taken: drafts kept, and drafts rejected and rolled back.
    assert 0 < stats.accepted < stats.drafted
    assert stats.rounds < NEW


def _same(got, want) -> None:
    """The same completion; log-probs to rounding (a verification reads several tokens at
    once, a plain step one)."""
    assert (got.text, got.tokens, got.finish_reason, got.prompt_tokens) == (
        want.text,
        want.tokens,
        want.finish_reason,
        want.prompt_tokens,
    )
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5, rtol=0)


def test_stops_and_limits_end_a_round_where_plain_decoding_ends(sampler, plain):
    """With prompt lookup (a draft model's rounds end in the same verify(); the chat test
    below ends one with a stop string)."""
    # A stop token inside a round: the round ends on it (kept out of the tokens, as plain).
    at = next(i for i in range(6, NEW) if plain.tokens[i] not in plain.tokens[:i])
    kw = dict(max_new_tokens=NEW, stop_token_ids=[plain.tokens[at]])
    want = sampler.generate(PROMPT, **kw)
    assert want.finish_reason == "stop" and want.tokens == plain.tokens[:at]
    got = sampler.generate(PROMPT, **kw, speculative="ngram")
    _same(got, want)
    assert got.speculative.accepted > 0
    # max_new_tokens inside a round (13 is no multiple of a round's tokens), a stop string.
    got = sampler.generate(PROMPT, max_new_tokens=13, stop_token_ids=(), speculative="ngram")
    _same(got, sampler.generate(PROMPT, max_new_tokens=13, stop_token_ids=()))
    stop = plain.text[len(plain.text) // 2 : len(plain.text) // 2 + 3]
    kw_stop = dict(max_new_tokens=NEW, stop_token_ids=(), stop=stop)
    want_stop = sampler.generate(PROMPT, **kw_stop)
    _same(sampler.generate(PROMPT, **kw_stop, speculative="ngram"), want_stop)
    # Streaming joins to the same text.
    assert "".join(sampler.stream(PROMPT, **kw_stop, speculative="ngram")) == want_stop.text
    # A batch is decoded one prompt after another.
    other = " ".join(WORDS[50:60])
    batch = sampler.generate(
        [PROMPT, other], max_new_tokens=20, stop_token_ids=(), speculative="ngram"
    )
    assert [r.tokens for r in batch] == [
        sampler.generate(p, max_new_tokens=20, stop_token_ids=()).tokens for p in (PROMPT, other)
    ]


def test_chat_with_speculation_replies_as_without(target, draft, small_tokenizer):
    """Three greedy turns, the second ended by a stop string: the replies of ChatSessions with
    prompt lookup and with a draft model are those of a plain one."""
    kw = dict(cache_length=192, cache_dtype=jnp.float32)
    chats = [
        ChatSession(target, small_tokenizer, **kw),
        ChatSession(target, small_tokenizer, speculative="ngram", **kw),
        ChatSession(target, small_tokenizer, speculative=draft, **kw),
    ]
    for message, stop in (
        ("for each item in the list", None),
        ("and then?", "the"),
        ("while it holds", None),
    ):
        replies = [
            c.send(message, max_new_tokens=12, stop=stop, temperature=0.0, dry=None) for c in chats
        ]
        assert replies[1] == replies[0] and replies[2] == replies[0]
        # The model saw the same conversation, also after a stop string ended a reply inside
        # a round (the speculative sessions then re-read it as plain decoding had fed it).
        assert chats[1].token_ids == chats[0].token_ids == chats[2].token_ids


# ------------------------------------------------------------------------------------------
# The cache after rejected drafts.


def _host_cache(cache) -> dict:
    return jax.tree.map(np.asarray, jax.device_get(cache))


def _assert_same_cache(got, want, what):
    assert int(got["index"]) == int(want["index"]), what
    for name in want:
        if name == "index":
            continue
        np.testing.assert_array_equal(got[name]["pos"], want[name]["pos"], err_msg=what)
        for key in ("k", "v"):
            np.testing.assert_allclose(
                got[name][key], want[name][key], atol=1e-5, rtol=0, err_msg=f"{what}: {name}/{key}"
            )


def test_the_cache_after_rejected_drafts_equals_plain_decoding(sampler, draft, small_tokenizer):
    """Rounds that keep 0, 2, all 4 and 1 of 4 drafts, on the target (crafted drafts) and on
    the draft model (its own drafts, k + 1 entries written, then rolled back): after each,
    every slot of every layer (k, v, positions) and the index equal those of plain decoding of
    the same tokens on the same ring sizes (window 4 + slack 4: the rings wrap many times)."""
    k = 4
    settings = sampler.speculative_settings(
        sampler.settings(40, stop_token_ids=()), spec.NgramDrafter(k=k), 40
    )
    ids = small_tokenizer.encode(PROMPT)
    # Plain decoding: the greedy tokens and the cache after each step.
    state = sampler.start([ids], settings, 0, ring_slack=k)
    caches = [_host_cache(state.cache)]
    for _ in range(16):
        state = decode.decode_step(sampler.params, state, settings=settings)
        caches.append(_host_cache(state.cache))
    greedy = np.asarray(state.tokens[0, :17]).tolist()

    state = sampler.start([ids], settings, 0, ring_slack=k)
    drawn = 1
    for kept in (0, 2, 4, 1):
        wrong = (greedy[drawn + kept] + 1) % SMALL_VOCAB
        drafts = (greedy[drawn : drawn + kept] + [wrong] * k)[:k]
        state, accepted = spec.verify_step(
            sampler.params,
            state,
            jnp.asarray([drafts]),
            None,
            jnp.int32(k),
            jnp.int32(40),
            settings=settings,
        )
        assert int(accepted) == kept
        drawn += kept + 1
        assert np.asarray(state.tokens[0, :drawn]).tolist() == greedy[:drawn]
        _assert_same_cache(_host_cache(state.cache), caches[drawn - 1], f"target, kept {kept}")

    # The draft model: its cache after a round (k + 1 entries written by its steps, the ones
    # past `kept` + 1 taken back) against its cache fed the kept tokens one at a time.
    dsampler = Sampler(draft, small_tokenizer, cache_dtype=jnp.float32)
    dsettings = decode.DecodeSettings(dsampler.graphdef, settings.params, (), (), 16)
    dstate = dsampler.start([ids], dsettings, 0, ring_slack=k)
    ref = jax.tree.map(jnp.copy, dstate.cache)
    position = len(ids)
    for kept in (0, 2, 4, 1):
        fed = [int(dstate.token[0])]
        index = int(dstate.cache["index"])
        dstate, saved, drafts, _ = spec.draft_step(dsampler.params, dstate, settings=dsettings, k=k)
        fed += np.asarray(drafts[0, :kept]).tolist()
        nxt = jnp.asarray([(fed[-1] + 7) % SMALL_VOCAB], jnp.int32)  # the target's next token
        dstate = dsampler_state = spec.rollback_draft(
            dstate, saved, index, kept + 1, nxt, jnp.asarray([position + kept + 1])
        )
        for token in fed:
            _, ref = decode.extend_chunk(
                dsampler.params,
                jnp.asarray([[token]]),
                jnp.asarray([[position]]),
                ref,
                graphdef=dsampler.graphdef,
            )
            position += 1
        _assert_same_cache(
            _host_cache(dsampler_state.cache), _host_cache(ref), f"draft, kept {kept}"
        )


def test_save_and_rollback_restore_the_slots(tiny_gemma3_config):
    """cache.rollback puts back exactly the saved slots of the entries it takes back."""
    cache = kv_cache.init_cache(tiny_gemma3_config, 1, 16, jnp.float32, ring_slack=2)
    rng = np.random.default_rng(0)
    layer = cache["layer_0"]  # a ring of 4 + 2 slots
    assert layer["pos"].shape == (1, 6) and cache["layer_2"]["pos"].shape == (1, 16)
    cache = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape).astype(x.dtype)), cache)
    cache["index"] = jnp.int32(9)
    saved = kv_cache.save_slots(cache, 3)
    written = jax.tree.map(lambda x: x + 1, cache)
    back = kv_cache.rollback(written, saved, jnp.int32(9), jnp.int32(1))
    assert int(back["index"]) == 10
    for name in ("layer_0", "layer_2"):
        S = cache[name]["pos"].shape[1]
        for slot in range(S):
            # Entry 9 (kept) stays written; entries 10 and 11 (taken back) are restored; the
            # other slots are as the (pretend) write left them.
            source = cache if slot in (10 % S, 11 % S) else written
            np.testing.assert_array_equal(back[name]["k"][:, slot], source[name]["k"][:, slot])
    with pytest.raises(ValueError, match="would wrap onto itself"):
        kv_cache.save_slots(cache, 6)


# ------------------------------------------------------------------------------------------
# Sampling: distributed as the target's.

SAMPLES = 12_000
CHUNK = 1_500


def _chi2_threshold(dof: int, z: float = 3.719) -> float:
    """Upper quantile of chi-square(dof) at z standard deviations (3.719: one in 10^4), by the
    Wilson-Hilferty approximation (within ~1% of the exact quantile for dof >= 10)."""
    c = 2.0 / (9.0 * dof)
    return dof * (1.0 - c + z * math.sqrt(c)) ** 3


def _chi2(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic of counts against probs (bins expecting < 5 pooled), and its dof."""
    n = counts.sum()
    assert counts[probs == 0].sum() == 0, "a token of probability 0 was drawn"
    expected = n * probs
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] < 5:  # too little left over to be a bin of its own
        obs, exp = obs[:-1], exp[:-1]
    return float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1


@functools.partial(jax.jit, static_argnums=(0, 3))
def _forward_probs(graphdef, params, tokens, params_settings):
    """softmax of the filtered last-position logits of a batch of sequences [R, L] -> [R, V]."""
    logits = nnx.merge(graphdef, params)(tokens)[:, -1].astype(jnp.float32)
    return jax.nn.softmax(filter_logits(logits, params_settings), axis=-1)


@pytest.mark.parametrize("which", ["ngram", "draft"])
def test_sampled_tokens_are_distributed_as_the_targets(sampler, draft, small_tokenizer, which):
    """The first two tokens drawn by speculative rounds (k = 2; two rounds from the same state,
    keys varied) against the target's exact distributions: the first p(y1 | context), the
    second the marginal sum_y1 p(y1) p(y2 | context, y1), each by Pearson's chi-square test at
    a false-alarm rate of 10^-4 on 12,000 samples. Prompt-lookup drafts are fixed tokens (the
    target's most likely first token, then any); the draft model samples its own (perturbed)
    distribution, which the same test rejects by far: the test can see a wrong sampler."""
    k = 2
    params = dict(temperature=1.0) if which == "ngram" else dict(temperature=0.8, top_p=0.9)
    settings = sampler.settings(8, **params, stop_token_ids=(), forbidden_token_ids=())
    settings = sampler.speculative_settings(settings, spec.NgramDrafter(k=k), 8)
    ids = small_tokenizer.encode(PROMPT)
    state0 = sampler.start([ids], settings, 0, ring_slack=k)
    context = ids + [int(state0.token[0])]
    graphdef, tparams = nnx.split(sampler.model)
    p1 = np.asarray(_forward_probs(graphdef, tparams, jnp.asarray([context]), settings.params))[0]
    support = np.flatnonzero(p1 > 0)
    rows = jnp.asarray([context + [int(y)] for y in support])
    p2 = p1[support] @ np.asarray(_forward_probs(graphdef, tparams, rows, settings.params))
    target = nnx.merge(sampler.graphdef, sampler.params)
    limit = jnp.int32(8)

    if which == "ngram":
        drafts = jnp.asarray([[int(np.argmax(p1)), int(np.argsort(p1)[-3])]], jnp.int32)

        def two_tokens(key):
            state = state0.replace(key=key)
            for _ in range(2):
                state, _ = spec.verify(settings, target, state, drafts, None, jnp.int32(k), limit)
            return state.tokens[0, 1:3]
    else:
        dsampler = Sampler(draft, small_tokenizer, cache_dtype=jnp.float32)
        dsettings = decode.DecodeSettings(dsampler.graphdef, settings.params, (), (), 16)
        dmodel = nnx.merge(dsampler.graphdef, dsampler.params)
        d0 = dsampler.start([ids], dsettings, 0, ring_slack=k)
        d0 = d0.replace(token=state0.token, position=state0.position)

        def two_tokens(key):
            tkey, dkey = jax.random.split(key)
            state, dstate = state0.replace(key=tkey), d0.replace(key=dkey)
            for _ in range(2):
                index = dstate.cache["index"]
                dstate, saved, drafts, q = spec.draft(dsettings, dmodel, dstate, k)
                step = state.step
                state, _ = spec.verify(settings, target, state, drafts, q, jnp.int32(k), limit)
                dstate = dstate.replace(
                    cache=kv_cache.rollback(dstate.cache, saved, index, state.step - step),
                    token=state.token,
                    position=state.position,
                )
            return state.tokens[0, 1:3]

    run = jax.jit(jax.vmap(two_tokens))
    keys = jax.random.split(jax.random.key(123), SAMPLES)
    drawn = np.concatenate([np.asarray(run(keys[i : i + CHUNK])) for i in range(0, SAMPLES, CHUNK)])
    threshold_of = _chi2_threshold
    for position, probs in ((0, p1), (1, p2)):
        counts = np.bincount(drawn[:, position], minlength=SMALL_VOCAB)
        stat, dof = _chi2(counts, probs)
        tv = 0.5 * np.abs(counts / SAMPLES - probs).sum()
        print(
            f"{which} token {position + 1}: chi2 {stat:.1f} on {dof} dof "
            f"(threshold {threshold_of(dof):.1f}), TV {tv:.4f}"
        )
        assert stat < threshold_of(dof)
    if which == "draft":
        # The draft's own first-token distribution, which a sampler that kept every draft
        # would follow, is far outside the same test.
        dprobs = np.asarray(
            _forward_probs(
                nnx.split(draft)[0], nnx.split(draft)[1], jnp.asarray([context]), settings.params
            )
        )[0]
        counts = np.bincount(drawn[:, 0], minlength=SMALL_VOCAB)
        mix = 0.5 * (dprobs + p1)  # defined wherever either has mass
        stat_draft, dof = _chi2(counts, mix)
        assert stat_draft > 10 * threshold_of(dof)


# ------------------------------------------------------------------------------------------
# Bad input.


def test_bad_speculative_arguments(sampler, small_tokenizer):
    with pytest.raises(SamplingError, match="speculative must be 'ngram', a draft model"):
        sampler.generate(PROMPT, speculative="lookup")
    config = tiny.tiny_gemma3().replace(vocab_size=256)
    other = tiny.random_model(config, seed=0)
    with pytest.raises(
        SamplingError,
        match=r"the draft model \(tiny-gemma3\) has a vocabulary "
        r"of 256 tokens but the target \(tiny-gemma3\) has "
        r"384: a draft model must share",
    ):
        sampler.generate(PROMPT, speculative=other)
    with pytest.raises(SamplingError, match="speculative decoding takes text prompts only"):
        sampler.generate(PROMPT, speculative="ngram", images=[np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(SamplingError, match="DraftModel k must be an integer >= 1"):
        spec.DraftModel(other, k=0)


def test_cli_reports_a_missing_draft_model_before_loading(tmp_path, capsys):
    from gemma_kit.cli import main

    missing = tmp_path / "no_such_draft"
    assert main(["sample", "--prompt", "hi", "--speculative", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no_such_draft" in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------------
# The real Gemma 3 270M.

REAL_TEXT = (
    "The history of computing is a story of abstraction. Early machines were programmed by "
    "rewiring panels; later ones read instructions from punched cards, then from magnetic "
    "memory. Each step let people describe what they wanted at a higher level and leave the "
    "details to the machine."
)
REAL_PROMPT = f"{REAL_TEXT}\n\nThe same paragraph, copied exactly:\n\n"
NEAR_TIE = 1e-3  # f32 top-2 logit margin below which rounding alone may flip an argmax


@pytest.mark.real_model
def test_real_270m_prompt_lookup_greedy_equals_plain(capsys):
    """Float32 weights and cache; compared up to the first near-tie of plain greedy decoding
    (a chunked verification and single-token steps round differently)."""
    import gemma_kit
    from gemma_kit.cli import main

    model, tok = gemma_kit.default_model(jnp.float32)
    s = Sampler(model, tok, cache_dtype=jnp.float32)
    plain = s.generate(REAL_PROMPT, max_new_tokens=NEW, stop_token_ids=())
    got = s.generate(REAL_PROMPT, max_new_tokens=NEW, stop_token_ids=(), speculative="ngram")
    ids = tok.encode(REAL_PROMPT)
    logits = np.asarray(model(jnp.asarray([ids + plain.tokens]))[0, len(ids) - 1 : -1], np.float32)
    top2 = np.sort(logits, axis=-1)[:, -2:]
    near = np.flatnonzero(top2[:, 1] - top2[:, 0] < NEAR_TIE)
    n = int(near[0]) if near.size else NEW
    print(
        f"270M prompt lookup: {got.speculative}, acceptance {got.speculative.acceptance:.2f},"
        f" compared {n} of {NEW} tokens"
    )
    assert n >= 32
    assert got.tokens[:n] == plain.tokens[:n]
    assert got.speculative.accepted >= 16  # copying text: most drafts are right
    # The command line, bf16 (the default): the same tokens as the library with the flag.
    capsys.readouterr()
    assert (
        main(
            [
                "sample",
                "--prompt",
                REAL_PROMPT,
                "--max-new-tokens",
                "16",
                "--json",
                "--speculative",
                "ngram",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    bf16, tok16 = gemma_kit.default_model()
    want = Sampler(bf16, tok16).generate(REAL_PROMPT, max_new_tokens=16, speculative="ngram")
    assert out["tokens"] == want.tokens
