"""Parity with Hugging Face transformers on tiny random Gemma 2 / Gemma 3 models.

Each case builds a transformers model from a config (nothing is downloaded), randomises every
weight (norm scales included, so the (1 + scale) convention is exercised), converts it with
gemma_kit.checkpoint.hf, and compares float32 logits. Tolerance: max abs diff <= 1e-4 on logits
of magnitude ~1-10; the observed differences are ~1e-6 (float32 rounding of two summation
orders).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the parity tests need the [test] extra (torch)")
transformers = pytest.importorskip("transformers", reason="the parity tests need transformers")

from gemma_kit.checkpoint.hf import config_from_hf, params_from_hf  # noqa: E402
from gemma_kit.config import GlobalAttention, LocalAttention  # noqa: E402
from gemma_kit.loading import model_from_params  # noqa: E402

ATOL = 1e-4
SEQ = 24  # several times the window of 5 below, so local layers really slide


def _hf_model(family: str, **overrides):
    common = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=5,
        query_pre_attn_scalar=16,
        attn_implementation="eager",
    )
    common.update(overrides)
    if family == "gemma2":
        config = transformers.Gemma2Config(**common)
        model = transformers.Gemma2ForCausalLM(config)
    else:
        config = transformers.Gemma3TextConfig(**common)
        model = transformers.Gemma3ForCausalLM(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Large enough that logits are O(1..10) and soft-caps and masks matter.
            p.normal_(0.0, 0.5 if "norm" in name else 0.15)
    return model.eval()


def _convert(hf_model):
    config = config_from_hf(hf_model.config, name="tiny")
    params = params_from_hf(hf_model.state_dict(), config)
    return config, model_from_params(config, params)


def _hf_logits(hf_model, tokens, mask=None, positions=None):
    with torch.no_grad():
        out = hf_model(
            input_ids=torch.tensor(np.asarray(tokens)),
            attention_mask=None if mask is None else torch.tensor(np.asarray(mask)),
            position_ids=None if positions is None else torch.tensor(np.asarray(positions)),
        )
    return out.logits.float().numpy()


CASES = {
    "gemma2-gqa-softcaps": (
        "gemma2",
        dict(attn_logit_softcapping=3.0, final_logit_softcapping=4.0),
    ),
    "gemma2-mha-no-softcaps": (
        "gemma2",
        dict(num_key_value_heads=4, attn_logit_softcapping=None, final_logit_softcapping=None),
    ),
    "gemma2-mqa": ("gemma2", dict(num_key_value_heads=1)),
    "gemma3-gqa-local-and-global": ("gemma3", dict(num_hidden_layers=7)),
    "gemma3-mqa-rope-scaled": (
        "gemma3",
        dict(
            num_hidden_layers=6,
            num_key_value_heads=1,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
        ),
    ),
    # transformers' Gemma 3 ignores attn_logit_softcapping (no Gemma 3 uses it): final cap only.
    "gemma3-mha-final-softcap": (
        "gemma3",
        dict(num_key_value_heads=4, final_logit_softcapping=5.0),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case):
    family, overrides = CASES[case]
    hf_model = _hf_model(family, **overrides)
    config, model = _convert(hf_model)
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, SEQ))

    ref = _hf_logits(hf_model, tokens)
    ours = np.asarray(model(jnp.asarray(tokens)))

    assert ours.shape == ref.shape == (2, SEQ, config.vocab_size)
    assert np.abs(ref).max() > 1.0, "weights too small for the comparison to mean anything"
    np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL)


def test_converted_configs_cover_the_features():
    """The cases above really contain what their names say (guards against silent defaults)."""
    g2 = config_from_hf(_hf_model("gemma2", **CASES["gemma2-gqa-softcaps"][1]).config)
    assert g2.attn_logit_softcap == 3.0 and g2.final_logit_softcap == 4.0
    assert [type(k) for k in g2.layers[:2]] == [LocalAttention, GlobalAttention]
    assert g2.layers[0].window == 5 < SEQ
    mha = config_from_hf(_hf_model("gemma2", **CASES["gemma2-mha-no-softcaps"][1]).config)
    assert mha.uses_qkv_einsum and mha.attn_logit_softcap is None
    g3 = config_from_hf(_hf_model("gemma3", **CASES["gemma3-mqa-rope-scaled"][1]).config)
    assert g3.num_kv_heads == 1 and g3.use_qk_norm
    assert g3.layers[5] == GlobalAttention(rope_base=1_000_000.0, rope_scale=8.0)
    assert all(k == LocalAttention(5, rope_base=10_000.0) for k in g3.layers[:5])


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_left_padded_batch_is_exact(family):
    """Padding never changes a sequence's logits: each padded row equals the row run alone."""
    hf_model = _hf_model(family, num_hidden_layers=6)
    config, model = _convert(hf_model)
    rng = np.random.default_rng(2)
    lengths = [SEQ, 9, 16]
    tokens = np.zeros((len(lengths), SEQ), np.int64)
    valid = np.zeros((len(lengths), SEQ), bool)
    for row, n in enumerate(lengths):
        tokens[row, SEQ - n :] = rng.integers(1, config.vocab_size, n)
        valid[row, SEQ - n :] = True
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)

    batched = np.asarray(model(jnp.asarray(tokens), mask=jnp.asarray(valid)))
    ref = _hf_logits(hf_model, tokens, mask=valid.astype(np.int64), positions=positions)
    for row, n in enumerate(lengths):
        alone = np.asarray(model(jnp.asarray(tokens[row : row + 1, SEQ - n :])))[0]
        np.testing.assert_allclose(batched[row, SEQ - n :], alone, rtol=0, atol=ATOL)
        np.testing.assert_allclose(batched[row, SEQ - n :], ref[row, SEQ - n :], rtol=0, atol=ATOL)


def test_conversion_consumes_every_tensor():
    hf_model = _hf_model("gemma3")
    config = config_from_hf(hf_model.config)
    state = dict(hf_model.state_dict())
    state["model.layers.0.self_attn.extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="not consumed"):
        params_from_hf(state, config)
    del state["model.layers.0.self_attn.extra.weight"]
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="up_proj.weight.*missing"):
        params_from_hf(state, config)
