"""Per-token log-probs, entropies and divergences from hidden states, a chunk of positions at a
time, so that the [B, T, V] logits never exist whole, in the forward or the backward pass.

The logits projection of a Gemma model is its largest tensor (V = 262144): [B, T, V] float32
logits of one 8 x 512 batch are 4 GiB, and a distillation step would hold two of them (student
and teacher) plus their gradients. Every function here takes final hidden states [B, T, D] (a
model's `hidden_states`) and the model itself, flattens the positions to [N, D], and maps over
chunks of `chunk` positions with jax.lax.map, each chunk under jax.checkpoint:

    chunk logits = model.logits(h)   [chunk, V]: the tied embedding, then Gemma 2's final
                                     soft-cap (inside `logits`, so inside the chunk), float32
    per-position values of the chunk (a log-prob, an entropy, a divergence) -> [chunk]

Only [N]-sized results leave a chunk; the backward pass recomputes each chunk's logits instead
of keeping them (tests/test_logprobs.py asserts that no buffer of the compiled forward and
backward program has B * T * V elements). A teacher's logits are computed in the same chunk
from the teacher's hidden states and pass through stop_gradient: no gradient reaches a teacher.

The per-position formulas are gemma_kit.posttrain.losses' (one definition each): results here
equal those functions applied to the full logits, for any chunk size (tested). Reduce the
[B, T] results with losses.reduction_sums (the training core's (loss_sum, normaliser)) or
losses.reduce_mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemma_kit.errors import ConfigError
from gemma_kit.posttrain import losses
from gemma_kit.training.chunks import fused_logits_sum, map_chunks, output_head

DEFAULT_CHUNK = 1024  # positions per chunk, as finetune's loss_chunk


def _rows(x: jax.Array, lead: int) -> jax.Array:
    # [B, T, ...] -> [B * T, ...]
    return x.reshape(-1, *x.shape[lead:])


def _chunk_logits(model, hidden: jax.Array) -> jax.Array:
    # [n, D] -> [n, V] float32: the model's own output projection (and soft-cap).
    return model.logits(hidden[None])[0].astype(jnp.float32)


def _check_positions(hidden: jax.Array, *others: jax.Array) -> tuple[int, int]:
    if hidden.ndim != 3:
        raise ConfigError(f"hidden states must be [B, T, D], got shape {tuple(hidden.shape)}")
    B, T = hidden.shape[:2]
    for x in others:
        if tuple(x.shape[:2]) != (B, T):
            raise ConfigError(
                f"positions [B, T] = {(B, T)} of the hidden states do not match "
                f"an input of shape {tuple(x.shape)}"
            )
    return B, T


def token_logprobs(
    model,
    hidden: jax.Array,
    targets: jax.Array,
    *,
    temperature: float = 1.0,
    chunk: int = DEFAULT_CHUNK,
    with_entropy: bool = False,
):
    """log p(targets) under `model` at every position: hidden [B, T, D], targets [B, T]
    (int; negative ids read as 0: mask them) -> [B, T] float32; with `with_entropy`, also the
    entropy of each position's distribution [B, T] (from the same chunk's logits)."""
    B, T = _check_positions(hidden, targets)

    def fn(h, t):
        logits = _chunk_logits(model, h)
        lp = losses.token_log_probs(logits, t, temperature=temperature)
        if with_entropy:
            return lp, losses.entropy(logits, temperature=temperature)
        return (lp,)

    outs = map_chunks(fn, (_rows(hidden, 2), targets.reshape(-1)), chunk)
    outs = tuple(o.reshape(B, T) for o in outs)
    return outs if with_entropy else outs[0]


def token_entropy(
    model, hidden: jax.Array, *, temperature: float = 1.0, chunk: int = DEFAULT_CHUNK
) -> jax.Array:
    """Entropy of `model`'s next-token distribution at every position: [B, T, D] -> [B, T]."""
    B, T = _check_positions(hidden)
    (ent,) = map_chunks(
        lambda h: (losses.entropy(_chunk_logits(model, h), temperature=temperature),),
        (_rows(hidden, 2),),
        chunk,
    )
    return ent.reshape(B, T)


def divergence(
    student,
    student_hidden: jax.Array,
    teacher,
    teacher_hidden: jax.Array,
    div: losses.Divergence,
    *,
    chunk: int = DEFAULT_CHUNK,
) -> jax.Array:
    """`div` between two models' full next-token distributions at every position:
    student_hidden [B, T, D_s] and teacher_hidden [B, T, D_t] of the same positions (aligned:
    a teacher that saw a hidden prefix passes its hidden states of the shared positions) ->
    [B, T] float32. Both models must share the vocabulary. Gradients reach the student only.

    Also the exact KL between a policy and its reference over the vocabulary at visited states
    (a metric): Divergence("reverse_kl") with the policy as student.
    """
    B, T = _check_positions(student_hidden, teacher_hidden)
    teacher_hidden = jax.lax.stop_gradient(teacher_hidden)

    def fn(hs, ht):
        s_logits = _chunk_logits(student, hs)
        t_logits = jax.lax.stop_gradient(_chunk_logits(teacher, ht))
        _check_vocab(s_logits, t_logits)
        return (div.per_position(s_logits, t_logits),)

    (per,) = map_chunks(fn, (_rows(student_hidden, 2), _rows(teacher_hidden, 2)), chunk)
    return per.reshape(B, T)


