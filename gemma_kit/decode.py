"""The decode state and the compiled pieces every sampling path runs: prefill, step, loop, chunk.

Sampler.generate and Sampler.stream, ChatSession and training rollouts
(gemma_kit.posttrain.rollout) all drive one state machine:

    prefill(prompt batch)       -> DecodeState: the cache holds the prompt, `token` is the first
                                   drawn token (recorded in `tokens`), not yet fed to the model
    decode_step(state)          -> feeds each row's `token`, draws the next one, records it
    decode_loop(state, limit)   -> decode_step in a jax.lax.while_loop until every row stopped,
                                   `limit` tokens were drawn or the cache is full
    extend_chunk(cache, chunk)  -> writes a chunk of tokens into a filled cache (a chat turn)

A DecodeState is made in one place, `DecodeState.create`; every other state comes out of
`record`. Shapes are static and bucketed (`bucket`), the parameters and the state are arguments
of the compiled functions (the state's buffers donated), and everything static sits in one
hashable `DecodeSettings`: steady-state decoding never recompiles, and new parameters of the
same shapes (a training step's) reuse the compiled programs.

Dimension letters as in gemma_kit.layers: B rows, P padded prompt length, N the bucketed number
of new tokens (`DecodeSettings.max_new`), V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx, struct

from gemma_kit import cache as kv_cache
from gemma_kit.sampling import SamplingParams, dry_penalty, sample
from gemma_kit.tuned_jit import tuned_jit

PAD_ID = 0


def bucket(n: int, minimum: int = 32) -> int:
    """Rounds up to 32, 48, 64, 96, 128, 192, ...: at most a third wasted, few shapes."""
    size = minimum
    while True:
        if n <= size:
            return size
        if n <= size * 3 // 2:
            return size * 3 // 2
        size *= 2


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """Everything static about a decode: part of the compiled programs' keys.

    graphdef: the model's graph (with its frozen Config); params: the sampling settings;
    stop_ids: token ids that end a row (recorded, then the row is done); forbidden_ids: ids
    never drawn; max_new: the bucketed length N of the output buffers.
    """

    graphdef: nnx.GraphDef
    params: SamplingParams
    stop_ids: tuple[int, ...]
    forbidden_ids: tuple[int, ...]
    max_new: int
    _hash: int = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        # jit hashes its static arguments on every call. A model's graphdef takes milliseconds
        # to hash (3 ms for the 270M's 18 layers, measured), which a streamed token would pay
        # each step, so the hash is taken once.
        fields = (self.graphdef, self.params, self.stop_ids, self.forbidden_ids, self.max_new)
        object.__setattr__(self, "_hash", hash(fields))

    def __hash__(self) -> int:
        return self._hash


@struct.dataclass
class DecodeState:
    """Where a batch of decodes stands (a pytree: the compiled functions take and return it).

    cache: the KV cache (gemma_kit.cache), holding every token fed so far.
    token: [B] each row's last drawn token, not yet fed to the model.
    position: [B] the absolute position `token` will take when fed.
    step: [] int32, tokens drawn so far (the next slot of `tokens`).
    tokens: [B, N] the drawn tokens; a row's stop token is recorded at `stopped_at`, later
      slots of a done row hold PAD_ID.
    logprobs: [B, N] float32, the model's log-probability of each drawn token (before forbidden
      tokens are removed and before temperature and filters reshape the distribution).
    stopped_at: [B] the step at which the row drew a stop token, or -1.
    done: [B] bool, the row drew a stop token.
    key: the PRNG key the next draw splits.
    """

    cache: dict
    token: jax.Array
    position: jax.Array
    step: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    stopped_at: jax.Array
    done: jax.Array
    key: jax.Array

    @classmethod
    def create(
        cls, cache: dict, token: jax.Array, position: jax.Array, key: jax.Array, max_new: int
    ) -> DecodeState:
        """A state with nothing drawn yet: `token` [B] goes in next, at `position` [B]."""
        B = token.shape[0]
        return cls(
            cache=cache,
            token=token,
            position=position,
            step=jnp.zeros((), jnp.int32),
            tokens=jnp.full((B, max_new), PAD_ID, jnp.int32),
            logprobs=jnp.zeros((B, max_new), jnp.float32),
            stopped_at=jnp.full((B,), -1, jnp.int32),
            done=jnp.zeros((B,), bool),
            key=key,
        )

    if TYPE_CHECKING:  # struct.dataclass adds it at runtime, where mypy cannot see it

        def replace(self, **updates) -> DecodeState: ...

    @property
    def capacity(self) -> int:
        """Tokens the cache holds before it is full (from shapes: no device work)."""
        return kv_cache.cache_length(self.cache)


def log_softmax_at(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """[B, V] logits, [B] tokens -> [B] log-softmax(logits) at the tokens."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    return jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - lse


def allowed_logits(settings: DecodeSettings, logits: jax.Array) -> jax.Array:
    """[B, V] float32 logits with the forbidden tokens at -inf."""
    if settings.forbidden_ids:
        return logits.at[:, jnp.asarray(settings.forbidden_ids)].set(-jnp.inf)
    return logits


