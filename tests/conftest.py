"""Shared tiny configurations and a tiny-model factory.

The tiny configs keep every structural feature of their family (so every code path and every
parameter name of a real checkpoint is exercised) at sizes that build and run in milliseconds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma_kit.config import Config, GlobalAttention, LocalAttention, get_preset
from gemma_kit.transformer import Transformer


@pytest.fixture
def tiny_gemma3_config() -> Config:
    """Gemma 3 style: GQA (N=4, K=2), QK-norm, [2, F, D] gating, two local layers + one global.

    The window (4) is shorter than the test sequences, so the sliding window actually cuts.
    """
    return get_preset("gemma3-270m").replace(
        name="tiny-gemma3",
        vocab_size=256,
        embed_dim=32,
        hidden_dim=48,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        layers=(LocalAttention(4), LocalAttention(4), GlobalAttention(rope_base=1_000_000.0)),
        query_pre_attn_scalar=16,
        max_context=64,
    )


@pytest.fixture
def tiny_gemma2_config() -> Config:
    """Gemma 2 style: MHA (N == K, so one fused qkv_einsum), [2, D, F] gating, soft-caps."""
    return get_preset("gemma2-2b").replace(
        name="tiny-gemma2",
        vocab_size=256,
        embed_dim=32,
        hidden_dim=48,
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        layers=(LocalAttention(4), GlobalAttention()),
        query_pre_attn_scalar=16,
        transpose_gating=False,
        max_context=64,
    )


@pytest.fixture
def tiny_model():
    """Factory: tiny_model(config, seed=0, param_dtype=float32) -> Transformer.

    Every parameter, norm scales included, is drawn at random: the zero-initialised norm scales
    of a fresh model would make a dropped or swapped norm invisible to a comparison.
    """

    def make(config: Config, *, seed: int = 0, param_dtype=jnp.float32) -> Transformer:
        # Shapes from eval_shape, values from numpy: initialising eagerly would compile one
        # random-number kernel per parameter shape (seconds, for nothing).
        abstract = nnx.eval_shape(lambda: Transformer(config, param_dtype=param_dtype))
        graphdef, state = nnx.split(abstract)
        rng = np.random.default_rng(seed)
        device = jax.devices()[0]
        # Committed to the device, as restored checkpoints are, so that a jitted forward pass
        # compiled for one model is reused for the other side of a comparison.
        params = jax.tree.map(
            lambda p: jax.device_put(rng.normal(0.0, 0.3, p.shape).astype(p.dtype), device),
            nnx.to_pure_dict(state),
        )
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(graphdef, state)

    return make
