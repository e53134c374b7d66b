"""Pure functions from logits to tokens: greedy, temperature, top-k, top-p, min-p, and the
DRY penalty against repetition (`dry_penalty`, which also reads the tokens drawn so far).

Everything works on [B, V] float32 logits and is written for XLA on a small CPU as much as for
accelerators: a full sort of a 262k vocabulary costs ~100 ms on CPU and a reduction over one
262k-long row is ~20x slower than the same reduction split in two stages, so

  * reductions run over a [B, blocks, block] view (`_blocked`),
  * the top-k and top-p thresholds are found by bisection on the bit patterns of the logits
    (32 steps of a masked count or sum, exact to the last float), never by sorting,
  * a token is drawn by inverting the CDF with one uniform per row (block, then offset),
    instead of drawing V Gumbel variables.

Filters keep ties: every token whose logit equals the threshold stays allowed.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from gemma_kit.errors import GemmaKitError

_BLOCK = 512
NEG_INF = -jnp.inf


class SamplingError(GemmaKitError, ValueError):
    """An invalid sampling parameter."""


def _number(x) -> bool:  # bool is an int subclass; True as a temperature is a mistake
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _integer(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class DryPenalty:
    """The DRY ("don't repeat yourself") penalty: a guard against degenerate repetition.

    When the last L tokens drawn also occur earlier, followed there by token t, drawing t now
    would repeat L + 1 tokens. For L >= allowed_length, t's logit is lowered by

        multiplier * base ** (L - allowed_length)     (the longest such L counts)

    before temperature and filters. Reusing a word or a short phrase costs nothing; a loop
    costs more with every token it goes on (x1.75 per token by default), so it is broken
    within a few tokens, where a flat penalty on every token seen before (the classic
    repetition penalty) would also tax ordinary words. The method is p-e-w's (text-generation-
    webui #5677, 2024); the defaults are its own and llama.cpp's (base 1.75, allowed length 2,
    and the multiplier 0.8 its documentation recommends).

    max_length caps L (a bound on the work per step; the penalty at the cap, 0.8 * 1.75 ** 30,
    already rules a token out). The history is the tokens drawn so far in this completion or
    reply, not the prompt: quoting the prompt is not penalised.
    """

    multiplier: float = 0.8
    base: float = 1.75
    allowed_length: int = 2
    max_length: int = 32

    def __post_init__(self):
        if not (_number(self.multiplier) and self.multiplier > 0):
            raise SamplingError(
                f"DRY multiplier must be a finite number > 0, got "
                f"{self.multiplier!r} (dry=None switches the penalty off)"
            )
        if not (_number(self.base) and self.base >= 1.0):
            raise SamplingError(f"DRY base must be a finite number >= 1, got {self.base!r}")
        if not (_integer(self.allowed_length) and self.allowed_length >= 1):
            raise SamplingError(
                f"DRY allowed_length must be an integer >= 1, got {self.allowed_length!r}"
            )
        if not (_integer(self.max_length) and self.max_length >= self.allowed_length):
            raise SamplingError(
                f"DRY max_length must be an integer >= allowed_length "
                f"({self.allowed_length}), got {self.max_length!r}"
            )


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Static sampling settings (hashable: part of the compiled program's key).

    temperature 0 means greedy; top_k / top_p / min_p of None mean "no such filter"; dry: a
    DryPenalty on the tokens drawn so far, or None (off).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    dry: DryPenalty | None = None

    def __post_init__(self):
        t = self.temperature
        if not (_number(t) and t >= 0):
            raise SamplingError(f"temperature must be a finite number >= 0, got {t!r}")
        k = self.top_k
        if k is not None and not (_integer(k) and k >= 1):
            raise SamplingError(f"top_k must be an integer >= 1 or None, got {k!r}")
        if self.top_p is not None and not (_number(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise SamplingError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")
        if self.min_p is not None and not (_number(self.min_p) and 0.0 <= self.min_p <= 1.0):
            raise SamplingError(f"min_p must be in [0, 1] or None, got {self.min_p!r}")
        if self.dry is not None and not isinstance(self.dry, DryPenalty):
            raise SamplingError(f"dry must be a DryPenalty or None, got {self.dry!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _blocked(x: jax.Array, fill) -> jax.Array:
    """[B, V] -> [B, V / block, block], padding V up with `fill`."""
    B, V = x.shape
    pad = -V % _BLOCK
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad)), constant_values=fill)
    return x.reshape(B, -1, _BLOCK)


def argmax(logits: jax.Array) -> jax.Array:
    """[B, V] -> [B] index of the largest logit (the first, on ties)."""
    blocks = _blocked(logits, NEG_INF)
    best_block = jnp.argmax(jnp.max(blocks, axis=-1), axis=-1)
    inner = jnp.take_along_axis(blocks, best_block[:, None, None], axis=1)[:, 0]
    return (best_block * _BLOCK + jnp.argmax(inner, axis=-1)).astype(jnp.int32)


def _max(x: jax.Array) -> jax.Array:
    return jnp.max(jnp.max(_blocked(x, NEG_INF), axis=-1), axis=-1)


def _sum(x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.sum(_blocked(x, 0.0), axis=-1), axis=-1)


def _ordered_keys(x: jax.Array) -> jax.Array:
    """float32 -> uint32 keys in the same order, so bisection can run on integers."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(1 << 31))