def choose(settings: DecodeSettings, logits: jax.Array, key: jax.Array, state=None):
    """[B, V] logits -> (tokens [B], their model log-probabilities [B]).

    The log-probabilities are the model's own: taken before forbidden tokens are removed and
    before the DRY penalty, temperature and filters reshape the distribution. state: the
    DecodeState whose drawn tokens the DRY penalty reads (None: nothing drawn yet).
    """
    logits = logits.astype(jnp.float32)
    allowed = allowed_logits(settings, logits)
    if settings.params.dry is not None and state is not None:
        allowed = dry_penalty(allowed, state.tokens, state.step, settings.params.dry)
    tokens = sample(key, allowed, settings.params)
    return tokens, log_softmax_at(logits, tokens)


def record(settings: DecodeSettings, state: DecodeState, tokens, logprobs) -> DecodeState:
    """Records the tokens [B] just drawn (PAD_ID for done rows) and their log-probs [B]."""
    step = state.step
    tokens = jnp.where(state.done, PAD_ID, tokens)
    stopped = jnp.isin(tokens, jnp.asarray(settings.stop_ids or (-1,))) & ~state.done
    return state.replace(
        token=tokens,
        tokens=jax.lax.dynamic_update_slice_in_dim(state.tokens, tokens[:, None], step, 1),
        logprobs=jax.lax.dynamic_update_slice_in_dim(state.logprobs, logprobs[:, None], step, 1),
        stopped_at=jnp.where(stopped, step, state.stopped_at),
        done=state.done | stopped,
        step=step + 1,
    )


@functools.partial(tuned_jit, static_argnames=("settings", "length", "cache_dtype", "ring_slack"))
def prefill(
    params,
    tokens,
    positions,
    key,
    image_embeddings=None,
    *,
    settings: DecodeSettings,
    length: int,
    cache_dtype,
    ring_slack: int = 0,
) -> DecodeState:
    """Prompt batch [B, P] (left-padded: pads at position -1) -> the state after the first draw.

    The cache is made here, `length` tokens long, its rings `ring_slack` slots longer than the
    windows (gemma_kit.cache.init_cache). image_embeddings: None for text (the program is then
    the text-only one), else [B, I, M, D] for the SOFT_TOKEN slots of `tokens`.
    """
    model = nnx.merge(settings.graphdef, params)
    cache = kv_cache.init_cache(model.config, tokens.shape[0], length, cache_dtype, ring_slack)
    hidden, cache = model.extend(
        tokens, positions, cache, fresh=True, image_embeddings=image_embeddings
    )
    key, sub = jax.random.split(key)
    first, logprob = choose(settings, model.logits(hidden[:, -1:])[:, 0], sub)
    state = DecodeState.create(cache, first, jnp.max(positions, axis=1) + 1, key, settings.max_new)
    return record(settings, state, first, logprob)


def step(settings: DecodeSettings, model, state: DecodeState) -> DecodeState:
    """Feeds each row's last drawn token, draws the next one (uncompiled: the loop body)."""
    hidden, cache = model.extend(state.token[:, None], state.position[:, None], state.cache)
    key, sub = jax.random.split(state.key)
    tokens, logprobs = choose(settings, model.logits(hidden)[:, 0], sub, state)
    state = state.replace(cache=cache, key=key, position=state.position + 1)
    return record(settings, state, tokens, logprobs)


def can_continue(state: DecodeState, limit) -> jax.Array:
    """Whether another step may run: fewer than `limit` drawn, a row going, room in the cache."""
    room = state.cache["index"] < state.capacity
    return (state.step < limit) & ~jnp.all(state.done) & room


@functools.partial(tuned_jit, static_argnames=("settings",), donate_argnames=("state",))
def decode_loop(params, state: DecodeState, limit, *, settings: DecodeSettings) -> DecodeState:
    """Decodes until every row stopped, `limit` tokens were drawn, or the cache is full."""

    def body(s):
        # Without the barrier XLA hoists every bf16 -> f32 weight cast out of the loop: each
        # call then converts all weights up front and every step reads the f32 copies (twice
        # the bytes). Tying the parameters to a value that changes per step keeps the casts
        # inside, fused into the matmuls.
        p, token = jax.lax.optimization_barrier((params, s.token))
        return step(settings, nnx.merge(settings.graphdef, p), s.replace(token=token))

    return jax.lax.while_loop(lambda s: can_continue(s, limit), body, state)


@functools.partial(tuned_jit, static_argnames=("settings",), donate_argnames=("state",))
def decode_step(params, state: DecodeState, *, settings: DecodeSettings) -> DecodeState:
    """One step, called from Python (streaming, chat)."""
    return step(settings, nnx.merge(settings.graphdef, params), state)


@functools.partial(tuned_jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def extend_chunk(params, tokens, positions, cache, image_embeddings=None, *, graphdef):
    """Adds a chunk of tokens [B, T] at positions [B, T] to a filled cache (a chat turn).

    Returns (the last position's logits [B, V], the cache). With image_embeddings [B, I, M, D]
    the chunk holds those images' SOFT_TOKEN slots.
    """
    model = nnx.merge(graphdef, params)
    hidden, cache = model.extend(tokens, positions, cache, image_embeddings=image_embeddings)
    return model.logits(hidden[:, -1:])[:, 0], cache
