"""Pure functions from logits to tokens: greedy, temperature, top-k, top-p, min-p.

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


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Static sampling settings (hashable: part of the compiled program's key).

    temperature 0 means greedy; top_k / top_p / min_p of None mean "no such filter".
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    def __post_init__(self):
        def number(x) -> bool:  # bool is an int subclass; True as a temperature is a mistake
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        t = self.temperature
        if not (number(t) and t >= 0):
            raise SamplingError(f"temperature must be a finite number >= 0, got {t!r}")
        k = self.top_k
        if k is not None and not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
            raise SamplingError(f"top_k must be an integer >= 1 or None, got {k!r}")
        if self.top_p is not None and not (number(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise SamplingError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")
        if self.min_p is not None and not (number(self.min_p) and 0.0 <= self.min_p <= 1.0):
            raise SamplingError(f"min_p must be in [0, 1] or None, got {self.min_p!r}")

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
    before = jnp.where(block > 0, jnp.take_along_axis(block_cdf, jnp.maximum(block - 1, 0)[:, None], 1)[:, 0], 0.0)
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
