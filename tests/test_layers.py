"""The pure pieces: masks, RoPE, soft-cap, RMSNorm, grouped attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_kit.attention import MASKED_LOGIT, attend, causal_mask, sliding_window_mask
from gemma_kit.layers import MIN_ROWS, RMSNorm, apply_rope, matmul_t, softcap


def test_causal_and_window_masks_from_positions():
    pos = jnp.arange(6)[None]
    causal = np.asarray(causal_mask(pos, pos))[0]
    assert (causal == np.tril(np.ones((6, 6), bool))).all()
    local = np.asarray(causal_mask(pos, pos) & sliding_window_mask(pos, pos, 3))[0]
    # Query 5 sees keys 3, 4, 5: the window counts the query itself.
    assert local[5].tolist() == [False, False, False, True, True, True]
    assert local.sum(axis=1).tolist() == [1, 2, 3, 3, 3, 3]


def test_masks_depend_on_positions_not_slots():
    """Keys stored out of order (a ring buffer) get the same mask as in order."""
    q = jnp.array([[7]])
    k_in_order = jnp.array([[4, 5, 6, 7]])
    k_ring = jnp.array([[6, 7, 4, 5]])
    m1 = np.asarray(causal_mask(q, k_in_order) & sliding_window_mask(q, k_in_order, 3))[0, 0]
    m2 = np.asarray(causal_mask(q, k_ring) & sliding_window_mask(q, k_ring, 3))[0, 0]
    assert m1.tolist() == [False, True, True, True]
    assert m2.tolist() == [True, True, False, True]


def test_rope_is_a_rotation_with_relative_inner_products():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 64)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 64)), jnp.float32)

    def rot(x, p):
        return apply_rope(x, jnp.array([[p]]), base=10_000.0)

    np.testing.assert_allclose(jnp.linalg.norm(rot(q, 37)), jnp.linalg.norm(q), rtol=1e-5)
    # <R_m q, R_n k> depends on m - n only.
    a = float(jnp.sum(rot(q, 10) * rot(k, 3)))
    b = float(jnp.sum(rot(q, 107) * rot(k, 100)))
    np.testing.assert_allclose(a, b, rtol=1e-4)
    # Position 0 is the identity; a scale factor divides positions.
    np.testing.assert_allclose(rot(q, 0), q, atol=1e-6)
    np.testing.assert_allclose(
        apply_rope(q, jnp.array([[80]]), base=1e6, scale=8.0),
        apply_rope(q, jnp.array([[10]]), base=1e6),
        atol=1e-5,
    )
    with pytest.raises(ValueError):
        apply_rope(q, jnp.array([[1]]), base=1e4, scale=0.5)


def test_softcap_bounds_and_passes_small_values():
    x = jnp.array([-1e4, -0.01, 0.0, 0.01, 1e4])
    y = np.asarray(softcap(x, 30.0))
    assert np.all(np.abs(y) <= 30.0) and y[0] == pytest.approx(-30.0)
    np.testing.assert_allclose(y[1:4], [-0.01, 0.0, 0.01], atol=1e-7)
    assert softcap(x, None) is x


def test_rmsnorm_uses_one_plus_scale():
    norm = RMSNorm(4, param_dtype=jnp.float32)
    x = jnp.array([[1.0, 2.0, 3.0, 4.0]])
    rms = np.sqrt(np.mean(np.square([1.0, 2.0, 3.0, 4.0])) + 1e-6)
    np.testing.assert_allclose(norm(x), x / rms, rtol=1e-6)
    norm.scale[...] = jnp.full((4,), 0.5)
    np.testing.assert_allclose(norm(x), 1.5 * x / rms, rtol=1e-6)


def test_grouped_attention_equals_repeated_kv_heads():
    """GQA with K kv heads equals MHA whose kv heads are repeated G times."""
    rng = np.random.default_rng(1)
    B, T, N, K, H = 2, 5, 6, 2, 8
    q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    mask = causal_mask(pos, pos)
    grouped = attend(q, k, v, mask, logit_cap=None)
    full = attend(
        q, jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2), mask, logit_cap=None
    )
    np.testing.assert_allclose(grouped, full, atol=1e-6)
    # A fully masked row stays finite (uniform weights) instead of turning into NaN.
    out = attend(q, k, v, jnp.zeros((B, T, T), bool), logit_cap=None)
    assert np.isfinite(np.asarray(out)).all()
    assert MASKED_LOGIT < -1e38
    # Row 0 of a causal mask attends only to key 0.
    np.testing.assert_allclose(
        grouped[:, 0, :2], jnp.repeat(v, N // K, axis=2)[:, 0, :2], atol=1e-6
    )
    jax.block_until_ready(grouped)


@pytest.mark.parametrize("stored", ["bfloat16", "int8"])
def test_matmul_t_gives_the_same_products_for_every_row_count(stored):
    """matmul_t computes one row differently (int8: an upcast matrix-vector loop) and pads
    fewer than MIN_ROWS rows (bf16), for speed only: every row count gives the bf16-rounded
    activations times the stored weights (times the int8 scales), summed in float32."""
    rng = np.random.default_rng(0)
    out_dim, in_dim = 48, 96
    if stored == "int8":
        w = jnp.asarray(rng.integers(-127, 128, (out_dim, in_dim)), jnp.int8)
        scale = jnp.asarray(rng.uniform(0.001, 0.01, out_dim), jnp.float32)
    else:
        w = jnp.asarray(rng.standard_normal((out_dim, in_dim)) * 0.1, jnp.bfloat16)
        scale = None
    x = jnp.asarray(rng.standard_normal((MIN_ROWS + 3, in_dim)), jnp.float32)
    rounded = np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    exact = rounded @ np.asarray(w.astype(jnp.float32), np.float64).T
    if scale is not None:
        exact = exact * np.asarray(scale, np.float64)
    product = jax.jit(lambda a: matmul_t(a, w.astype, w.dtype, scale))
    for rows in (1, 2, MIN_ROWS - 1, MIN_ROWS, MIN_ROWS + 3):
        y = np.asarray(product(x[:rows]))
        assert y.shape == (rows, out_dim) and y.dtype == np.float32
        # float32 sums of 96 terms: a few ulp of the largest partial sum.
        np.testing.assert_allclose(y, exact[:rows], rtol=0, atol=1e-5 * np.abs(exact).max())


def test_matvec_layout_gives_the_same_logits(tiny_gemma3_config, tiny_gemma2_config, tiny_model):
    """The transposed decode layout changes storage only: same logits, and no saving it."""
    from gemma_kit import save_checkpoint
    from gemma_kit.errors import CheckpointError
    from gemma_kit.layers import Einsum, to_matvec_layout

    for config in (tiny_gemma3_config, tiny_gemma2_config):  # GQA + [2,F,D]; MHA qkv + [2,D,F]
        model = tiny_model(config, seed=5)
        fast = to_matvec_layout(model)
        tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 7)))
        np.testing.assert_allclose(fast(tokens), model(tokens), atol=1e-5)
        einsums = [m for _, m in fast.iter_modules() if isinstance(m, Einsum)]
        assert einsums and all(m.matvec for m in einsums)
        assert not any(m.matvec for _, m in model.iter_modules() if isinstance(m, Einsum))
        # One token of one row: the matrix-vector forms (flatten_rows' concatenation for
        # the output projection, which contracts two axes).
        np.testing.assert_allclose(fast(tokens[:1, :1]), model(tokens[:1, :1]), atol=1e-5)
        linear = fast.layer_0.mlp.linear.w[...]
        assert linear.shape == (config.embed_dim, config.hidden_dim)  # [D, F]: F contracted last
        out = fast.layer_0.attn.attn_vec_einsum  # [N, H, D] stored as [D, N * H]
        N, H, D = config.num_heads, config.head_dim, config.embed_dim
        assert out.matvec_shape == (D, N, H) and out.w[...].shape == (D, N * H)
        with pytest.raises(CheckpointError, match="decode layout"):
            save_checkpoint(fast, "/nonexistent/never-written")


@pytest.mark.parametrize(
    "shape, contracted",
    [((1, 1, 4, 8), 2), ((3, 1, 4, 8), 2), ((2, 5, 4, 8), 2), ((1, 2, 3, 4, 5), 3), ((2, 7, 6), 1)],
)
def test_flatten_rows_is_a_row_major_reshape(shape, contracted):
    """flatten_rows builds few rows by concatenation (for XLA's loop, not the values): it is
    x.reshape(rows, -1) exactly, for any number of contracted axes and rows."""
    from gemma_kit.layers import flatten_rows

    x = jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)
    rows = int(np.prod(shape[: len(shape) - contracted]))
    y = jax.jit(lambda a: flatten_rows(a, contracted))(x)
    np.testing.assert_array_equal(y, x.reshape(rows, -1))
