"""Speculative decoding: cheap drafts checked by the target model, several tokens per pass.

    sampler.generate(prompt, speculative="ngram")                  # prompt lookup
    sampler.generate(prompt, speculative=small_model)              # a draft model
    sampler.generate(prompt, speculative=NgramDrafter(k=6, max_ngram=4))

One round, for one prompt (the cache index is shared by the rows of a batch, and rows accept
different numbers of drafts, so a batch is decoded one prompt after another):

1. The drafter proposes n <= k tokens d_1..d_n after the text so far: NgramDrafter copies the
   tokens that followed the latest earlier occurrence of the text's last n-gram (prompt lookup:
   no second model); DraftModel samples them from a smaller model sharing the vocabulary, with
   the target's sampling settings, keeping their probabilities q.
2. The target reads [t, d_1, ..., d_k] (t: the last drawn token, not yet fed) in one extend()
   call, which gives the next-token distributions p_0..p_k of its sampling settings
   (temperature, filters, forbidden tokens).
3. Acceptance (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
   Decoding"; Chen et al. 2023): d_j is kept with probability min(1, p_{j-1}(d_j) /
   q_{j-1}(d_j)) while every earlier draft was kept; at the first rejection the next token is
   drawn from max(0, p - q) renormalised, and when all n drafts are kept from p_n. The tokens
   that come out are distributed as the target's own sampling. Prompt-lookup drafts have q
   one-hot (q(d) = 1). Greedy decoding keeps d_j while it equals the target's argmax and then
   takes the argmax: token for token what plain greedy decoding gives.
4. The kept tokens stay in the cache, the rejected ones leave it exactly (below). A stop token
   or max_new_tokens ends the round early, as it would end plain decoding.

Rolling the cache back. Writing k + 1 entries overwrites k + 1 ring slots of every
sliding-window layer, whose oldest entries a rejection may still need. So (a) the rings get
k extra slots (gemma_kit.cache: ring_slack), which also keeps a (k + 1)-token write from
wrapping the ring onto itself, and (b) the slots a round will write are saved before it and
those of rejected entries put back after it (cache.save_slots / cache.rollback). The cache after
a round then equals, slot for slot, the cache of plain decoding of the same tokens on the same
ring sizes (tests/test_speculative.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_kit import cache as kv_cache
from gemma_kit.decode import (
    PAD_ID,
    DecodeSettings,
    DecodeState,
    allowed_logits,
    decode_step,
    log_softmax_at,
)
from gemma_kit.sampling import SamplingError, argmax, filter_logits, sample_categorical
from gemma_kit.tuned_jit import tuned_jit


@dataclasses.dataclass(frozen=True)
class NgramDrafter:
    """Prompt lookup: drafts copied from the text so far (the prompt and what was drawn).

    The longest suffix of the history of at most max_ngram tokens (and at least min_ngram)
    that occurred before is looked up, and the up to k tokens that followed it are proposed:
    from its latest occurrence with k tokens after it, else from its earliest (the longest
    continuation; in a repeating stretch the latest occurrence is right behind). Nothing found:
    the round is a plain decode step.
    """

    k: int = 4
    max_ngram: int = 3
    min_ngram: int = 1

    def __post_init__(self):
        for name in ("k", "max_ngram", "min_ngram"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SamplingError(f"NgramDrafter {name} must be an integer >= 1, got {value!r}")
        if self.min_ngram > self.max_ngram:
            raise SamplingError(
                f"NgramDrafter min_ngram ({self.min_ngram}) is above max_ngram ({self.max_ngram})"
            )

    def propose(self, history: Sequence[int]) -> list[int]:
        """Up to k draft tokens to follow `history` (token ids), possibly none."""
        ids = np.asarray(history, np.int64)
        for n in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            # Windows that end before the last token, so the suffix itself never matches.
            windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)
            hits = np.flatnonzero((windows == ids[-n:]).all(axis=1))
            if hits.size:
                full = hits[hits + n + self.k <= len(ids)]
                start = int(full[-1] if full.size else hits[0]) + n
                return ids[start : start + self.k].tolist()
        return []


@dataclasses.dataclass(frozen=True, eq=False)
class DraftModel:
    """A smaller model drafting for a larger one; it must share the target's vocabulary.

    k: draft tokens per round. The draft keeps its own cache (with the same ring slack), made
    by its own prefill of the prompt and rolled back with the target's after every round.
    """

    model: object
    k: int = 4

    def __post_init__(self):
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise SamplingError(f"DraftModel k must be an integer >= 1, got {self.k!r}")


def resolve(speculative) -> NgramDrafter | DraftModel:
    """ "ngram", an NgramDrafter, a DraftModel, or a model (-> DraftModel(model))."""
    if isinstance(speculative, (NgramDrafter, DraftModel)):
        return speculative
    if speculative == "ngram":
        return NgramDrafter()
    if isinstance(speculative, nnx.Module) and hasattr(speculative, "config"):
        return DraftModel(speculative)
    raise SamplingError(
        f"speculative must be 'ngram', a draft model (a gemma_kit Transformer sharing the "
        f"vocabulary), NgramDrafter(...) or DraftModel(...); got {speculative!r}"
    )


@dataclasses.dataclass
class SpeculativeStats:
    """Counts over a decode: verification rounds, plain steps (no draft, or no room for one),
    tokens drafted, and drafts accepted (kept in the output)."""

    rounds: int = 0
    steps: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        """Accepted / drafted."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Tokens drawn per pass of the target model (after the prefill's first token)."""
        passes = self.rounds + self.steps
        return (passes + self.accepted) / passes if passes else 0.0