def _check_vocab(s_logits: jax.Array, t_logits: jax.Array) -> None:
    if s_logits.shape[-1] != t_logits.shape[-1]:
        raise ConfigError(
            f"student and teacher vocabularies differ ({s_logits.shape[-1]} "
            f"and {t_logits.shape[-1]} ids): distillation needs one vocabulary"
        )


def divergence_sum(
    student,
    student_hidden: jax.Array,
    teacher,
    teacher_hidden: jax.Array,
    div: losses.Divergence,
    weights: jax.Array,
    *,
    chunk: int = DEFAULT_CHUNK,
) -> jax.Array:
    """sum over positions of weights [B, T] x `divergence(...)`: the same value, and the same
    gradient (to the student only), from one pass over the chunks (training.chunks.
    fused_logits_sum): each chunk's student and teacher logits are made once, not again in
    the backward pass. What a distillation step uses; `divergence` gives per-position values.
    """
    _check_positions(student_hidden, teacher_hidden, weights)
    t_head, t_rest, t_logits_of = output_head(teacher)

    def per_position(s_logits, ht, t_variables):
        t_logits = t_logits_of(*t_variables, ht)
        _check_vocab(s_logits, t_logits)
        return div.per_position(s_logits, t_logits)

    return fused_logits_sum(
        student,
        _rows(student_hidden, 2),
        weights.reshape(-1),
        per_position,
        _rows(teacher_hidden, 2),
        (t_head, t_rest),
        chunk=chunk,
    )


def sampled_topk_kd(
    model,
    hidden: jax.Array,
    ids: jax.Array,
    probs: jax.Array,
    *,
    temperature: float = 1.0,
    chunk: int = DEFAULT_CHUNK,
) -> jax.Array:
    """Cross-entropy of `model` against sampled top-K teacher targets at every position:
    hidden [B, T, D], ids and probs [B, T, K] (from `sample_teacher_topk`, or stored offline)
    -> [B, T]; the student's log-probs use its full vocabulary (losses.sampled_topk_kd_...)."""
    B, T = _check_positions(hidden, ids, probs)

    def fn(h, i, p):
        return (
            losses.sampled_topk_kd_per_position(
                _chunk_logits(model, h), i, p, temperature=temperature
            ),
        )

    (per,) = map_chunks(fn, (_rows(hidden, 2), _rows(ids, 2), _rows(probs, 2)), chunk)
    return per.reshape(B, T)


def sampled_topk_kd_sum(
    model,
    hidden: jax.Array,
    ids: jax.Array,
    probs: jax.Array,
    weights: jax.Array,
    *,
    temperature: float = 1.0,
    chunk: int = DEFAULT_CHUNK,
) -> jax.Array:
    """sum over positions of weights [B, T] x `sampled_topk_kd(...)`: the same value and
    gradient from one pass over the chunks (training.chunks.fused_logits_sum), as
    divergence_sum is to divergence."""
    _check_positions(hidden, ids, probs, weights)

    def per_position(logits, targets, _):
        return losses.sampled_topk_kd_per_position(logits, *targets, temperature=temperature)

    return fused_logits_sum(
        model,
        _rows(hidden, 2),
        weights.reshape(-1),
        per_position,
        (_rows(ids, 2), _rows(probs, 2)),
        chunk=chunk,
    )


def sample_teacher_topk(
    teacher,
    hidden: jax.Array,
    key: jax.Array,
    k: int,
    *,
    temperature: float = 1.0,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[jax.Array, jax.Array]:
    """Gemma 3's sampled top-K targets from a teacher's hidden states [B, T, D]: ids [B, T, K]
    int32 and probs [B, T, K] float32 (losses.draw_topk_targets). Position i of the flattened
    [B * T] uses fold_in(key, i), so the draw does not depend on `chunk`: an offline mode can
    write (ids, probs) once and train from them."""
    B, T = _check_positions(hidden)
    hidden = jax.lax.stop_gradient(hidden)
    keys = losses.position_keys(key, B * T)
    # Typed keys travel as their raw data (map_chunks pads with zeros), rewrapped in the chunk.
    typed = jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
    impl = jax.random.key_impl(keys) if typed else None
    data = jax.random.key_data(keys) if typed else keys

    def fn(h, kk):
        kk = jax.random.wrap_key_data(kk, impl=impl) if typed else kk
        return losses.draw_topk_targets(kk, _chunk_logits(teacher, h), k, temperature=temperature)

    ids, probs = map_chunks(fn, (_rows(hidden, 2), data), chunk)
    return ids.reshape(B, T, k), probs.reshape(B, T, k)


def f_divergence_sft(
    model,
    hidden: jax.Array,
    targets: jax.Array,
    alpha: float,
    *,
    temperature: float = 1.0,
    chunk: int = DEFAULT_CHUNK,
) -> jax.Array:
    """The alpha-divergence Fenchel-Young loss of `model` against one-hot targets at every
    position (supervised fine-tuning with 2501.18537's losses): [B, T, D], [B, T] -> [B, T].
    alpha = 1 is the usual cross-entropy."""
    B, T = _check_positions(hidden, targets)
    alpha = losses.check_alpha(alpha)

    def fn(h, t):
        return (
            losses.f_divergence_loss_per_position(
                _chunk_logits(model, h), t, alpha, temperature=temperature
            ),
        )

    (per,) = map_chunks(fn, (_rows(hidden, 2), targets.reshape(-1)), chunk)
    return per.reshape(B, T)
