"""gemma_kit.posttrain.merging: SLERP / LERP / LITI / EMA / averages against closed forms, and the
LoRA-exact merges against gemma_kit.lora's materialised deltas (LoRA.delta()).

Tolerances: 1e-6 relative for float32 closed forms, 1e-5 absolute for LoRA deltas (float32
products of different association).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma_kit import lora
from gemma_kit.errors import CheckpointError, ConfigError
from gemma_kit.posttrain import merging as M


def _tree(seed, narrow=jnp.bfloat16):
    """Parameters of a toy model, one leaf stored in a narrower dtype."""
    rng = np.random.default_rng(seed)
    return {
        "embed": jnp.asarray(rng.normal(0, 1, (6, 4)), jnp.float32),
        "layer_0": {
            "w": jnp.asarray(rng.normal(0, 1, (4, 3, 2)), jnp.float32),
            "scale": jnp.asarray(rng.normal(0, 1, (3,)), narrow),
        },
    }


def _add(a, b, c=1.0):
    return jax.tree.map(
        lambda x, y: (x.astype(jnp.float32) + c * y.astype(jnp.float32)).astype(x.dtype), a, b
    )


def _close(a, b, rtol=1e-5, atol=1e-6):
    """Leaf by leaf; a bfloat16 leaf is compared at bfloat16's resolution (2^-8)."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        loose = jnp.asarray(x).dtype == jnp.bfloat16
        np.testing.assert_allclose(
            np.asarray(x, np.float32),
            np.asarray(y, np.float32),
            rtol=max(rtol, 8e-3) if loose else rtol,
            atol=max(atol, 8e-3) if loose else atol,
        )


def test_slerp_endpoints_and_lerp():
    init, a, b = _tree(0), _tree(1), _tree(2)
    _close(M.slerp(init, a, b, 0.0), a)
    _close(M.slerp(init, a, b, 1.0), b)
    _close(
        M.lerp(init, a, b, 0.3),
        jax.tree.map(lambda x, y: 0.7 * x.astype(jnp.float32) + 0.3 * y.astype(jnp.float32), a, b),
    )
    assert jax.tree.map(lambda x: x.dtype, M.slerp(init, a, b, 0.5)) == jax.tree.map(
        lambda x: x.dtype, init
    )


def test_slerp_keeps_the_norm_of_orthogonal_task_vectors():
    """Orthogonal equal-norm task vectors: SLERP(1/2) keeps the norm, LERP shrinks it by
    1 / sqrt 2 (WARP's argument for SLERP); at other lam SLERP stays on the circle."""
    init = {"w": jnp.full((2, 3), 0.5)}
    da = jnp.asarray([[1.0, 0, 0], [0, 2.0, 0]])
    db = jnp.asarray([[0, 0, 2.0], [1.0, 0, 0]])
    assert abs(float(jnp.sum(da * db))) == 0.0 and float(jnp.sum(da * da)) == float(
        jnp.sum(db * db)
    )
    a, b = {"w": init["w"] + da}, {"w": init["w"] + db}
    norm = float(jnp.linalg.norm(da))
    for lam in (0.25, 0.5, 0.9):
        merged = M.slerp(init, a, b, lam)["w"] - init["w"]
        assert float(jnp.linalg.norm(merged)) == pytest.approx(norm, rel=1e-6)
    lerped = M.lerp(init, a, b, 0.5)["w"] - init["w"]
    assert float(jnp.linalg.norm(lerped)) == pytest.approx(norm / np.sqrt(2), rel=1e-6)
    c_a, c_b = M.slerp_coefficients(0.0, 1.0, 1.0, 0.5)
    assert float(c_a) == pytest.approx(np.sin(np.pi / 4)) == float(c_b)


def test_slerp_falls_back_to_lerp_when_collinear():
    # float32 leaves: bfloat16 rounding would itself tilt the task vectors by ~2^-8 rad.
    init = _tree(3, jnp.float32)
    delta = _add(_tree(4, jnp.float32), init, -1.0)
    for c_b in (1.0, 2.0, -1.0):  # parallel (same and different norm) and anti-parallel
        a = _add(init, delta)
        b = _add(init, delta, c_b)
        s, ln = M.slerp(init, a, b, 0.4), M.lerp(init, a, b, 0.4)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(s))
        _close(s, ln)
    # A zero task vector (a run that did not move) has no angle: LERP, no NaN.
    s = M.slerp(init, init, _tree(5, jnp.float32), 0.5)
    _close(s, M.lerp(init, init, _tree(5, jnp.float32), 0.5))


