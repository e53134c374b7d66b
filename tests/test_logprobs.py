"""gemma_kit.posttrain.logprobs: chunked equals unchunked (values and gradients), closed-form
gradients through the tied embedding and Gemma 2's soft-cap, no [B * T, V] buffer in the
compiled forward and backward program, TRL's chunked divergence kernel as an oracle, and the
policy-gradient step equal to the weighted cross-entropy step of gemma_kit.finetune.

Tolerances: 2e-6 absolute between chunked and unchunked float32 values, 1e-5 for gradients
(different matmul shapes reorder float32 sums); 1e-5 against TRL's float32 torch tiles.
"""

from __future__ import annotations

import functools
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma_kit.errors import ConfigError
from gemma_kit.posttrain import logprobs as P
from gemma_kit.posttrain import losses as L

CHUNKS = (1, 11, 64)  # N = 2 * 11 = 22 positions: one each, exact, one chunk beyond N
DIVERGENCES = (
    L.Divergence("forward_kl"),
    L.Divergence("reverse_kl"),
    L.Divergence("jsd", beta=0.3, temperature=2.0),
    L.Divergence("alpha", alpha=1.5),
)


def _inputs(config, tiny_model, B=2, T=11):
    student = tiny_model(config, seed=0)
    teacher = tiny_model(config, seed=1)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, config.vocab_size, (B, T)))
    return student, teacher, tokens, student.hidden_states(tokens), teacher.hidden_states(tokens)


def _configs(tiny_gemma2_config, tiny_gemma3_config):
    assert tiny_gemma2_config.final_logit_softcap  # the soft-cap path is exercised
    return (tiny_gemma2_config, tiny_gemma3_config)


def test_chunked_equals_unchunked(tiny_gemma2_config, tiny_gemma3_config, tiny_model):
    for config in _configs(tiny_gemma2_config, tiny_gemma3_config):
        student, teacher, tokens, hs, ht = _inputs(config, tiny_model)
        s_logits, t_logits = student.logits(hs), teacher.logits(ht)
        full_lp = L.token_log_probs(s_logits, tokens)
        full_ent = L.entropy(s_logits)
        full_div = [d.per_position(s_logits, t_logits) for d in DIVERGENCES]
        ids, probs = L.sample_topk_targets(jax.random.PRNGKey(3), t_logits, 8)
        full_topk = L.sampled_topk_kd_per_position(s_logits, ids, probs)
        full_f = L.f_divergence_loss_per_position(s_logits, tokens, 1.5)
        # Every function with chunks of 5 (the last one padded) ...
        lp, ent = P.token_logprobs(student, hs, tokens, chunk=5, with_entropy=True)
        np.testing.assert_allclose(lp, full_lp, atol=2e-6)
        np.testing.assert_allclose(ent, full_ent, atol=2e-6)
        np.testing.assert_allclose(P.token_entropy(student, hs, chunk=5), full_ent, atol=2e-6)
        for div, expected in zip(DIVERGENCES, full_div):
            np.testing.assert_allclose(
                P.divergence(student, hs, teacher, ht, div, chunk=5), expected, atol=2e-6
            )
        np.testing.assert_allclose(
            P.sampled_topk_kd(student, hs, ids, probs, chunk=5), full_topk, atol=2e-6
        )
        np.testing.assert_allclose(
            P.f_divergence_sft(student, hs, tokens, 1.5, chunk=5), full_f, atol=2e-6
        )
        # ... and other chunkings of a few (on the soft-capped model).
        for chunk in CHUNKS if config.final_logit_softcap else ():
            np.testing.assert_allclose(
                P.token_logprobs(student, hs, tokens, chunk=chunk), full_lp, atol=2e-6
            )
            np.testing.assert_allclose(
                P.divergence(student, hs, teacher, ht, DIVERGENCES[2], chunk=chunk),
                full_div[2],
                atol=2e-6,
            )
            # The draw of each position is the same whatever the chunking.
            c_ids, c_probs = P.sample_teacher_topk(
                teacher, ht, jax.random.PRNGKey(3), 8, chunk=chunk
            )
            np.testing.assert_array_equal(c_ids, ids)
            np.testing.assert_allclose(c_probs, probs, atol=2e-6)


def _split_loss(student, teacher, hs, ht, div, mask, chunk):
    """The masked token-mean divergence as a function of (student state, student hidden)."""
    graphdef, state = nnx.split(student)

    def loss(state, hidden):
        model = nnx.merge(graphdef, state)
        per = P.divergence(model, hidden, teacher, ht, div, chunk=chunk)
        return L.reduce_mean(per, mask)

    return loss, state


