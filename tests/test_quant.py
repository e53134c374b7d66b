"""int8 weights: the rounding bound, logits close to the float model, the sampler runs on them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma_kit import quant
from gemma_kit.errors import CheckpointError
from gemma_kit.layers import Einsum, to_matvec_layout


def test_quantize_int8_rounding_bound():
    """Per output channel: |w - q s| <= s / 2, s = max |w| / 127; q spans [-127, 127]."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(0, 1, (3, 16, 8)) * rng.uniform(0.01, 10, (3, 1, 8)), jnp.float32)
    w = w.at[1, :, 2].set(0.0)  # an all-zero channel must not divide by zero
    q, scale = quant.quantize_int8(w, (1,))  # contract D (axis 1) as in "BTD,NDH->BTNH"
    assert q.dtype == jnp.int8 and scale.shape == (3, 1, 8) and scale.dtype == jnp.float32
    err = np.abs(np.asarray(w) - np.asarray(q, np.float32) * np.asarray(scale))
    assert (err <= np.asarray(scale) / 2 * (1 + 1e-6)).all()
    assert np.abs(np.asarray(q)).max() == 127
    assert (np.asarray(q)[1, :, 2] == 0).all()


def test_int8_model_logits_close_to_float(tiny_gemma3_config, tiny_gemma2_config, tiny_model):
    """The int8 model's logit error, against the f32 model, is compared with the error of the
    same weights rounded to bf16 (a rounding every released checkpoint already carries).

    Bound: rms error <= 3x that of bf16 weights and max error <= 3% of the largest |logit|
    (observed: 2.1-2.3x and 1.7-2.2%). Each int8 weight moves by at most 1/254 of its channel's
    largest weight, about twice bf16's relative step (2^-9) for typical weights; these tiny
    random models (weights N(0, 0.3^2)) amplify any weight error more than trained ones do.
    """
    for config in (tiny_gemma3_config, tiny_gemma2_config):
        model = tiny_model(config, seed=11)
        tokens = jnp.asarray(np.random.default_rng(3).integers(0, config.vocab_size, (2, 10)))
        reference = np.asarray(model(tokens))
        bf16 = np.asarray(tiny_model(config, seed=11, param_dtype=jnp.bfloat16)(tokens))
        q = quant.quantize_model(model)
        assert quant.is_quantized(q) and not quant.is_quantized(model)
        einsums = [m for _, m in q.iter_modules() if isinstance(m, Einsum)]
        assert all(m.w[...].dtype == jnp.int8 for m in einsums)
        # int8 weights are not Params: an optimizer over nnx.Param never touches them.
        assert not any(x.dtype == jnp.int8 for x in jax.tree.leaves(nnx.state(q, nnx.Param)))
        logits = np.asarray(q(tokens))

        def rms(x):
            return float(np.sqrt(np.mean(np.square(x))))

        assert 0 < rms(logits - reference) <= 3 * rms(bf16 - reference)
        assert np.abs(logits - reference).max() <= 3e-2 * np.abs(reference).max()
        assert (logits.argmax(-1) == reference.argmax(-1)).mean() >= 0.9
        # Storing w in the matvec layout (as the sampler does on CPU) moves the scales along.
        np.testing.assert_allclose(np.asarray(to_matvec_layout(q)(tokens)), logits, atol=1e-4)
        assert quant.weight_bytes(q) < quant.weight_bytes(model)
        with pytest.raises(CheckpointError, match="int8"):
            import gemma_kit

            gemma_kit.save_checkpoint(q, "/nonexistent/never-written")