# --------------------------------------------------------------------------------------------
# Device side: pure functions (vmappable, used by the tests) and their compiled wrappers.


def target_distribution(settings: DecodeSettings, allowed: jax.Array) -> jax.Array:
    """[T, V] allowed logits -> [T, V] the probabilities sampling draws from (temperature,
    filters); one-hot at the argmax for greedy settings."""
    return jax.nn.softmax(filter_logits(allowed, settings.params), axis=-1)


def verify(
    settings: DecodeSettings,
    model,
    state: DecodeState,
    drafts: jax.Array,
    q: jax.Array | None,
    n: jax.Array,
    limit: jax.Array,
):
    """One round: the target reads [token, drafts], keeps what acceptance keeps.

    drafts: [1, k] int32, the first n valid; q: [1, k, V] the draft's probabilities of each
    position, or None for one-hot drafts (prompt lookup); limit: the most tokens drawn in all.
    Returns (the state after the round, drafts accepted). The state's cache holds the fed
    tokens only: its last drawn token is fed by the next round, as in plain decoding.
    """
    k = drafts.shape[1]
    T = k + 1
    index = state.cache["index"]
    tokens = jnp.concatenate([state.token[:, None], drafts], axis=1)  # [1, T]
    positions = state.position[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
    saved = kv_cache.save_slots(state.cache, T)
    hidden, cache = model.extend(tokens, positions, state.cache)
    logits = model.logits(hidden)[0].astype(jnp.float32)  # [T, V]
    allowed = allowed_logits(settings, logits)
    key, accept_key, draw_key = jax.random.split(state.key, 3)
    d = drafts[0]
    j = jnp.arange(k)
    valid = j < n
    if settings.params.greedy:
        best = argmax(allowed)  # [T]
        ok = valid & (d == best[:k])
    else:
        p = target_distribution(settings, allowed)  # [T, V]
        p_d = p[j, d]
        q_d = 1.0 if q is None else q[0, j, d]
        u = jax.random.uniform(accept_key, (k,))
        ok = valid & (u * q_d < p_d)  # u < p / q, without dividing by a zero q
    a = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))  # drafts accepted
    if settings.params.greedy:
        nxt = best[a]
    else:
        # The residual max(0, p - q) at the first rejection; p itself past the valid drafts.
        at = jnp.minimum(a, k - 1)
        q_a = jax.nn.one_hot(d[at], p.shape[-1]) if q is None else q[0, at]
        resid = jnp.maximum(p[a] - jnp.where(a < n, q_a, 0.0), 0.0)
        resid = jnp.where(jnp.sum(resid) > 0, resid, p[a])  # p == q: rejection had chance 0
        nxt = sample_categorical(draw_key, jnp.log(resid)[None])[0]
    out = jnp.concatenate([d, jnp.zeros((1,), d.dtype)]).at[a].set(nxt)  # [T]; valid to a
    i = jnp.arange(T)
    stops = jnp.isin(out, jnp.asarray(settings.stop_ids or (-1,))) & (i <= a)
    m = jnp.where(jnp.any(stops), jnp.argmax(stops), a)  # the last token this round may emit
    emit = jnp.minimum(m + 1, limit - state.step)  # tokens drawn this round, >= 1
    keep = i < emit
    out = jnp.where(keep, out, PAD_ID)
    logprobs = jnp.where(keep, log_softmax_at(logits, out), 0.0)
    stopped = jnp.any(stops & keep)
    step = state.step
    state = state.replace(
        cache=kv_cache.rollback(cache, saved, index, emit),
        token=out[emit - 1][None],
        position=state.position + emit,
        step=step + emit,
        tokens=jax.lax.dynamic_update_slice_in_dim(state.tokens, out[None], step, 1),
        logprobs=jax.lax.dynamic_update_slice_in_dim(state.logprobs, logprobs[None], step, 1),
        stopped_at=jnp.where(stopped, step + m, state.stopped_at),
        done=state.done | stopped,
        key=key,
    )
    return state, a


