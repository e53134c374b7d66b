"""The pure sampling functions against references computed independently in numpy by sorting.

The library finds top-k / top-p thresholds by bisection on float bit patterns and draws by
inverting a blocked CDF; the references here sort the row and walk the sorted distribution in
float64, so they share no code (and no algorithm) with what they check.

Logits are drawn on a grid of multiples of 1/1024 within +-30, with injected ties (frequent in real
low-precision logits): two distinct grid values stay distinct and ordered after division by any
tested temperature, so a top-k set can be compared exactly. Top-p and min-p cuts depend on sums and
exponentials computed in float32 by the library: a token whose cumulative mass (or probability
ratio) lies within a relative 2e-4 of the cut may fall either way, so those sets are checked as
   reference(p - tolerance)  <=  kept  <=  reference(p + tolerance),
which pins the set exactly whenever no token sits at the cut (most examples), plus exact
hand-built examples with ties at the cut.

Each distinct SamplingParams is a static argument (a fresh compile, ~0.5 s), so the property
tests use few shapes and modest example counts.

The DRY penalty is checked against a direct transcription of its definition (for each earlier
position, walk back while the tokens agree with the end of the history), in float64.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma_kit.errors import GemmaKitError
from gemma_kit.sampling import (
    DryPenalty,
    SamplingError,
    SamplingParams,
    argmax,
    dry_penalty,
    filter_logits,
    sample,
    sample_categorical,
)

# (B, V): a vocabulary smaller than one 512-block, one that ends in a partial block, and one
# that is exactly two blocks.
SHAPES = [(1, 7), (3, 700), (2, 1024)]
TOL = 2e-4  # relative tolerance on the top-p mass and on the min-p ratio (see the docstring)
DRAWS = 32  # draws per row and example in the "never draws an excluded token" property

PROPERTY = settings(
    max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


# --------------------------------------------------------------------------------------------
# Inputs.


@st.composite
def logits_rows(draw, shapes=SHAPES):
    """[B, V] float32 logits on a 1/1024 grid, with injected ties and -inf entries."""
    B, V = draw(st.sampled_from(shapes))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    # Half-width in logits: nearly flat (natural ties: 512 grid values), moderate, and peaked.
    spread = draw(st.sampled_from([0.25, 4.0, 30.0]))
    x = rng.integers(-spread * 1024, spread * 1024, size=(B, V)).astype(np.float32) / 1024
    tie_fraction = draw(st.sampled_from([0.0, 0.1, 0.5]))
    copies = rng.random((B, V)) < tie_fraction
    x[copies] = x[np.arange(B)[:, None].repeat(V, 1)[copies], rng.integers(0, V, copies.sum())]
    inf_fraction = draw(st.sampled_from([0.0, 0.3, 0.9]))
    x[rng.random((B, V)) < inf_fraction] = -np.inf
    for row in range(B):  # a row needs one finite entry to be a distribution
        if not np.isfinite(x[row]).any():
            x[row, rng.integers(V)] = 0.0
    return x


def sampling_params(V: int):
    return st.builds(
        SamplingParams,
        temperature=st.floats(0.05, 5.0),
        # Small k cuts inside the finite tokens; large k often exceeds them (or V).
        top_k=st.none() | st.integers(1, 12) | st.integers(1, V + 3),
        top_p=st.none() | st.just(1.0) | st.floats(0.01, 1.0),
        min_p=st.none() | st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0),
    )


# --------------------------------------------------------------------------------------------
# The numpy reference.


def _nucleus(x: np.ndarray, allowed: np.ndarray, p: float) -> np.ndarray:
    """One row: the smallest prefix of the allowed tokens sorted by logit whose probability
    mass reaches p, extended to every token tied with the last one."""
    if p >= 1.0:
        return allowed.copy()
    values = np.where(allowed, x, -np.inf)
    order = np.argsort(-values, kind="stable")
    probs = np.where(allowed, np.exp(values - values.max()), 0.0)
    mass = np.cumsum(probs[order]) / probs.sum()
    last = min(int(np.searchsorted(mass, p)), len(order) - 1)  # first prefix with mass >= p
    return allowed & (x >= values[order[last]])


def reference_bounds(logits: np.ndarray, params: SamplingParams):
    """(must_keep, may_keep) [B, V] masks: sorted-order reference at the tight and loose end of
    the tolerance. top-k is exact (grid logits keep their order under any temperature)."""
    x = logits.astype(np.float64) / params.temperature
    B, V = x.shape
    lower = np.zeros((B, V), bool)
    upper = np.zeros((B, V), bool)
    for row in range(B):
        r = x[row]
        allowed = np.isfinite(r)
        if params.top_k is not None and params.top_k < V:
            kth = np.sort(r)[::-1][params.top_k - 1]
            allowed &= r >= kth
        tight, loose = allowed.copy(), allowed.copy()
        if params.min_p is not None and params.min_p > 0:
            ratio = np.exp(r - r[allowed].max())  # prob / max prob
            tight &= ratio >= min(params.min_p * (1 + TOL), 1.0)
            loose &= ratio >= params.min_p * (1 - TOL)
        if params.top_p is not None and params.top_p < 1.0:
            tight = _nucleus(r, tight, params.top_p * (1 - TOL))
            loose = _nucleus(r, loose, params.top_p * (1 + TOL))
        lower[row], upper[row] = tight, loose
    return lower, upper


def _filter_and_draw(params: SamplingParams):
    """One compiled program per params: filter_logits, and `sample` on DRAWS copies of every row
    (each copy draws its own uniform). Both see the same [DRAWS * B, V] input, so XLA compiles
    the filtering once for the two; compiling dominates the cost of an example."""

    @jax.jit
    def run(logits, key):
        tiled = jnp.tile(logits, (DRAWS, 1))
        B = logits.shape[0]
        return filter_logits(tiled, params)[:B], sample(key, tiled, params).reshape(DRAWS, B)

    return run


# --------------------------------------------------------------------------------------------
# Properties.


@PROPERTY
@given(data=st.data())
def test_filter_keeps_exactly_the_reference_set_and_sample_stays_inside(data):
    logits = data.draw(logits_rows())
    B, V = logits.shape
    params = data.draw(sampling_params(V))
    key = jax.random.key(data.draw(st.integers(0, 2**31 - 1)))
    out, draws = map(np.asarray, _filter_and_draw(params)(jnp.asarray(logits), key))

    kept = np.isfinite(out)
    lower, upper = reference_bounds(logits, params)
    missing = lower & ~kept
    extra = kept & ~upper
    assert not missing.any(), f"dropped tokens the reference keeps: {np.argwhere(missing)}"
    assert not extra.any(), f"kept tokens the reference drops: {np.argwhere(extra)}"
    if params.top_p is None and params.min_p in (None, 0.0, 1.0):
        # top-k alone (or min-p 1: the row maximum and its ties) has no tolerance at all.
        np.testing.assert_array_equal(kept, lower)
    for row in range(B):
        # Ties are kept: every finite token at least as likely as a kept one is kept.
        floor = logits[row][kept[row]].min()
        np.testing.assert_array_equal(kept[row], np.isfinite(logits[row]) & (logits[row] >= floor))
    # The survivors are the temperature-scaled logits, otherwise untouched.
    np.testing.assert_allclose(out[kept], logits[kept] / params.temperature, rtol=1e-6)

    rows = np.broadcast_to(np.arange(B), draws.shape)
    assert ((draws >= 0) & (draws < V)).all()
    assert kept[rows, draws].all(), "sample drew a token the filters exclude"


@settings(max_examples=50, deadline=None, derandomize=True)
@given(logits=logits_rows(shapes=SHAPES + [(2, 513)]), seed=st.integers(0, 2**31 - 1))
def test_greedy_is_argmax_first_index_on_ties(logits, seed):
    expected = np.argmax(logits, axis=-1)  # numpy returns the first maximal index
    assert np.asarray(argmax(jnp.asarray(logits))).tolist() == expected.tolist()
    got = sample(jax.random.key(seed), jnp.asarray(logits), SamplingParams(temperature=0.0))
    assert np.asarray(got).tolist() == expected.tolist()
    # Filtering at temperature 0 keeps exactly the greedy token (no division by zero).
    kept = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits), SamplingParams(0.0))))
    assert kept.sum(axis=-1).tolist() == [1] * len(expected)
    assert kept[np.arange(len(expected)), expected].all()


def test_argmax_ties_across_blocks_and_all_minus_inf():
    x = np.full((3, 1100), -np.inf, np.float32)
    x[0, [700, 5, 1099]] = 2.0  # the tie spans three blocks: the first index wins
    x[1, [1099, 1024]] = [1.0, 1.0]
    # row 2: all -inf, as numpy: index 0
    assert np.asarray(argmax(jnp.asarray(x))).tolist() == [5, 1024, 0]


# --------------------------------------------------------------------------------------------
# Exact hand-built cases: ties at each cut.


def _kept(logits, **kw):
    out = filter_logits(jnp.asarray(logits, jnp.float32)[None], SamplingParams(1.0, **kw))
    return np.flatnonzero(np.isfinite(np.asarray(out)[0])).tolist()


def test_top_k_keeps_ties_at_the_kth_value():
    x = [3.0, 1.0, 3.0, 2.0, 3.0, 0.0]
    assert _kept(x, top_k=1) == [0, 2, 4]
    assert _kept(x, top_k=2) == [0, 2, 4]
    assert _kept(x, top_k=4) == [0, 2, 3, 4]
    assert _kept(x, top_k=6) == [0, 1, 2, 3, 4, 5]
    # Fewer finite logits than k: all finite ones stay, -inf stays out.
    assert _kept([1.0, -np.inf, 0.5, -np.inf], top_k=3) == [0, 2]


def test_top_p_is_the_smallest_prefix_reaching_p_with_ties_at_the_cut():
    probs = np.array([0.1, 0.4, 0.2, 0.05, 0.2, 0.05])
    x = np.log(probs)
    assert _kept(x, top_p=0.3) == [1]  # 0.4 alone reaches 0.3
    assert _kept(x, top_p=0.5) == [1, 2, 4]  # 0.4 + 0.2 reaches 0.5; the other 0.2 is tied
    assert _kept(x, top_p=0.85) == [0, 1, 2, 4]  # 0.9 after the 0.1
    assert _kept(x, top_p=0.92) == [0, 1, 2, 3, 4, 5]  # both 0.05 tied at the cut
    assert _kept(x, top_p=1.0) == [0, 1, 2, 3, 4, 5]


def test_min_p_keeps_tokens_at_least_min_p_times_the_top_probability():
    probs = np.array([0.5, 0.3, 0.1, 0.06, 0.04])
    x = np.log(probs)
    assert _kept(x, min_p=0.15) == [0, 1, 2]  # 0.1 / 0.5 = 0.2 >= 0.15; 0.06 / 0.5 = 0.12
    assert _kept(x, min_p=0.7) == [0]
    assert _kept(x, min_p=1.0) == [0]
    assert _kept(x, min_p=0.0) == [0, 1, 2, 3, 4]


def test_filters_compose_in_order_top_k_then_min_p_then_top_p():
    # After top-k=3 the row renormalises to [0.5, 0.3, 0.2], where top-p 0.75 needs two tokens
    # (0.8); over the unfiltered row it needs three (0.4 + 0.24 + 0.16).
    probs = np.array([0.40, 0.24, 0.16, 0.12, 0.08])
    x = np.log(probs)
    assert _kept(x, top_p=0.75) == [0, 1, 2]
    assert _kept(x, top_k=3, top_p=0.75) == [0, 1]


# --------------------------------------------------------------------------------------------
# Frequencies.


def _chi_square_bound(df: int, z: float = 4.75) -> float:
    """The chi-square quantile at one-sided normal z (4.75: p ~ 1e-6), Wilson-Hilferty."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def _chi_square(counts: np.ndarray, expected: np.ndarray) -> tuple[float, int]:
    # Categories expected fewer than 5 times are pooled, as the test requires.
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    return float(((obs - exp) ** 2 / exp).sum()), len(exp) - 1


