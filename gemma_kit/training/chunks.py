"""Computing over the positions of a batch a chunk at a time: the mechanism that keeps the
[tokens, V] logits of a Gemma model (V = 262144) from ever existing whole.

Two forms:
- `fused_weighted_sum` (and `fused_logits_sum`, its form over a model's logits), for a
  training loss that is a weighted sum over positions (the fine-tuning cross-entropy, a
  distillation divergence): value and gradient come from one pass over the chunks, so each
  chunk's logits are made once per model.
- `map_chunks`, for per-position values (log-probs, entropies, metrics): each chunk runs under
  jax.checkpoint, so a backward pass, if any, recomputes a chunk's logits instead of storing
  them.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gemma_kit.errors import ConfigError


def map_chunks(
    fn: Callable[..., tuple[jax.Array, ...]], inputs: Sequence[jax.Array], chunk: int
) -> tuple[jax.Array, ...]:
    """fn over chunks of the leading axis N of every input; fn returns a tuple of [n, ...].

    Inputs are padded with zeros to a whole number of chunks (padded rows are computed and
    dropped). Each call of fn runs under jax.checkpoint, so its intermediates (the chunk's
    logits) are recomputed in the backward pass rather than stored for every chunk.
    """
    if not (isinstance(chunk, numbers.Integral) and int(chunk) >= 1):
        raise ConfigError(f"chunk must be an integer >= 1, got {chunk!r}")
    n = inputs[0].shape[0]
    size = max(1, min(chunk, n))
    count = -(-n // size)
    pad = count * size - n
    if pad:
        inputs = [jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]) for x in inputs]
    body = jax.checkpoint(lambda args: tuple(fn(*args)))
    if count == 1:  # one chunk: no loop (a smaller program)
        return tuple(y[:n] for y in body(tuple(inputs)))
    outs = jax.lax.map(body, tuple(x.reshape(count, size, *x.shape[1:]) for x in inputs))
    return tuple(y.reshape(count * size, *y.shape[2:])[:n] for y in outs)


def fused_weighted_sum(
    per_chunk: Callable[..., jax.Array],
    params,
    hidden: jax.Array,
    weights: jax.Array,
    data=(),
    const=None,
    *,
    chunk: int,
) -> jax.Array:
    """sum_n weights[n] * per_chunk(params, hidden[n], data[n], const)[n], a scalar, with its
    gradient made in the same pass over chunks as its value.

    per_chunk(params, h [n, D], data chunk, const) -> [n] float32 computes a chunk's logits
    from `params` and `h` and a per-position value from them (a divergence, a token loss).
    hidden [N, D] and weights [N] and every leaf of `data` (a pytree of [N, ...] arrays) share
    the leading axis N; `const` is a pytree no gradient reaches (a teacher's variables).

    Why: map_chunks plus autodiff runs every chunk twice, once forward and once recomputed in
    the backward pass (that is what keeps [N, V] logits from being stored), and so computes
    each [n, V] logits matmul two times, a teacher's too. Here the forward pass takes the
    vector-Jacobian product of each chunk right away (the output cotangent of a weighted sum
    is one scalar, known up to that scalar), keeps only d/dhidden [N, D], d/dweights [N] and
    the summed d/dparams, and the backward pass scales them: one logits matmul per model per
    chunk, plus the matmuls of the gradient itself. Parameters that are not differentiated
    (a frozen embedding under LoRA) get no gradient work at all (symbolic zeros).

    Without differentiation this is a plain loop over the chunks.
    """
    if not (isinstance(chunk, numbers.Integral) and int(chunk) >= 1):
        raise ConfigError(f"chunk must be an integer >= 1, got {chunk!r}")
    n = hidden.shape[0]
    size = max(1, min(int(chunk), n))
    count = -(-n // size)
    pad = count * size - n

    def chunked(x):
        # [N, ...] -> [count, size, ...]; padded positions carry weight 0.
        if pad:
            x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)])
        return x.reshape(count, size, *x.shape[1:])

    leaves, treedef = jax.tree.flatten(params)
    dtypes = [leaf.dtype for leaf in leaves]
    # No gradient reaches `data` or `const` (stop_gradient, so never perturbed below).
    const = jax.lax.stop_gradient(const)
    xs = (
        chunked(hidden),
        chunked(weights.astype(jnp.float32)),
        jax.tree.map(chunked, jax.lax.stop_gradient(data)),
    )

    def chunk_values(p, x, const):
        h, w, d = x
        per = per_chunk(p, h, d, const).astype(jnp.float32)
        return per, jnp.sum(per * w)

    @jax.custom_vjp
    def total(leaves, xs, const):
        p = jax.tree.unflatten(treedef, leaves)

        def body(acc, x):
            return acc + chunk_values(p, x, const)[1], None

        return jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)[0]

    def fwd(leaves, xs, const):
        values = [leaf.value for leaf in leaves]
        wanted = [i for i, leaf in enumerate(leaves) if leaf.perturbed]
        xs = jax.tree.map(lambda x: x.value, xs)
        const = jax.tree.map(lambda x: x.value, const)

        def body(acc, x):
            loss, grads = acc
            h, w, d = x

            def f(chosen, h):
                full = list(values)
                for i, v in zip(wanted, chosen):
                    full[i] = v
                return chunk_values(jax.tree.unflatten(treedef, full), (h, w, d), const)[0]

            per, vjp = jax.vjp(f, [values[i] for i in wanted], h)
            dchosen, dh = vjp(w)
            grads = [g + dg.astype(jnp.float32) for g, dg in zip(grads, dchosen)]
            return (loss + jnp.sum(per * w), grads), (dh, per)

        zeros = [jnp.zeros(values[i].shape, jnp.float32) for i in wanted]
        (loss, grads), (dh, per) = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), xs)
        full: list = [None] * len(values)
        for i, g in zip(wanted, grads):
            full[i] = g
        return loss, (full, dh, per)

    def bwd(res, ct):
        grads, dh, per = res
        dleaves = [None if g is None else (ct * g).astype(t) for g, t in zip(grads, dtypes)]
        return dleaves, ((ct * dh).astype(hidden.dtype), ct * per, None), None

    total.defvjp(fwd, bwd, symbolic_zeros=True)
    return total(leaves, xs, const)


def output_head(model):
    """A model split for fused_weighted_sum: (head, rest, logits), where head holds the
    variables its logits depend on (the embedder's), rest all others, and
    logits(head, rest, hidden [n, D]) -> [n, V] float32 is the model's own `logits` (final
    soft-cap included) on the model rebuilt from the two."""
    graphdef, head, rest = nnx.split(model, nnx.PathContains("embedder"), ...)

    def logits(head, rest, hidden):
        return nnx.merge(graphdef, head, rest).logits(hidden[None])[0].astype(jnp.float32)

    return head, rest, logits


def fused_logits_sum(
    model,
    hidden: jax.Array,
    weights: jax.Array,
    per_position: Callable[..., jax.Array],
    data=(),
    const=None,
    *,
    chunk: int,
) -> jax.Array:
    """fused_weighted_sum of a loss over `model`'s logits: sum_n weights[n] *
    per_position(logits [n, V] float32, data chunk, const)[n] for hidden [N, D] and weights
    [N], the gradient reaching the model's output projection and `hidden`."""
    head, rest, logits_of = output_head(model)

    def per_chunk(head, h, d, c):
        rest, const = c
        return per_position(logits_of(head, rest, h), d, const)

    return fused_weighted_sum(per_chunk, head, hidden, weights, data, (rest, const), chunk=chunk)
