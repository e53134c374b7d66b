"""gemma_kit.training.chunks.fused_weighted_sum: the value and gradient of a weighted sum over
positions from one pass over chunks, against plain autodiff of the same sum.

Checked: a toy per-position function (a KL between two linear heads, float32) for several
chunk sizes, with gradients to the parameters, the hidden states and the weights, with only
some parameters differentiated (the others get no gradient work), and under an outer scale of
the cotangent; and the fine-tuning cross-entropy (training.losses.cross_entropy_sums) on tiny
Gemma 2 (soft-capped) and Gemma 3 models, full and LoRA, against full unchunked logits.

Tolerances: float32 values 1e-5 relative (chunks reorder the sums), gradients 1e-5 absolute
(and, for the models' gradients, whose entries reach ~20, 1e-5 relative).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma_kit.errors import ConfigError
from gemma_kit.lora import LoRAParam, apply_lora
from gemma_kit.training.chunks import fused_weighted_sum
from gemma_kit.training.losses import cross_entropy_sums

V, D, N = 50, 8, 37


def _toy():
    k = jax.random.split(jax.random.key(0), 6)
    params = {"E": jax.random.normal(k[0], (V, D)), "b": jax.random.normal(k[5], (V,))}
    teacher = jax.random.normal(k[1], (V, D))
    h = jax.random.normal(k[2], (N, D))
    ht = jax.random.normal(k[3], (N, D))
    w = jax.random.uniform(k[4], (N,))
    return params, teacher, h, ht, w


def _per(p, h, ht, teacher):
    s = jax.nn.log_softmax(h @ p["E"].T + p["b"])
    t = jax.nn.log_softmax(ht @ teacher.T)
    return jnp.sum(jnp.exp(t) * (t - s), -1)


@pytest.mark.parametrize("chunk", [1, 5, 37, 100])
def test_value_and_gradients_equal_autodiff(chunk):
    params, teacher, h, ht, w = _toy()

    def plain(p, h, w):
        return jnp.sum(_per(p, h, ht, teacher) * w)

    def fused(p, h, w):
        return fused_weighted_sum(_per, p, h, w, ht, teacher, chunk=chunk)

    np.testing.assert_allclose(fused(params, h, w), plain(params, h, w), rtol=1e-5)
    expected = jax.grad(plain, argnums=(0, 1, 2))(params, h, w)
    got = jax.jit(jax.grad(fused, argnums=(0, 1, 2)))(params, h, w)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # An outer factor scales the cotangent the backward pass receives.
    g3 = jax.grad(lambda h: 3.0 * fused(params, h, w))(h)
    np.testing.assert_allclose(g3, 3.0 * expected[1], atol=3e-5)


def test_undifferentiated_parameters_get_no_gradient_work():
    """Differentiating with respect to one parameter only: the same gradient, and the compiled
    program holds no [V, D] gradient accumulator for the other (the frozen embedding under
    LoRA is the case that matters: a [262144, D] float32 sum per step)."""
    params, teacher, h, ht, w = _toy()

    def fused_b(b, E):
        return fused_weighted_sum(_per, {"E": E, "b": b}, h, w, ht, teacher, chunk=5)

    def plain_b(b, E):
        return jnp.sum(_per({"E": E, "b": b}, h, ht, teacher) * w)

    np.testing.assert_allclose(
        jax.grad(fused_b)(params["b"], params["E"]),
        jax.grad(plain_b)(params["b"], params["E"]),
        atol=1e-5,
    )

    def carried(argnums) -> int:
        # [V, D] arrays in the loop's carry: E itself (a loop invariant), plus an accumulator
        # of its gradient if one is made.
        text = jax.jit(jax.grad(fused_b, argnums)).lower(params["b"], params["E"]).compile()
        hlo = text.as_text()
        assert hlo is not None
        loops = [line for line in hlo.splitlines() if " while(" in line]
        assert len(loops) == 1
        return loops[0].split(" while(")[0].count(f"f32[{V},{D}]")

    assert carried((0, 1)) == 2  # the check sees an accumulator when there is one
    assert carried(0) == 1


def test_bad_chunk_is_one_clear_error():
    params, teacher, h, ht, w = _toy()
    with pytest.raises(ConfigError, match="chunk must be an integer >= 1"):
        fused_weighted_sum(_per, params, h, w, ht, teacher, chunk=0)


def _ce_reference(model, hidden, targets, weights):
    logits = model.logits(hidden).astype(jnp.float32)
    lp = jax.nn.log_softmax(logits, -1)
    ce = -jnp.take_along_axis(lp, targets[..., None], -1)[..., 0]
    return jnp.sum(ce * weights)


def _check_cross_entropy(model, lora, rng):
    config = model.config
    if lora:
        apply_lora(model, rank=2, alpha=4.0)
        graphdef, trained, fixed = nnx.split(model, LoRAParam, ...)
        # Non-zero B factors, so that the LoRA gradient path is exercised.
        trained = jax.tree.map(lambda x: x + 0.05, trained)
    else:
        graphdef, trained, fixed = nnx.split(model, nnx.Param, ...)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 11)))
    targets = jnp.asarray(rng.integers(0, config.vocab_size, (2, 11)))
    weights = jnp.asarray(rng.uniform(size=(2, 11)), jnp.float32)

    def run(trained, chunk):
        m = nnx.merge(graphdef, trained, fixed)
        hidden = m.hidden_states(tokens)
        if chunk is None:
            return _ce_reference(m, hidden, targets, weights)
        return cross_entropy_sums(m, hidden, targets, weights, chunk)[0]

    expected, g_expected = jax.value_and_grad(run)(trained, None)
    for chunk in (3, 22, 64):
        value, grads = jax.jit(jax.value_and_grad(run), static_argnums=1)(trained, chunk)
        np.testing.assert_allclose(value, expected, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(g_expected)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_cross_entropy_equals_full_logits(lora, tiny_gemma2_config, tiny_gemma3_config, tiny_model):
    rng = np.random.default_rng(0)
    for config in (tiny_gemma2_config, tiny_gemma3_config):
        _check_cross_entropy(tiny_model(config, seed=0), lora, rng)