def _frequency_logits() -> np.ndarray:
    """One 1600-token row over four 512-blocks: support on block edges (0, 511, 512, 1023,
    1536, 1599), the third block entirely -inf, and a spread of probabilities."""
    rng = np.random.default_rng(7)
    x = np.full(1600, -np.inf, np.float32)
    support = np.concatenate(
        [
            [0, 511, 512, 1023, 1536, 1599],
            rng.choice(np.arange(1, 511), 30, replace=False),
            rng.choice(np.arange(1537, 1599), 10, replace=False),
        ]
    )
    x[support] = rng.normal(0.0, 1.2, support.size)
    return x


def _empirical(draw_fn, logits, n_rows, rounds=2):
    counts = np.zeros(logits.shape[0], np.int64)
    batch = jnp.broadcast_to(jnp.asarray(logits), (n_rows, logits.shape[0]))
    for i in range(rounds):
        tokens = np.asarray(draw_fn(jax.random.key(1234 + i), batch))
        counts += np.bincount(tokens, minlength=logits.shape[0])
    return counts, n_rows * rounds


def test_sample_categorical_frequencies_match_softmax():
    logits = _frequency_logits()
    counts, n = _empirical(jax.jit(sample_categorical), logits, n_rows=50_000)
    probs = np.exp(logits.astype(np.float64) - logits.max())
    probs /= probs.sum()
    assert counts[probs == 0].sum() == 0, "drew a token of probability 0"
    stat, df = _chi_square(counts, probs * n)
    assert df >= 30
    assert stat < _chi_square_bound(df), (stat, df)
    # Every token with an expected count of 50+ was drawn at all (block edges included).
    assert (counts[probs * n >= 50] > 0).all()


