"""gemma_kit.posttrain.policy: the reference and anchor as the policy's network under other
values of its trained variables, on a tiny random Gemma 3."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_kit.lora import apply_lora, lora_state
from gemma_kit.posttrain.policy import completion_logprobs, reference_values, snapshot, with_trained

TOKENS = jnp.asarray([[2, 17, 33, 5, 81, 9, 44, 3]], jnp.int32)


def _lora_model(tiny_model, config):
    """A tiny model, its logits without LoRA, and the same model with non-zero LoRA factors."""
    model = tiny_model(config, seed=3)
    base_logits = model(TOKENS)
    apply_lora(model, rank=2, alpha=4.0, seed=1)
    rng = np.random.default_rng(0)
    for _path, leaf in nnx.to_flat_state(lora_state(model)):
        leaf.set_value(jnp.asarray(rng.normal(0, 0.3, leaf.get_value().shape), jnp.float32))
    return model, base_logits


def test_reference_values_give_the_base_model(tiny_model, tiny_gemma3_config):
    model, base_logits = _lora_model(tiny_model, tiny_gemma3_config)
    adapted = model(TOKENS)
    assert float(jnp.max(jnp.abs(adapted - base_logits))) > 1e-2  # the adapter does something
    reference = with_trained(model, reference_values(lora_state(model)))
    np.testing.assert_allclose(reference(TOKENS), base_logits, atol=1e-6)
    # The policy itself is untouched, and its own values give it back.
    np.testing.assert_array_equal(model(TOKENS), adapted)
    same = with_trained(model, snapshot(lora_state(model)))
    np.testing.assert_array_equal(same(TOKENS), adapted)


def test_values_are_arguments_under_jit(tiny_model, tiny_gemma3_config):
    """New values of the same shapes run the same compiled function and change its result."""
    model, base_logits = _lora_model(tiny_model, tiny_gemma3_config)
    graphdef, state = nnx.split(model)
    traces = []

    @jax.jit
    def logits(state, values):
        traces.append(1)
        return with_trained(nnx.merge(graphdef, state), values)(TOKENS)

    current = snapshot(lora_state(model))
    np.testing.assert_allclose(logits(state, current), model(TOKENS), atol=1e-5)
    np.testing.assert_allclose(logits(state, reference_values(current)), base_logits, atol=1e-5)
    assert len(traces) == 1


def test_snapshot_never_aliases(tiny_model, tiny_gemma3_config):
    model, _ = _lora_model(tiny_model, tiny_gemma3_config)
    state = lora_state(model)
    copy = snapshot(state)
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(state)), jax.tree.leaves(copy), strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()


def test_completion_logprobs_equal_the_full_log_softmax(tiny_model, tiny_gemma3_config):
    model, _ = _lora_model(tiny_model, tiny_gemma3_config)
    T = TOKENS.shape[1] - 1
    batch = dict(
        tokens=TOKENS[:, :-1],
        targets=TOKENS[:, 1:],
        positions=jnp.arange(T, dtype=jnp.int32)[None],
        segments=jnp.ones((1, T), jnp.int32),
    )
    got = completion_logprobs(model, batch, chunk=3)
    full = jax.nn.log_softmax(model(TOKENS[:, :-1]).astype(jnp.float32), axis=-1)
    want = jnp.take_along_axis(full, TOKENS[:, 1:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(got, want, atol=1e-5)