def test_gradients_chunked_and_closed_form(tiny_gemma2_config, tiny_gemma3_config, tiny_model):
    """Gradients with respect to the student's parameters and hidden states do not depend on
    the chunking, and equal the closed forms of the reference doc (section 1.1) carried through
    the soft-cap and the tied embedding: dL/dh = (G * (1 - tanh^2(z / cap))) E."""
    mask = jnp.asarray(np.array([[1] * 11, [1] * 6 + [0] * 5], np.float32))
    for config in _configs(tiny_gemma2_config, tiny_gemma3_config):
        student, teacher, _, hs, ht = _inputs(config, tiny_model)
        table = student.embedder.input_embedding[...]
        z = hs @ table.T  # logits before the soft-cap
        cap = config.final_logit_softcap
        dcap = 1.0 - jnp.tanh(z / cap) ** 2 if cap else 1.0
        ps = jax.nn.softmax(student.logits(hs))
        pt = jax.nn.softmax(teacher.logits(ht))
        weight = (mask / mask.sum())[..., None]
        closed = {
            "forward_kl": ps - pt,
            "reverse_kl": ps
            * (
                jnp.log(ps)
                - jnp.log(pt)
                - jnp.sum(ps * (jnp.log(ps) - jnp.log(pt)), -1, keepdims=True)
            ),
        }
        for div in (L.Divergence("forward_kl"), L.Divergence("reverse_kl")):
            reference = None
            for chunk in (4, 22):
                loss, state = _split_loss(student, teacher, hs, ht, div, mask, chunk)
                g_state, g_hidden = jax.grad(loss, argnums=(0, 1))(state, hs)
                if reference is None:
                    reference = (g_state, g_hidden)
                    np.testing.assert_allclose(
                        g_hidden, (weight * closed[div.kind] * dcap) @ table, atol=1e-6
                    )
                else:
                    for a, b in zip(jax.tree.leaves(g_state), jax.tree.leaves(reference[0])):
                        np.testing.assert_allclose(a, b, atol=1e-5)
                    np.testing.assert_allclose(g_hidden, reference[1], atol=1e-6)


def test_teacher_gets_no_gradient(tiny_gemma3_config, tiny_model):
    student, teacher, _, hs, ht = _inputs(tiny_gemma3_config, tiny_model)
    graphdef, t_state = nnx.split(teacher)

    def loss(t_state, t_hidden):
        model = nnx.merge(graphdef, t_state)
        return jnp.sum(P.divergence(student, hs, model, t_hidden, L.Divergence("jsd"), chunk=8))

    g_state, g_hidden = jax.grad(loss, argnums=(0, 1))(t_state, ht)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(g_state))
    assert float(jnp.max(jnp.abs(g_hidden))) == 0.0


_SHAPE = re.compile(r"\b(?:f64|f32|bf16|f16|s32|u32|s8|pred)\[([0-9,]*)\]")