def _bisect_threshold(keys: jax.Array, weights: jax.Array, target: jax.Array) -> jax.Array:
    """The largest key t with sum(weights[keys >= t]) >= target, per row.

    keys, weights: [B, nb, block] (pads: key 0, weight 0); target: [B], at most the row total.
    32 halvings of the uint32 range find the exact key.
    """

    def step(_, bounds):
        lo, hi = bounds  # invariant: mass(keys >= lo) >= target > mass(keys >= hi + 1)
        mid = lo + (hi - lo) // 2 + 1  # in (lo, hi]; (hi - lo + 1) would overflow uint32
        mass = jnp.sum(jnp.sum(jnp.where(keys >= mid[:, None, None], weights, 0), -1), -1)
        ok = mass >= target
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    B = keys.shape[0]
    lo = jnp.zeros((B,), jnp.uint32)
    hi = jnp.full((B,), 2**32 - 1, jnp.uint32)
    lo, _ = jax.lax.fori_loop(0, 32, step, (lo, hi))
    return lo


def kth_largest_key(x: jax.Array, k: int) -> jax.Array:
    """[B, V] -> [B] the ordered key of the k-th largest value of each row (repeats counted)."""
    keys = _blocked_keys(x)
    ones = (keys > 0).astype(jnp.float32)  # padding has key 0
    return _bisect_threshold(keys, ones, jnp.full((x.shape[0],), float(k)))


def top_p_key(x: jax.Array, p: float) -> jax.Array:
    """[B, V] logits -> [B] the ordered key t such that the tokens with keys >= t are the
    smallest nucleus holding >= p of the probability mass (ties kept)."""
    weights = _blocked(jnp.exp(x - _max(x)[:, None]), 0.0)
    target = p * jnp.sum(jnp.sum(weights, -1), -1)
    return _bisect_threshold(_blocked_keys(x), weights, target)


def _blocked_keys(x: jax.Array) -> jax.Array:
    # -inf maps to a key > 0; padding must rank below everything, so it gets key 0.
    return _blocked(_ordered_keys(x), jnp.uint32(0))