def draft(settings: DecodeSettings, model, state: DecodeState, k: int, barrier=None):
    """k + 1 decode steps of a draft model: feeds its token, then d_1..d_k, drawing d_1..d_k
    (the last draw is discarded: the step only feeds d_k, so that the draft's cache holds the
    same k + 1 entries as the target's after verify).

    Returns (state after the steps, the slots saved for rollback, drafts [1, k], q [1, k, V]).
    barrier: the params to tie to each step (see decode.decode_loop), or None.
    """
    saved = kv_cache.save_slots(state.cache, k + 1)
    B, V = state.token.shape[0], model.config.vocab_size

    def body(j, carry):
        cache, token, key, drafts, qs = carry
        m = model
        if barrier is not None:
            params, token = jax.lax.optimization_barrier((barrier[1], token))
            m = nnx.merge(barrier[0], params)
        hidden, cache = m.extend(token[:, None], (state.position + j)[:, None], cache)
        allowed = allowed_logits(settings, m.logits(hidden)[:, 0].astype(jnp.float32))
        key, sub = jax.random.split(key)
        if settings.params.greedy:
            token = argmax(allowed)
            probs = jax.nn.one_hot(token, V)
        else:
            x = filter_logits(allowed, settings.params)
            token = sample_categorical(sub, x)
            probs = jax.nn.softmax(x, axis=-1)
        drafts = jax.lax.dynamic_update_slice_in_dim(drafts, token[:, None], j, 1)
        qs = jax.lax.dynamic_update_slice_in_dim(qs, probs[:, None], j, 1)
        return cache, token, key, drafts, qs

    init = (
        state.cache,
        state.token,
        state.key,
        jnp.zeros((B, k + 1), jnp.int32),
        jnp.zeros((B, k + 1, V), jnp.float32),
    )
    cache, _, key, drafts, qs = jax.lax.fori_loop(0, k + 1, body, init)
    state = state.replace(cache=cache, key=key, position=state.position + k + 1)
    return state, saved, drafts[:, :k], qs[:, :k]