def test_sample_with_filters_matches_the_renormalised_reference():
    logits = _frequency_logits()
    params = SamplingParams(temperature=0.7, top_k=30, top_p=0.9, min_p=0.02)
    counts, n = _empirical(jax.jit(lambda k, x: sample(k, x, params)), logits, n_rows=10_000)
    lower, upper = reference_bounds(logits[None], params)
    assert (lower == upper).all(), "pick parameters whose cuts are unambiguous"
    kept = lower[0]
    scaled = logits.astype(np.float64) / params.temperature
    probs = np.where(kept, np.exp(scaled - scaled[kept].max()), 0.0)
    probs /= probs.sum()
    assert counts[~kept].sum() == 0
    stat, df = _chi_square(counts, probs * n)
    assert df >= 5
    assert stat < _chi_square_bound(df), (stat, df)


# --------------------------------------------------------------------------------------------
# The DRY penalty.


def dry_reference(
    logits: np.ndarray, history: np.ndarray, length: int, dry: DryPenalty
) -> np.ndarray:
    """The definition, walked token by token: for each position j < length, L_j is how far
    the tokens before j agree with the end of the history (at most max_length); history[j]
    loses multiplier * base ** (L_j - allowed_length) when L_j >= allowed_length (the largest
    such penalty)."""
    out = logits.astype(np.float64).copy()
    for row in range(history.shape[0]):
        h = history[row, :length].tolist()
        worst: dict[int, float] = {}
        for j in range(length):
            L = 0
            while L < min(j, dry.max_length) and h[j - 1 - L] == h[length - 1 - L]:
                L += 1
            if L >= dry.allowed_length:
                penalty = dry.multiplier * dry.base ** (L - dry.allowed_length)
                worst[h[j]] = max(worst.get(h[j], 0.0), penalty)
        for token, penalty in worst.items():
            out[row, token] -= penalty
    return out


