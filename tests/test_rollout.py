"""On-policy rollouts (gemma_kit.posttrain.rollout) on a tiny random model and the small real
tokenizer: behaviour log-probs against a teacher-forced forward pass of the training batch, the
stop token kept, no recompilation when the parameters change, (seed, step) reproducibility,
and a LoRA Sampler updated in place against a freshly built one.

The tiny model's sliding window (4) is shorter than every prompt, so the local layers' ring
caches wrap during the rollouts.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma_kit import lora
from gemma_kit.decode import PAD_ID
from gemma_kit.posttrain.rollout import rollout
from gemma_kit.sampler import Sampler
from gemma_kit.sampling import SamplingError
from gemma_kit.training.losses import attention_mask, cross_entropy_sums
from tests.support.tiny import SMALL_TEXT, SMALL_VOCAB

WORDS = SMALL_TEXT.split()
PROMPTS = [" ".join(WORDS[:7]), " ".join(WORDS[40:52]), " ".join(WORDS[90:94])]
K = 3
NEW = 12
FREE = dict(num_samples=K, max_new_tokens=NEW, stop_token_ids=())  # nothing ends a row early


@pytest.fixture(scope="module")
def lora_model():
    """The tiny Gemma 3 (window 4, one global layer) with LoRA on every projection, B != 0."""
    from tests.support import tiny

    config = tiny.tiny_gemma3().replace(vocab_size=SMALL_VOCAB, max_context=128)
    model = tiny.random_model(config, seed=2)
    lora.apply_lora(model, rank=2, alpha=4.0, targets="all", seed=0)
    _set_b(model, seed=1)
    return model


def _set_b(model, seed: int) -> None:
    """Gives every LoRA B factor new random values (as a training step would)."""
    rng = np.random.default_rng(seed)
    for _, module in lora.einsums(model):
        b = module.lora.b
        b[...] = jnp.asarray(rng.normal(0.0, 0.2, b.shape), b.dtype)


@functools.partial(jax.jit, static_argnums=0)
def _teacher_forced(graphdef, state, batch):
    """log p(target) of every position of a training batch, by one forward pass, [R, T]."""
    model = nnx.merge(graphdef, state)
    mask = attention_mask(batch["positions"], batch["segments"])
    logits = model(batch["tokens"], batch["positions"], mask).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]


@contextlib.contextmanager
def _count_compiles():
    """Counts XLA compilations (any function) while the block runs."""
    seen = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            seen.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _same(a, b) -> None:
    np.testing.assert_array_equal(a.completion_ids, b.completion_ids)
    np.testing.assert_array_equal(a.completion_mask, b.completion_mask)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert a.finish_reasons == b.finish_reasons and a.texts == b.texts


# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cache_dtype, atol",
    [(jnp.float32, 2e-5), (jnp.bfloat16, 0.05)],
    ids=["f32-cache", "bf16-cache"],
)
def test_logprobs_equal_a_teacher_forced_forward_pass(
    lora_model, small_tokenizer, cache_dtype, atol
):
    """The behaviour log-probs are those of a full forward pass (no cache, f32) over the
    training batch at its targets; the trainer's chunked cross-entropy of the batch is minus
    their sum.

    With a float32 cache the two computations differ by rounding only (observed ~1e-6). The
    default bf16 cache stores keys and values rounded to 8 mantissa bits, which moves this
    random model's log-probs by up to ~1e-2 (observed; a trained model's logits move by ~1%
    of their scale, tests/test_real_model.py): losses that need exact ratios should recompute
    log-probs by a forward pass, or sample with cache_dtype=float32.
    """
    sampler = Sampler(lora_model, small_tokenizer, cache_dtype=cache_dtype)
    out = rollout(sampler, PROMPTS, seed=0, step=3, **FREE)
    assert out.completion_ids.shape == (len(PROMPTS) * K, NEW)
    assert out.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    batch = out.training_batch()
    assert (batch["weights"].sum(1) == NEW).all()
    assert batch["tokens"].shape[1] % 8 == 0  # bucketed
    graphdef, state = nnx.split(lora_model)
    logp = np.asarray(_teacher_forced(graphdef, state, batch))
    w = batch["weights"] > 0
    err = np.abs(logp[w] - batch["behaviour_logprobs"][w]).max()
    print(f"{np.dtype(cache_dtype).name} cache: max |rollout - forward| log-prob = {err:.2e}")
    assert err <= atol
    if cache_dtype == jnp.float32:
        # The batch in the trainer's own layout: its loss function takes it as it is.
        hidden = lora_model.hidden_states(
            batch["tokens"],
            batch["positions"],
            attention_mask(batch["positions"], batch["segments"]),
        )
        ce, n = cross_entropy_sums(lora_model, hidden, batch["targets"], batch["weights"], 16)
        assert int(n) == w.sum()
        np.testing.assert_allclose(float(ce), -batch["behaviour_logprobs"].sum(), rtol=1e-5)
    # Each row's inputs are its prompt then its completion, right-padded with zeros.
    r = 4
    m = len(out.prompt_ids[r]) + NEW - 1
    seq = out.prompt_ids[r] + out.completion_ids[r].tolist()
    assert batch["tokens"][r, :m].tolist() == seq[:-1]
    assert batch["targets"][r, :m].tolist() == seq[1:]
    assert not batch["segments"][r, m:].any() and not batch["tokens"][r, m:].any()


@pytest.fixture(scope="module")
def sampler(lora_model, small_tokenizer):
    return Sampler(lora_model, small_tokenizer, cache_dtype=jnp.float32)


def test_the_stop_token_is_kept_and_the_mask_ends_after_it(sampler, small_tokenizer):
    free = rollout(sampler, PROMPTS, seed=1, step=0, **FREE)
    # A token some row draws for the first time at position 2..NEW-2 becomes the stop token.
    row, at = next(
        (r, j)
        for r in range(len(free.texts))
        for j in range(2, NEW - 1)
        if free.completion_ids[r, j] not in free.completion_ids[r, :j]
    )
    stop = int(free.completion_ids[row, at])
    out = rollout(
        sampler, PROMPTS, seed=1, step=0, num_samples=K, max_new_tokens=NEW, stop_token_ids=[stop]
    )
    for r in range(len(out.texts)):
        drawn = free.completion_ids[r].tolist()
        end = drawn.index(stop) + 1 if stop in drawn else NEW
        # The same draws up to and including the stop token, nothing after it.
        assert out.completion_ids[r, :end].tolist() == drawn[:end]
        assert (out.completion_ids[r, end:] == PAD_ID).all()
        assert out.completion_mask[r].tolist() == [True] * end + [False] * (NEW - end)
        np.testing.assert_allclose(out.logprobs[r, :end], free.logprobs[r, :end], atol=1e-6)
        assert out.finish_reasons[r] == ("stop" if stop in drawn else "length")
        assert out.texts[r] == small_tokenizer.decode(drawn[: end - (stop in drawn)])
    assert out.finish_reasons[row] == "stop" and out.lengths[row] == at + 1
    batch = out.training_batch()
    # The stop token is the last weighted target of its row.
    last = np.flatnonzero(batch["weights"][row])[-1]
    assert batch["targets"][row, last] == stop and not batch["weights"][row, last + 1 :].any()


def test_same_seed_and_step_give_the_same_rollout(sampler):
    a = rollout(sampler, PROMPTS, seed=7, step=5, **FREE)
    _same(a, rollout(sampler, PROMPTS, seed=7, step=5, **FREE))
    for seed, step in ((7, 6), (8, 5)):
        other = rollout(sampler, PROMPTS, seed=seed, step=step, **FREE)
        assert (other.completion_ids != a.completion_ids).any()
    # The K samples of one prompt differ from each other.
    assert (a.completion_ids[0] != a.completion_ids[1]).any()


def test_new_lora_factors_do_not_recompile_and_equal_a_fresh_sampler(lora_model, small_tokenizer):
    """update_params swaps the LoRA leaves: no compilation at all, and the rollout equals the
    one a Sampler built from scratch on the updated model draws."""
    sampler = Sampler(lora_model, small_tokenizer, cache_dtype=jnp.float32)
    before = rollout(sampler, PROMPTS, seed=2, step=1, **FREE)  # compiles
    _set_b(lora_model, seed=5)
    with _count_compiles() as compiles:
        sampler.update_params(lora.lora_state(lora_model))
        after = rollout(sampler, PROMPTS, seed=2, step=1, **FREE)
    assert compiles == []
    assert (after.completion_ids != before.completion_ids).any()  # the new factors matter
    fresh = rollout(
        Sampler(lora_model, small_tokenizer, cache_dtype=jnp.float32),
        PROMPTS,
        seed=2,
        step=1,
        **FREE,
    )
    _same(after, fresh)


def test_full_parameter_update_relayouts_the_base(small_tokenizer):
    """Base weights (full fine-tuning) are transposed into the matvec layout on update: the
    rollout equals a fresh Sampler's, again without compiling."""
    from tests.support import tiny

    config = tiny.tiny_gemma3().replace(vocab_size=SMALL_VOCAB, max_context=128)
    model = tiny.random_model(config, seed=4)
    sampler = Sampler(model, small_tokenizer, cache_dtype=jnp.float32, matvec_layout=True)
    rollout(sampler, PROMPTS[:1], seed=0, step=0, **FREE)
    w = model.layer_0.mlp.linear.w  # [F, D]: stored transposed in the matvec layout
    w[...] = w[...] * 1.5
    model.layer_2.attn.q_einsum.w[...] = -model.layer_2.attn.q_einsum.w[...]
    params = nnx.state(model, nnx.Param)
    sampler.update_params(params)  # compiles its transposes once
    with _count_compiles() as compiles:
        sampler.update_params(params)
        updated = rollout(sampler, PROMPTS[:1], seed=0, step=0, **FREE)
    assert compiles == []
    fresh = Sampler(model, small_tokenizer, cache_dtype=jnp.float32, matvec_layout=True)
    _same(updated, rollout(fresh, PROMPTS[:1], seed=0, step=0, **FREE))