def _largest_buffer(fn, *args) -> int:
    """The most elements of any array in the optimised HLO of jit(fn)(*args)."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    assert text is not None
    sizes = [
        int(np.prod([int(d) for d in dims.split(",") if d] or [1])) for dims in _SHAPE.findall(text)
    ]
    return max(sizes)


def test_no_full_logits_buffer_forward_and_backward(tiny_gemma2_config, tiny_model):
    """The compiled value-and-gradient of a chunked divergence (student parameters and hidden
    states) holds no array of B * T * V elements; the same check finds one when the chunk
    covers every position (so it can fail)."""
    B, T = 4, 32
    student, teacher, _, hs, ht = _inputs(tiny_gemma2_config, tiny_model, B=B, T=T)
    V = tiny_gemma2_config.vocab_size
    D = tiny_gemma2_config.embed_dim
    assert B * T * V >= 4 * V * D  # the full logits dwarf the embedding (and its gradient)
    mask = jnp.ones((B, T))
    sizes = {}
    for chunk in (16, B * T):
        loss, state = _split_loss(student, teacher, hs, ht, L.Divergence("jsd"), mask, chunk)
        sizes[chunk] = _largest_buffer(jax.value_and_grad(loss, argnums=(0, 1)), state, hs)
    assert sizes[16] < B * T * V // 2, sizes
    assert sizes[B * T] >= B * T * V, sizes  # the control: unchunked logits are visible
    graphdef, state = nnx.split(student)
    tokens = jnp.zeros((B, T), jnp.int32)

    def logp_loss(state, hidden):
        return jnp.sum(P.token_logprobs(nnx.merge(graphdef, state), hidden, tokens, chunk=16))

    assert _largest_buffer(jax.value_and_grad(logp_loss, argnums=(0, 1)), state, hs) < (
        B * T * V // 2
    )


def test_divergence_sum_equals_the_weighted_divergence(
    tiny_gemma2_config, tiny_gemma3_config, tiny_model
):
    """divergence_sum (one pass: value and gradient together) against the sum of `divergence`
    x weights differentiated by autodiff: the same value and gradients, for the student's full
    parameters and for LoRA factors alone (the frozen embedding then gets no gradient)."""
    weights = jnp.asarray(np.random.default_rng(5).uniform(size=(2, 11)), jnp.float32)
    for config in _configs(tiny_gemma2_config, tiny_gemma3_config):
        student, teacher, tokens, _, ht = _inputs(config, tiny_model)
        for lora in (False, True):
            _check_divergence_sum(student, teacher, tokens, ht, weights, lora)


def _check_divergence_sum(student, teacher, tokens, ht, weights, lora):
    from gemma_kit.lora import LoRAParam, apply_lora

    if lora:
        apply_lora(student, rank=2, alpha=4.0)
        graphdef, trained, fixed = nnx.split(student, LoRAParam, ...)
        trained = jax.tree.map(lambda x: x + 0.05, trained)
    else:
        graphdef, trained, fixed = nnx.split(student, nnx.Param, ...)

    def loss(trained, fused, div, chunk):
        model = nnx.merge(graphdef, trained, fixed)
        hs = model.hidden_states(tokens)
        if fused:
            return P.divergence_sum(model, hs, teacher, ht, div, weights, chunk=chunk)
        return jnp.sum(P.divergence(model, hs, teacher, ht, div, chunk=chunk) * weights)

    step = jax.jit(jax.value_and_grad(loss), static_argnums=(1, 2, 3))
    for div in DIVERGENCES:
        expected, g_expected = step(trained, False, div, 22)
        for chunk in (4, 22):
            value, grads = step(trained, True, div, chunk)
            np.testing.assert_allclose(value, expected, rtol=1e-5)
            for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(g_expected)):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_sampled_topk_kd_sum_equals_the_weighted_loss(tiny_gemma2_config, tiny_model):
    """sampled_topk_kd_sum against the weighted sum of sampled_topk_kd under autodiff: the same
    value and gradients (student parameters and hidden states), for two chunk sizes."""
    student, teacher, _, hs, ht = _inputs(tiny_gemma2_config, tiny_model)
    ids, probs = P.sample_teacher_topk(teacher, ht, jax.random.PRNGKey(3), 8)
    weights = jnp.asarray(np.random.default_rng(6).uniform(size=(2, 11)), jnp.float32)
    graphdef, state = nnx.split(student)

    def loss(state, hidden, fused, chunk):
        model = nnx.merge(graphdef, state)
        if fused:
            return P.sampled_topk_kd_sum(
                model, hidden, ids, probs, weights, temperature=2.0, chunk=chunk
            )
        per = P.sampled_topk_kd(model, hidden, ids, probs, temperature=2.0, chunk=chunk)
        return jnp.sum(per * weights)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=(2, 3))
    expected, g_expected = step(state, hs, False, 22)
    for chunk in (4, 22):
        value, grads = step(state, hs, True, chunk)
        np.testing.assert_allclose(value, expected, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(g_expected)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _logits_products(fn, *args, V: int) -> int:
    """How many dot products with a vocabulary-sized output ([n, V] logits) the optimised HLO
    of jit(fn)(*args) computes."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    assert text is not None
    return sum(
        1
        for line in text.splitlines()
        if " dot(" in line and re.search(rf"\[\d+,{V}\]", line.split(" dot(")[0]) is not None
    )