@st.composite
def dry_cases(draw):
    """Histories over few distinct tokens (repeats and loops are common), a length that may
    stop anywhere in the buffer (the rest is garbage the penalty must ignore), logits with
    -inf entries, and a DryPenalty."""
    B, N, V = draw(st.sampled_from([(1, 12, 5), (3, 40, 9), (2, 33, 700)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    distinct = draw(st.sampled_from([1, 2, 3, V]))
    history = rng.integers(0, distinct, (B, N))
    if draw(st.booleans()):  # a loop of a random period, the way a model gets stuck
        period = int(rng.integers(1, 6))
        history = np.tile(history[:, :period], (1, N // period + 1))[:, :N]
    length = draw(st.integers(0, N))
    history[:, length:] = rng.integers(0, V, (B, N - length))
    logits = rng.normal(0.0, 3.0, (B, V)).astype(np.float32)
    logits[rng.random((B, V)) < 0.2] = -np.inf
    dry = DryPenalty(
        multiplier=draw(st.sampled_from([0.8, 2.5])),
        base=draw(st.sampled_from([1.0, 1.75, 2.0])),
        allowed_length=draw(st.integers(1, 3)),
        max_length=draw(st.sampled_from([3, 8])),
    )
    return logits, history.astype(np.int32), length, dry


@PROPERTY
@given(case=dry_cases())
def test_dry_penalty_matches_its_definition(case):
    logits, history, length, dry = case
    got = np.asarray(dry_penalty(jnp.asarray(logits), jnp.asarray(history), length, dry))
    want = dry_reference(logits, history, length, dry)
    # float32 subtraction of a penalty of at most 2.5 * 2 ** 7 from logits of a few units.
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-4)
    assert (got <= logits).all(), "the penalty only ever lowers a logit"
    seen = np.zeros_like(logits, bool)
    for row in range(history.shape[0]):
        seen[row, history[row, :length]] = True
    np.testing.assert_array_equal(got[~seen], logits[~seen])  # unseen tokens are untouched


def test_dry_penalty_by_hand():
    d = DryPenalty()  # multiplier 0.8, base 1.75, allowed_length 2
    x = np.zeros((1, 6), np.float32)

    penalise = jax.jit(dry_penalty, static_argnames="dry")

    def lowered(history, length=None, dry=d):
        h = np.full((1, 8), 5, np.int32)  # one shape for all: the tail is never read
        h[0, : len(history)] = history
        n = jnp.int32(len(history) if length is None else length)
        out = penalise(jnp.asarray(x), jnp.asarray(h), n, dry=dry)
        return [round(-float(v), 5) + 0.0 for v in np.asarray(out)[0]]  # + 0.0: no -0.0

    # "1 2 3 1 2": the last two tokens occurred before, followed by 3: drawing 3 would repeat
    # three tokens (L = 2 = allowed_length): 0.8. Nothing else is penalised.
    assert lowered([1, 2, 3, 1, 2]) == [0, 0, 0, 0.8, 0, 0]
    # "1 2 3 1": L = 1 < allowed_length: repeating a pair costs nothing.
    assert lowered([1, 2, 3, 1]) == [0] * 6
    # One token over and over: after four, a fifth would repeat four (L = 3): 0.8 * 1.75.
    assert lowered([4, 4, 4, 4]) == [0, 0, 0, 0, 1.4, 0]
    # A longer loop costs more with every token: "1 2 1 2 1 2" -> 1 (L = 4): 0.8 * 1.75 ** 2.
    assert lowered([1, 2, 1, 2, 1, 2]) == [0, 2.45, 0, 0, 0, 0]
    # Only the first `length` tokens are the history.
    assert lowered([1, 2, 3, 1, 2, 5, 5], length=5) == [0, 0, 0, 0.8, 0, 0]
    assert lowered([1, 2, 3, 1, 2], length=0) == [0] * 6
    # max_length caps L: a loop of 5 tokens of one kind with max_length 2 costs 0.8 * 1.75 ** 0.
    assert lowered([4] * 5, dry=DryPenalty(max_length=2)) == [0, 0, 0, 0, 0.8, 0]


def test_dry_greedy_breaks_a_loop():
    """Greedy decoding of a toy "model" that always prefers to repeat the token two back (a
    loop of period 2) leaves the loop within a few tokens under DRY, and never without it."""
    V, N = 4, 16
    penalise = jax.jit(dry_penalty, static_argnames="dry")

    def run(dry):
        tokens = [0, 1]
        for _ in range(12):
            logits = np.full((1, V), 0.0, np.float32)
            logits[0, tokens[-2]] = 3.0  # the loop's next token, 3 nats ahead of the rest
            logits[0, 3] = 1.0
            history = np.zeros((1, N), np.int32)  # one shape: one compiled program
            history[0, : len(tokens)] = tokens
            x = (
                logits
                if dry is None
                else penalise(
                    jnp.asarray(logits), jnp.asarray(history), jnp.int32(len(tokens)), dry=dry
                )
            )
            tokens.append(int(np.argmax(np.asarray(x)[0])))
        return tokens

    assert run(None) == [0, 1] * 7
    broken = run(DryPenalty())
    # L grows by one per token of the loop: 0.8, 1.4, 2.45 > 3 - 1: the fifth token of the loop
    # (L = 4) is the first one the penalty outweighs.
    assert broken[:6] == [0, 1, 0, 1, 0, 1] and broken[6] == 3


# --------------------------------------------------------------------------------------------
# Validation.


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.5), "temperature must be a finite number >= 0, got -0.5"),
        (dict(temperature=float("nan")), "temperature must be a finite number >= 0, got nan"),
        (dict(temperature=float("inf")), "temperature must be a finite number >= 0, got inf"),
        (dict(temperature="hot"), "temperature must be a finite number >= 0, got 'hot'"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\] or None, got 0.0"),
        (dict(top_p=-0.1), r"top_p must be in \(0, 1\] or None, got -0.1"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\] or None, got 1.5"),
        (dict(top_p=float("nan")), r"top_p must be in \(0, 1\] or None, got nan"),
        (dict(top_k=0), "top_k must be an integer >= 1 or None, got 0"),
        (dict(top_k=-3), "top_k must be an integer >= 1 or None, got -3"),
        (dict(top_k=2.5), "top_k must be an integer >= 1 or None, got 2.5"),
        (dict(min_p=-0.01), r"min_p must be in \[0, 1\] or None, got -0.01"),
        (dict(min_p=1.01), r"min_p must be in \[0, 1\] or None, got 1.01"),
        (dict(min_p=float("nan")), r"min_p must be in \[0, 1\] or None, got nan"),
        # bool is an int subclass, but True is never a meant temperature or k.
        (dict(temperature=True), "temperature must be a finite number >= 0, got True"),
        (dict(top_k=True), "top_k must be an integer >= 1 or None, got True"),
        (dict(top_p=True), r"top_p must be in \(0, 1\] or None, got True"),
        (dict(top_p="0.9"), r"top_p must be in \(0, 1\] or None, got '0.9'"),
        (dict(dry=0.8), "dry must be a DryPenalty or None, got 0.8"),
    ],
)
def test_sampling_params_validation(kwargs, message):
    with pytest.raises(SamplingError, match=f"^{message}$") as info:
        SamplingParams(**kwargs)
    # One family for callers to catch, and the builtin a Python user expects.
    assert isinstance(info.value, GemmaKitError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(multiplier=0), r"DRY multiplier must be a finite number > 0, got 0 \(dry=None"),
        (dict(multiplier=float("inf")), "DRY multiplier must be a finite number > 0, got inf"),
        (dict(base=0.9), "DRY base must be a finite number >= 1, got 0.9"),
        (dict(allowed_length=0), "DRY allowed_length must be an integer >= 1, got 0"),
        (dict(allowed_length=2.0), "DRY allowed_length must be an integer >= 1, got 2.0"),
        (dict(max_length=1), r"DRY max_length must be an integer >= allowed_length \(2\)"),
    ],
)
def test_dry_penalty_validation(kwargs, message):
    with pytest.raises(SamplingError, match=message):
        DryPenalty(**kwargs)


def test_sampling_params_accepts_the_edges_and_is_hashable():
    edges = SamplingParams(temperature=0, top_k=1, top_p=1.0, min_p=0.0)
    assert edges.greedy
    assert not SamplingParams(temperature=1e-3, min_p=1.0).greedy
    # Static argument of the compiled functions: equal settings must hash alike.
    assert hash(SamplingParams(0.5, 3, 0.9)) == hash(SamplingParams(0.5, 3, 0.9))
    assert hash(SamplingParams(dry=DryPenalty())) == hash(SamplingParams(dry=DryPenalty(0.8)))