def test_liti_ema_average_and_task_vector():
    init, merged = _tree(6), _tree(7)
    _close(M.liti(init, merged, 0.0), init, rtol=0, atol=0)
    _close(M.liti(init, merged, 1.0), merged, rtol=0, atol=0)
    _close(
        M.liti(init, merged, 0.25)["embed"],
        0.75 * init["embed"] + 0.25 * merged["embed"],
        rtol=1e-6,
    )
    # EMA against a constant target: theta + (1 - mu)^k (theta_0 - theta).
    anchor, target, mu = _tree(8), _tree(9), 0.1
    for _ in range(7):
        anchor = M.ema(anchor, target, mu)
    np.testing.assert_allclose(
        anchor["embed"],
        target["embed"] + 0.9**7 * (_tree(8)["embed"] - target["embed"]),
        rtol=1e-5,
        atol=1e-6,
    )
    trees = [_tree(10), _tree(11), _tree(12)]
    np.testing.assert_allclose(
        M.average(trees)["embed"], sum(t["embed"] for t in trees) / 3, rtol=1e-6
    )
    np.testing.assert_allclose(
        M.average(trees, [1, 0, 3])["embed"],
        (trees[0]["embed"] + 3 * trees[2]["embed"]) / 4,
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        M.task_vector(init, merged)["embed"], merged["embed"] - init["embed"], rtol=1e-6
    )


def test_weight_average_of_linear_heads_is_the_ensemble():
    """WARM's closed form: on frozen shared features, the weight average of linear heads
    predicts the mean of the heads' predictions, exactly."""
    feats = jnp.asarray(np.random.default_rng(13).normal(size=(9, 5)), jnp.float32)
    heads = [
        {"w": jnp.asarray(np.random.default_rng(s).normal(size=(5,)), jnp.float32)}
        for s in range(4)
    ]
    averaged = M.average(heads)["w"]
    np.testing.assert_allclose(
        feats @ averaged,
        jnp.mean(jnp.stack([feats @ h["w"] for h in heads]), 0),
        rtol=1e-5,
        atol=1e-6,
    )


def test_bad_inputs():
    init, a, b = _tree(0), _tree(1), _tree(2)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match=r"lam must lie in \[0, 1\]"):
            M.slerp(init, a, b, bad)
        with pytest.raises(ConfigError, match=r"eta must lie in \[0, 1\]"):
            M.liti(init, a, bad)
        with pytest.raises(ConfigError, match=r"rate must lie in \[0, 1\]"):
            M.ema(init, a, bad)
    other = dict(b, embed=jnp.zeros((7, 4)))  # another model's embedding size
    with pytest.raises(CheckpointError, match=r"run b and init differ at embed: shapes"):
        M.slerp(init, a, other, 0.5)
    missing = {"embed": b["embed"], "layer_1": b["layer_0"]}  # other parameter names
    with pytest.raises(CheckpointError, match="different parameters"):
        M.lerp(init, a, missing, 0.5)
    with pytest.raises(ConfigError, match="weights"):
        M.average([a, b], [1.0, -1.0])
    with pytest.raises(ConfigError, match="2 weights for 3"):
        M.average([a, b, init], [1.0, 1.0])
    with pytest.raises(ConfigError, match="no LoRA factors"):
        M.lora_average([a, b])


# ------------------------------------------------------------------------------------------
# LoRA, exactly


RANK, ALPHA = 2, 4.0


def _lora_run(config, tiny_model, seed, rank=RANK, alpha=ALPHA):
    """A tiny model with LoRA whose A and B are both random (a trained-looking adapter)."""
    model = tiny_model(config, seed=0)
    lora.apply_lora(model, rank=rank, alpha=alpha, seed=seed)
    rng = np.random.default_rng(seed + 100)
    factors = jax.tree.map(
        lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype),
        nnx.to_pure_dict(lora.lora_state(model)),
    )
    return model, factors