def test_bad_settings_and_updates_are_refused(sampler, lora_model):
    with pytest.raises(
        SamplingError, match="rollouts for on-policy losses sample at temperature 1 without top_k"
    ):
        rollout(sampler, PROMPTS, seed=0, step=0, temperature=0.7, **FREE)
    with pytest.raises(SamplingError, match="top_k=5"):
        rollout(sampler, PROMPTS, seed=0, step=0, top_k=5, **FREE)
    with pytest.raises(SamplingError, match="num_samples must be an integer >= 1, got 0"):
        rollout(sampler, PROMPTS, 0, NEW, seed=0, step=0)
    with pytest.raises(SamplingError, match="non-empty list of prompts"):
        rollout(sampler, "one string", K, NEW, seed=0, step=0)
    with pytest.raises(SamplingError, match="prompt 1 is neither a string nor"):
        rollout(sampler, ["ok", []], K, NEW, seed=0, step=0)
    state = lora.lora_state(lora_model)
    a = state["layer_0"]["attn"]["q_einsum"]["lora"]["a"]
    bad = nnx.State({"layer_0": {"attn": {"q_einsum": {"lora": {"a": a[...][:16]}}}}})
    with pytest.raises(
        SamplingError,
        match=r"update_params: layer_0/attn/q_einsum/lora/a is "
        r"float32\[16, 2\] but the Sampler's model has "
        r"float32\[32, 2\]",
    ):
        sampler.update_params(bad)
    with pytest.raises(SamplingError, match="has no variable layer_9/attn"):
        sampler.update_params(nnx.State({"layer_9": {"attn": {"w": a[...]}}}))
    with pytest.raises(SamplingError, match="too short: the longest prompt plus its completion"):
        rollout(sampler, PROMPTS, seed=0, step=0, **FREE).training_batch(length=8)