def test_divergence_sum_makes_each_models_logits_once(tiny_gemma2_config, tiny_model):
    """The value and gradient of divergence_sum make each chunk's student and teacher logits
    once (2 products of [n, V]); differentiating the per-position `divergence` makes them
    again in the backward pass (4: the control, so the count can fail)."""
    student, teacher, tokens, hs, ht = _inputs(tiny_gemma2_config, tiny_model)
    V = tiny_gemma2_config.vocab_size
    graphdef, state = nnx.split(student)
    weights = jnp.ones((2, 11))
    div = L.Divergence("forward_kl")

    def fused(state, hidden):
        model = nnx.merge(graphdef, state)
        return P.divergence_sum(model, hidden, teacher, ht, div, weights, chunk=8)

    def plain(state, hidden):
        model = nnx.merge(graphdef, state)
        return jnp.sum(P.divergence(model, hidden, teacher, ht, div, chunk=8) * weights)

    grad = functools.partial(jax.value_and_grad, argnums=(0, 1))
    assert _logits_products(grad(fused), state, hs, V=V) == 2
    assert _logits_products(grad(plain), state, hs, V=V) == 4


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_matches_trl_chunked_kernel_with_softcap(beta, tiny_gemma2_config, tiny_model):
    """TRL's ChunkedDivergenceFunction (hidden states and lm_head, Gemma's final soft-cap,
    torch tiles on CPU): per-token divergence and the gradient with respect to the student's
    hidden states, at temperature 1 and 2."""
    torch = pytest.importorskip("torch", reason="TRL's kernel is torch code")
    pytest.importorskip("trl", reason="TRL's chunked kernel is the oracle (the [test] extra)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
    student, teacher, _, hs, ht = _inputs(tiny_gemma2_config, tiny_model)
    cap = tiny_gemma2_config.final_logit_softcap
    D = hs.shape[-1]
    w_s = torch.tensor(np.asarray(student.embedder.input_embedding[...]))
    w_t = torch.tensor(np.asarray(teacher.embedder.input_embedding[...]))
    for temperature in (1.0, 2.0):
        h_s = torch.tensor(np.asarray(hs).reshape(-1, D), requires_grad=True)
        h_t = torch.tensor(np.asarray(ht).reshape(-1, D))
        per, _ = ChunkedDivergenceFunction.apply(
            h_s, w_s, None, h_t, w_t, None, beta, temperature, 1.0, cap, 1.0, cap
        )
        per.sum().backward()
        div = L.Divergence("jsd", beta=beta, temperature=temperature)
        ours, grad = jax.value_and_grad(
            lambda h, d=div: jnp.sum(P.divergence(student, h, teacher, ht, d, chunk=8))
        )(hs)
        np.testing.assert_allclose(
            P.divergence(student, hs, teacher, ht, div, chunk=8).reshape(-1),
            per.detach().numpy(),
            atol=1e-5,
            rtol=1e-5,
        )
        np.testing.assert_allclose(grad.reshape(-1, D), h_s.grad.numpy(), atol=1e-5, rtol=1e-4)
        assert abs(float(ours) - per.detach().sum().item()) < 1e-4


def test_policy_gradient_step_equals_weighted_cross_entropy(tiny_gemma3_config, tiny_model):
    """-sum A log pi through chunked log-probs has the gradient of finetune's weighted
    cross-entropy sum with signed weights A (the SFT step's own loss)."""
    pytest.importorskip("optax", reason="gemma_kit.finetune needs the [finetune] extra")
    from gemma_kit.training.losses import cross_entropy_sums

    student, _, tokens, hs, _ = _inputs(tiny_gemma3_config, tiny_model)
    mask = jnp.asarray(np.array([[1] * 11, [1] * 4 + [0] * 7], np.float32))
    adv = jnp.asarray([1.5, -0.7])
    graphdef, state = nnx.split(student)

    def pg(state):
        lp = P.token_logprobs(nnx.merge(graphdef, state), hs, tokens, chunk=8)
        return L.policy_gradient_loss(lp, adv, mask)[0]

    def weighted_ce(state):
        weights = adv[:, None] * mask
        return cross_entropy_sums(nnx.merge(graphdef, state), hs, tokens, weights, 8)[0]

    for a, b in zip(
        jax.tree.leaves(jax.grad(pg)(state)), jax.tree.leaves(jax.grad(weighted_ce)(state))
    ):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_bad_inputs(tiny_gemma3_config, tiny_model):
    student, teacher, tokens, hs, ht = _inputs(tiny_gemma3_config, tiny_model)
    with pytest.raises(ConfigError, match=r"\[B, T\]"):
        P.token_logprobs(student, hs, tokens[:, :5])
    with pytest.raises(ConfigError, match="chunk must be"):
        P.token_logprobs(student, hs, tokens, chunk=0)
    other = tiny_model(tiny_gemma3_config.replace(vocab_size=300), seed=4)
    with pytest.raises(ConfigError, match="vocabularies differ"):
        P.divergence(student, hs, other, other.hidden_states(tokens), L.Divergence())
    with pytest.raises(ConfigError, match="vocabularies differ"):
        P.divergence_sum(
            student, hs, other, other.hidden_states(tokens), L.Divergence(), jnp.ones((2, 11))
        )
    with pytest.raises(ConfigError, match="K must be"):
        P.sample_teacher_topk(teacher, ht, jax.random.PRNGKey(0), 0)