def _deltas(config, tiny_model, factors, rank, alpha):
    """{module path: LoRA.delta()} of a model carrying `factors` (rank, alpha)."""
    model = tiny_model(config, seed=0)
    lora.apply_lora(model, rank=rank, alpha=alpha)
    state = lora.lora_state(model)
    nnx.replace_by_pure_dict(state, factors)
    nnx.update(model, state)
    return {path: m.lora.delta() for path, m in lora.einsums(model) if m.lora is not None}


def test_lora_average_equals_averaging_materialised_deltas(tiny_gemma3_config, tiny_model):
    runs = [_lora_run(tiny_gemma3_config, tiny_model, s)[1] for s in (1, 2, 3)]
    deltas = [_deltas(tiny_gemma3_config, tiny_model, f, RANK, ALPHA) for f in runs]
    state = lora.lora_state(_lora_run(tiny_gemma3_config, tiny_model, 1)[0])
    nnx.replace_by_pure_dict(state, runs[0])  # an nnx.State mixes with pure dicts
    merged = M.lora_average([state, runs[1], runs[2]], [1.0, 2.0, 1.0])
    # A rank-3r LoRA applied with the same scaling alpha / r: alpha' = 3 alpha.
    got = _deltas(tiny_gemma3_config, tiny_model, merged, 3 * RANK, 3 * ALPHA)
    assert set(got) == set(deltas[0]) and len(got) > 5
    for path, delta in got.items():
        expected = (deltas[0][path] + 2 * deltas[1][path] + deltas[2][path]) / 4
        np.testing.assert_allclose(delta, expected, atol=1e-5)
    # Averaging A and B separately is not averaging the models.
    naive = jax.tree.map(lambda *x: sum(x) / 3, *runs)
    naive_d = _deltas(tiny_gemma3_config, tiny_model, naive, RANK, ALPHA)
    path = next(iter(got))
    assert float(jnp.max(jnp.abs(naive_d[path] - sum(d[path] for d in deltas) / 3))) > 1e-2


def test_lora_slerp_from_gram_matrices(tiny_gemma2_config, tiny_model):
    """Gram-matrix inner products equal those of materialised deltas; the LoRA SLERP's delta
    equals the dense SLERP of the two deltas (zero init), per tensor; LITI scales it."""
    fa = _lora_run(tiny_gemma2_config, tiny_model, 1)[1]
    fb = _lora_run(tiny_gemma2_config, tiny_model, 2)[1]
    da = _deltas(tiny_gemma2_config, tiny_model, fa, RANK, ALPHA)
    db = _deltas(tiny_gemma2_config, tiny_model, fb, RANK, ALPHA)
    pairs_a = jax.tree.leaves(fa, is_leaf=M.is_lora_pair)
    pairs_b = jax.tree.leaves(fb, is_leaf=M.is_lora_pair)
    assert len(pairs_a) == len(da) > 5
    for pa, pb in zip(pairs_a, pairs_b):
        dense_a, dense_b = M.lora_delta(pa), M.lora_delta(pb)
        np.testing.assert_allclose(M.lora_inner(pa, pb), jnp.sum(dense_a * dense_b), rtol=1e-5)
    for lam in (0.3, 0.5):
        merged = M.lora_slerp(fa, fb, lam)
        got = _deltas(tiny_gemma2_config, tiny_model, merged, 2 * RANK, 2 * ALPHA)
        for path in da:
            zero = jnp.zeros_like(da[path])
            expected = M.slerp({"w": zero}, {"w": da[path]}, {"w": db[path]}, lam)["w"]
            np.testing.assert_allclose(got[path], expected, atol=1e-5)
        liti = _deltas(
            tiny_gemma2_config, tiny_model, M.lora_liti(merged, 0.3), 2 * RANK, 2 * ALPHA
        )
        for path in da:
            np.testing.assert_allclose(liti[path], 0.3 * got[path], atol=1e-6)
    lerped = _deltas(tiny_gemma2_config, tiny_model, M.lora_lerp(fa, fb, 0.25), 2 * RANK, 2 * ALPHA)
    for path in da:
        np.testing.assert_allclose(lerped[path], 0.75 * da[path] + 0.25 * db[path], atol=1e-5)
    # Different ranks are different LoRA settings: refused with the differing path.
    fc = _lora_run(tiny_gemma2_config, tiny_model, 3, rank=3)[1]
    with pytest.raises(CheckpointError, match="differ at .*lora/a: shapes"):
        M.lora_slerp(fa, fc, 0.5)