@functools.partial(tuned_jit, static_argnames=("settings",), donate_argnames=("state",))
def verify_step(params, state, drafts, q, n, limit, *, settings: DecodeSettings):
    """verify() compiled; q None (prompt lookup) is a program of its own."""
    return verify(settings, nnx.merge(settings.graphdef, params), state, drafts, q, n, limit)


@functools.partial(tuned_jit, static_argnames=("settings", "k"), donate_argnames=("state",))
def draft_step(params, state, *, settings: DecodeSettings, k: int):
    """draft() compiled, the weights kept inside its loop (see decode.decode_loop)."""
    model = nnx.merge(settings.graphdef, params)
    return draft(settings, model, state, k, barrier=(settings.graphdef, params))


@functools.partial(jax.jit, donate_argnames=("state",))
def rollback_draft(state: DecodeState, saved, index, kept, token, position) -> DecodeState:
    """The draft's state after a round: its cache back to `kept` of the k + 1 entries written
    from `index`, and the target's last drawn token to feed next, at `position`."""
    # Copies: returned as they are, the target's own buffers would be handed to the draft's
    # next (donating) step.
    return state.replace(
        cache=kv_cache.rollback(state.cache, saved, index, kept),
        token=jnp.copy(token),
        position=jnp.copy(position),
    )


# --------------------------------------------------------------------------------------------
# Host side: the rounds of one prompt.


def rounds(
    sampler,
    state: DecodeState,
    settings: DecodeSettings,
    drafter,
    limit: int,
    history: list[int],
    stats: SpeculativeStats,
    draft_state: DecodeState | None = None,
    draft_settings: DecodeSettings | None = None,
    draft_params=None,
) -> Iterator[DecodeState]:
    """Advances the state of one prompt (made with ring_slack = drafter.k) round by round,
    yielding it after each round, until it stopped, `limit` tokens were drawn, or the cache
    is full. `history` (the prompt's ids) grows by the drawn tokens (prompt lookup reads it).

    With a DraftModel, draft_state is the draft's state after its prefill of the same prompt.
    Rounds fall back to plain decode steps when fewer than k + 1 cache slots are left.
    """
    k = drafter.k
    seen = 0
    capacity = state.capacity
    draft_capacity = draft_state.capacity if draft_state is not None else None
    limit_arr = jnp.int32(limit)
    while True:
        step, done, index, tokens = jax.device_get(
            (state.step, state.done[0], state.cache["index"], state.tokens[0])
        )
        step = int(step)
        history.extend(int(t) for t in tokens[seen:step])
        seen = step
        if done or step >= limit or index >= capacity:
            return
        room = index + k + 1 <= capacity
        if draft_state is not None:
            d_index = int(draft_state.cache["index"])
            room = room and d_index + k + 1 <= draft_capacity
        if not room:
            state = decode_step(sampler.arrays, state, settings=settings)
            stats.steps += 1
        elif draft_state is not None:
            draft_state, saved, drafts, q = draft_step(
                draft_params, draft_state, settings=draft_settings, k=k
            )
            state, _ = verify_step(
                sampler.arrays, state, drafts, q, jnp.int32(k), limit_arr, settings=settings
            )
            kept = state.step - step
            draft_state = rollback_draft(
                draft_state, saved, d_index, kept, state.token, state.position
            )
            stats.rounds += 1
            stats.drafted += k
            stats.accepted += int(kept) - 1
        else:
            proposal = drafter.propose(history)
            if not proposal:
                state = decode_step(sampler.arrays, state, settings=settings)
                stats.steps += 1
            else:
                n = len(proposal)
                drafts = np.zeros((1, k), np.int32)
                drafts[0, :n] = proposal
                state, _ = verify_step(
                    sampler.arrays,
                    state,
                    jnp.asarray(drafts),
                    None,
                    jnp.int32(n),
                    limit_arr,
                    settings=settings,
                )
                stats.rounds += 1
                stats.drafted += n
                stats.accepted += int(state.step) - step - 1
        yield state