def test_int8_embedding_table(tiny_gemma3_config, tiny_model):
    """embedding=True: the tied table becomes int8 with one scale per row, used by both the
    lookup and the logits; each row within the rounding bound, sqrt(D) still rounded in the
    table's original dtype, and the matvec layout (the sampler's) giving the same logits."""
    model = tiny_model(tiny_gemma3_config, seed=13, param_dtype=jnp.bfloat16)
    q = quant.quantize_model(model, embedding=True)
    table, scale = q.embedder.input_embedding[...], q.embedder.input_embedding_scale[...]
    V, D = model.embedder.input_embedding.shape
    assert table.dtype == jnp.int8 and scale.shape == (V, 1)
    original = np.asarray(model.embedder.input_embedding[...], np.float32)
    err = np.abs(original - np.asarray(table, np.float32) * np.asarray(scale))
    # s / 2, plus float32 rounding of q * s (|q| <= 127: up to 127 s ulps of 2^-24 each).
    assert (err <= np.asarray(scale) * (0.5 + 127 * 2.0**-23)).all()
    assert q.embedder.normalizer_dtype == "bfloat16"
    assert model.embedder.input_embedding_scale is None  # the original is untouched
    tokens = jnp.asarray([[1, 5, 9, 200, 7]])
    rows = np.asarray(q.embedder.encode(tokens, jnp.float32))
    dequant = (
        np.asarray(table, np.float32)[np.asarray(tokens)] * np.asarray(scale)[np.asarray(tokens)]
    )
    norm = float(jnp.asarray(np.sqrt(D), jnp.bfloat16))
    np.testing.assert_allclose(rows, dequant * norm, rtol=1e-6)
    logits = np.asarray(q(tokens))
    np.testing.assert_allclose(np.asarray(to_matvec_layout(q)(tokens)), logits, atol=1e-4)
    assert quant.is_quantized(q)


def test_int8_embedding_alone(tiny_gemma3_config, tiny_model):
    """einsums=False quantizes the table only: every Einsum keeps its bf16 weight, the table
    is the one the fully quantized model gets, the matvec layout gives the same logits, and
    asking for nothing is an error."""
    from gemma_kit.layers import Einsum

    model = tiny_model(tiny_gemma3_config, seed=14, param_dtype=jnp.bfloat16)
    q = quant.quantize_model(model, embedding=True, einsums=False)
    assert q.embedder.input_embedding[...].dtype == jnp.int8
    einsums = [m for _, m in q.iter_modules() if isinstance(m, Einsum)]
    assert einsums and all(m.w_scale is None and m.w[...].dtype == jnp.bfloat16 for m in einsums)
    assert quant.is_quantized(q)
    full = quant.quantize_model(model, embedding=True)
    np.testing.assert_array_equal(
        q.embedder.input_embedding[...], full.embedder.input_embedding[...]
    )
    tokens = jnp.asarray([[1, 5, 9, 200, 7]])
    np.testing.assert_allclose(
        np.asarray(to_matvec_layout(q)(tokens)), np.asarray(q(tokens)), atol=1e-4
    )
    with pytest.raises(ValueError, match="nothing to quantize"):
        quant.quantize_model(model, embedding=False, einsums=False)


@pytest.mark.parametrize("embedding", [False, True])
def test_sampler_runs_on_int8_weights(tiny_gemma3_config, tiny_model, small_tokenizer, embedding):
    """The Sampler's greedy tokens on an int8 model are the argmax of one full forward pass of
    the same int8 model over prompt + generated tokens, at every generated position."""
    from gemma_kit.sampler import Sampler

    config = tiny_gemma3_config.replace(vocab_size=small_tokenizer.vocab_size)
    q = quant.quantize_model(tiny_model(config, seed=12), embedding=embedding)
    prompt = "for x in range(3):"
    result = Sampler(q, small_tokenizer, cache_dtype=jnp.float32).generate(
        prompt, max_new_tokens=6, stop_token_ids=()
    )
    ids = small_tokenizer.encode(prompt)
    assert len(result.tokens) == 6
    logits = np.asarray(q(jnp.asarray([ids + result.tokens])))[0]
    greedy = logits[len(ids) - 1 : -1].argmax(-1)
    assert greedy.tolist() == result.tokens