def filter_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Temperature-scaled logits with every token outside top-k / top-p / min-p set to -inf.

    Greedy settings (temperature 0) leave only the argmax allowed (the first, on ties): the
    distribution sampling at temperature -> 0 tends to, without dividing by zero.
    """
    x = logits.astype(jnp.float32)
    if params.greedy:
        return jnp.where(jnp.arange(x.shape[-1]) == argmax(x)[:, None], x, NEG_INF)
    x = x / params.temperature
    if params.top_k is not None and params.top_k < x.shape[-1]:
        x = jnp.where(_ordered_keys(x) >= kth_largest_key(x, params.top_k)[:, None], x, NEG_INF)
    if params.min_p is not None and params.min_p > 0:
        x = jnp.where(x >= _max(x)[:, None] + math.log(params.min_p), x, NEG_INF)
    if params.top_p is not None and params.top_p < 1.0:
        keep = _ordered_keys(x) >= top_p_key(x, params.top_p)[:, None]
        x = jnp.where(keep, x, NEG_INF)
    return x


def sample_categorical(key: jax.Array, x: jax.Array) -> jax.Array:
    """Draws one token per row from softmax(x) by inverting the CDF (block, then offset)."""
    B = x.shape[0]
    weights = _blocked(jnp.exp(x - _max(x)[:, None]), 0.0)  # [B, nb, block]
    block_mass = jnp.sum(weights, axis=-1)  # [B, nb]
    block_cdf = jnp.cumsum(block_mass, axis=-1)
    u = jax.random.uniform(key, (B,)) * block_cdf[:, -1]
    # First block whose cumulative mass exceeds u; never one of zero mass (u < its cdf).
    block = jnp.sum(block_cdf <= u[:, None], axis=-1)
    block = jnp.minimum(block, block_cdf.shape[-1] - 1)
    before = jnp.where(
        block > 0, jnp.take_along_axis(block_cdf, jnp.maximum(block - 1, 0)[:, None], 1)[:, 0], 0.0
    )
    inner = jnp.take_along_axis(weights, block[:, None, None], axis=1)[:, 0]  # [B, block]
    inner_cdf = jnp.cumsum(inner, axis=-1) + before[:, None]
    offset = jnp.sum(inner_cdf <= u[:, None], axis=-1)
    # Rounding can leave u at or past the last cumulative value: take the last allowed token.
    last_allowed = _BLOCK - 1 - jnp.argmax(inner[:, ::-1] > 0, axis=-1)
    offset = jnp.where(offset >= _BLOCK, last_allowed, jnp.minimum(offset, last_allowed))
    return (block * _BLOCK + offset).astype(jnp.int32)


def sample(key: jax.Array, logits: jax.Array, params: SamplingParams) -> jax.Array:
    """[B, V] logits -> [B] tokens under `params` (greedy when temperature is 0)."""
    if params.greedy:
        return argmax(logits)
    return sample_categorical(key, filter_logits(logits, params))


def dry_penalty(logits: jax.Array, history: jax.Array, length, dry: DryPenalty) -> jax.Array:
    """[B, V] logits lowered by the DRY penalty (see DryPenalty) of each row's history.

    history: [B, N] token ids, of which the first `length` ([] or [B] int) are the tokens drawn
    so far; the rest is ignored. For every earlier position j < length, L_j is the length of
    the longest run of tokens ending right before j that equals the run ending at the last
    token (at most min(j, max_length)); drawing history[j] now would repeat L_j + 1 tokens.
    The work is [B, N, max_length] comparisons and one scatter of N values per row.
    """
    B, N = history.shape
    K = dry.max_length
    n = jnp.broadcast_to(jnp.asarray(length, jnp.int32), (B,))
    # -1 before the history: no token equals it, so a run stops at the start.
    padded = jnp.pad(history.astype(jnp.int32), ((0, 0), (K, 0)), constant_values=-1)
    k = jnp.arange(K)
    tail = jnp.take_along_axis(padded, n[:, None] - 1 - k[None] + K, axis=1)  # [B, K]: h[n-1-k]
    before = padded[:, jnp.arange(N)[:, None] - 1 - k[None] + K]  # [B, N, K]: h[j-1-k]
    same = (before == tail[:, None, :]) & (before >= 0)
    run = jnp.sum(jnp.cumprod(same.astype(jnp.int32), axis=-1), axis=-1)  # [B, N]: L_j
    run = jnp.where(jnp.arange(N)[None] < n[:, None], run, 0)
    penalty = jnp.where(
        run >= dry.allowed_length,
        dry.multiplier * dry.base ** (run - dry.allowed_length).astype(jnp.float32),
        0.0,
    )
    # A token that follows several matches takes the largest penalty: a scatter-min of
    # logit - penalty (a penalty of 0 leaves the logit as it is).
    rows = jnp.arange(B)[:, None]
    token = jnp.clip(history, 0, logits.shape[-1] - 1)
    lowered = jnp.take_along_axis(logits, token, axis=1) - penalty
    return logits.at[rows, token].min(lowered)
