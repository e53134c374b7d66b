"""gemma_kit.posttrain.losses against TRL, entmax and optax, and against closed forms.

Tolerances: 1e-6 absolute for float32 comparisons with TRL (torch float32), 1e-12 for float64
closed forms and for entmax/optax in float64; Monte Carlo checks state their own.
"""

from __future__ import annotations

import itertools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_kit.errors import ConfigError
from gemma_kit.posttrain import losses as L

BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)


def _logits(seed, shape=(3, 5, 37), scale=2.0, dtype=np.float32):
    return np.random.default_rng(seed).normal(0.0, scale, shape).astype(dtype)


def _mask(seed, shape=(3, 5)):
    mask = (np.random.default_rng(seed).random(shape) > 0.3).astype(np.float32)
    mask[0, 0] = 1.0
    mask[-1] = 0.0  # a sequence with no counted position
    return mask


def _trl_gkd():
    pytest.importorskip("trl", reason="TRL is the oracle of the GKD losses (the [test] extra)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.gkd.gkd_trainer import GKDTrainer
    return GKDTrainer


# ------------------------------------------------------------------------------------------
# Distillation divergences


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_and_kls_equal_trl(temperature):
    """TRL's GKDTrainer.generalized_jsd_loss on the same logits and mask, beta in
    {0, 0.1, 0.5, 0.9, 1}: <= 1e-6 in float32. forward_kl / reverse_kl are its beta = 0 / 1."""
    import torch

    gkd = _trl_gkd()
    s, t, mask = _logits(0), _logits(1), _mask(2)
    labels = torch.tensor(np.where(mask > 0, 1, -100))
    for beta in BETAS:
        ref = float(
            gkd.generalized_jsd_loss(
                torch.tensor(s), torch.tensor(t), labels, beta=beta, temperature=temperature
            )
        )
        ours = float(
            L.generalized_jsd(
                jnp.asarray(s),
                jnp.asarray(t),
                beta,
                temperature=temperature,
                mask=jnp.asarray(mask),
            )
        )
        assert abs(ours - ref) <= 1e-6, (beta, ours, ref)
    fkl = L.forward_kl(
        jnp.asarray(s), jnp.asarray(t), temperature=temperature, mask=jnp.asarray(mask)
    )
    rkl = L.reverse_kl(
        jnp.asarray(s), jnp.asarray(t), temperature=temperature, mask=jnp.asarray(mask)
    )
    for value, beta in ((fkl, 0.0), (rkl, 1.0)):
        ref = float(
            gkd.generalized_jsd_loss(
                torch.tensor(s), torch.tensor(t), labels, beta=beta, temperature=temperature
            )
        )
        assert abs(float(value) - ref) <= 1e-6
    # Without a mask every position counts: TRL's labels with no -100 (its labels=None divides
    # the sum by the batch size instead, a per-sequence sum).
    every = torch.ones(mask.shape, dtype=torch.long)
    ref = float(gkd.generalized_jsd_loss(torch.tensor(s), torch.tensor(t), every, beta=0.5))
    assert abs(float(L.generalized_jsd(jnp.asarray(s), jnp.asarray(t), 0.5)) - ref) <= 1e-6


def test_jsd_closed_forms_and_the_endpoint_discontinuity():
    """The interior formula tends to 0 at both ends, like beta KL(T||S) and (1-beta) KL(S||T);
    the endpoints (TRL's) are the full KLs, so the loss jumps there (documented)."""
    with jax.enable_x64(True):
        s, t = jnp.asarray(_logits(3, dtype=np.float64)), jnp.asarray(_logits(4, dtype=np.float64))
        fkl = L.forward_kl_per_position(s, t)
        rkl = L.reverse_kl_per_position(s, t)
        eps = 1e-6
        near0 = L.generalized_jsd_per_position(s, t, eps)
        near1 = L.generalized_jsd_per_position(s, t, 1 - eps)
        np.testing.assert_allclose(near0 / eps, fkl, rtol=1e-4)
        np.testing.assert_allclose(near1 / eps, rkl, rtol=1e-4)
        np.testing.assert_allclose(L.generalized_jsd_per_position(s, t, 0.0), fkl, rtol=1e-12)
        np.testing.assert_allclose(L.generalized_jsd_per_position(s, t, 1.0), rkl, rtol=1e-12)
        half = L.generalized_jsd_per_position(s, t, 0.5)
        np.testing.assert_allclose(half, L.generalized_jsd_per_position(t, s, 0.5), rtol=1e-12)
        assert bool(jnp.all(half <= math.log(2))) and bool(jnp.all(half > 0))
        assert float(jnp.max(jnp.abs(L.generalized_jsd_per_position(s, s, 0.3)))) < 1e-14


def test_temperature_divides_both_logits():
    s, t = jnp.asarray(_logits(5)), jnp.asarray(_logits(6))
    for beta in (0.0, 0.4, 1.0):
        np.testing.assert_allclose(
            L.generalized_jsd(s, t, beta, temperature=2.5),
            L.generalized_jsd(s / 2.5, t / 2.5, beta),
            rtol=1e-6,
        )


def test_gradients_equal_the_closed_forms():
    """d/d student logits (reference doc 1.1): forward KL p_S - p_T; reverse KL
    p_S (log p_S - log p_T - KL); JSD(beta) (1-beta) p_S (log p_S - log M - KL(p_S||M)).
    The reverse-KL gradient sums to 0 over the vocabulary."""
    with jax.enable_x64(True):
        s = jnp.asarray(_logits(7, (4, 19), dtype=np.float64))
        t = jnp.asarray(_logits(8, (4, 19), dtype=np.float64))
        ls, lt = jax.nn.log_softmax(s), jax.nn.log_softmax(t)
        ps, pt = jnp.exp(ls), jnp.exp(lt)

        def grad(fn):
            return jax.grad(lambda x: jnp.sum(fn(x)))(s)

        np.testing.assert_allclose(
            grad(lambda x: L.forward_kl_per_position(x, t)), ps - pt, atol=1e-14
        )
        kl = jnp.sum(ps * (ls - lt), -1, keepdims=True)
        g_rkl = grad(lambda x: L.reverse_kl_per_position(x, t))
        np.testing.assert_allclose(g_rkl, ps * (ls - lt - kl), atol=1e-14)
        np.testing.assert_allclose(jnp.sum(g_rkl, -1), 0.0, atol=1e-14)
        for beta in (0.1, 0.5, 0.9):
            lm = jnp.log(beta * pt + (1 - beta) * ps)
            kl_m = jnp.sum(ps * (ls - lm), -1, keepdims=True)
            np.testing.assert_allclose(
                grad(lambda x, b=beta: L.generalized_jsd_per_position(x, t, b)),
                (1 - beta) * ps * (ls - lm - kl_m),
                atol=1e-14,
            )
        # Temperature tau: the same forms at tau, times 1 / tau.
        tau = 2.0
        ps2, pt2 = jax.nn.softmax(s / tau), jax.nn.softmax(t / tau)
        np.testing.assert_allclose(
            grad(lambda x: L.forward_kl_per_position(x, t, temperature=tau)),
            (ps2 - pt2) / tau,
            atol=1e-14,
        )
        # No gradient reaches the teacher through a Divergence.
        g_t = jax.grad(lambda y: jnp.sum(L.Divergence("jsd", 0.5).per_position(s, y)))(t)
        assert float(jnp.max(jnp.abs(g_t))) == 0.0


def test_reductions():
    values = jnp.asarray(np.random.default_rng(9).random((3, 5)), jnp.float32)
    mask = jnp.asarray(_mask(10))
    total, count = L.reduction_sums(values, mask, "token-mean")
    assert float(count) == float(mask.sum())
    np.testing.assert_allclose(total, jnp.sum(values * mask), rtol=1e-6)
    total, count = L.reduction_sums(values, mask, "sequence-mean")
    lengths = np.asarray(mask).sum(-1)
    expected = sum(
        (np.asarray(values) * np.asarray(mask))[i].sum() / lengths[i]
        for i in range(3)
        if lengths[i] > 0
    )
    assert float(count) == float((lengths > 0).sum())
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    assert float(L.reduce_mean(values, jnp.zeros_like(mask))) == 0.0  # never 0 / 0
    with pytest.raises(ConfigError, match="reduction"):
        L.reduce_mean(values, mask, "batchmean")


# ------------------------------------------------------------------------------------------
# Sampled top-K targets (Gemma 3)


def test_sampled_topk_targets():
    logits = jnp.asarray(_logits(11, (6, 50), scale=1.5))
    ids, probs = L.sample_topk_targets(jax.random.PRNGKey(0), logits, 16)
    assert ids.shape == probs.shape == (6, 16) and ids.dtype == jnp.int32
    np.testing.assert_allclose(jnp.sum(probs, -1), 1.0, rtol=1e-6)
    pt = np.asarray(jax.nn.softmax(logits))
    for row in range(6):
        i, p = np.asarray(ids[row]), np.asarray(probs[row])
        assert np.all(np.diff(i) >= 0)  # ascending
        unique = np.concatenate([[True], i[1:] != i[:-1]])
        assert np.all(p[~unique] == 0)  # a repeated id counts once
        kept = i[unique]
        np.testing.assert_allclose(p[unique], pt[row, kept] / pt[row, kept].sum(), rtol=1e-5)
    # The loss: cross-entropy against the renormalised target, full-vocabulary log-probs.
    student = jnp.asarray(_logits(12, (6, 50)))
    ls = np.asarray(jax.nn.log_softmax(student))
    expected = -np.sum(np.asarray(probs) * np.take_along_axis(ls, np.asarray(ids), -1), -1)
    np.testing.assert_allclose(
        L.sampled_topk_kd_per_position(student, ids, probs), expected, rtol=1e-6
    )
    # Draw frequencies: P(id drawn at least once in K) = 1 - (1 - p)^K, over 4000 positions.
    many = jnp.broadcast_to(logits[0], (4000, 50))
    ids, probs = L.sample_topk_targets(jax.random.PRNGKey(1), many, 4)
    drawn = np.zeros(50)
    for i, p in zip(np.asarray(ids), np.asarray(probs)):
        drawn[i[p > 0]] += 1
    expected = 1 - (1 - pt[0]) ** 4
    assert np.max(np.abs(drawn / 4000 - expected)) < 4 * 0.5 / np.sqrt(4000)  # 4 sigma
    with pytest.raises(ConfigError, match="K must be an integer >= 1"):
        L.sample_topk_targets(jax.random.PRNGKey(0), logits, 0)


# ------------------------------------------------------------------------------------------
# Alpha-divergence losses (2501.18537)


def test_f_softargmax_equals_entmax_and_sparsemax():
    torch = pytest.importorskip("torch", reason="entmax is a torch library")
    entmax = pytest.importorskip("entmax", reason="entmax is the oracle of alpha = 1.5")
    x = _logits(13, (8, 23), dtype=np.float64)
    with jax.enable_x64(True):
        xj = jnp.asarray(x)
        np.testing.assert_allclose(
            L.f_softargmax(xj, 1.5), entmax.entmax15(torch.tensor(x), dim=-1).numpy(), atol=1e-12
        )
        np.testing.assert_allclose(
            L.f_softargmax(xj, 2.0), entmax.sparsemax(torch.tensor(x), dim=-1).numpy(), atol=1e-12
        )
        np.testing.assert_allclose(
            L.f_softargmax(xj, 1.3),
            entmax.entmax_bisect(torch.tensor(x), alpha=1.3, n_iter=80).numpy(),
            atol=1e-10,
        )
        np.testing.assert_allclose(L.f_softargmax(xj, 1.0), jax.nn.softmax(xj), atol=1e-15)
        # The implicit Jacobian against entmax's autograd (vector-Jacobian products).
        v = np.random.default_rng(14).normal(size=x.shape)
        xt = torch.tensor(x, requires_grad=True)
        (entmax.entmax15(xt, dim=-1) * torch.tensor(v)).sum().backward()
        ours = jax.grad(lambda z: jnp.sum(L.f_softargmax(z, 1.5) * v))(xj)
        np.testing.assert_allclose(ours, xt.grad.numpy(), atol=1e-10)
    # float32 (the training dtype) agrees to float32 precision.
    np.testing.assert_allclose(
        L.f_softargmax(jnp.asarray(x, jnp.float32), 1.5),
        entmax.entmax15(torch.tensor(x), dim=-1).numpy(),
        atol=2e-6,
    )


def test_f_divergence_losses_equal_entmax_and_optax():
    torch = pytest.importorskip("torch", reason="entmax is a torch library")
    entmax = pytest.importorskip("entmax", reason="entmax is the oracle of alpha = 1.5")
    import optax

    x = _logits(15, (8, 23), dtype=np.float64)
    y = np.random.default_rng(16).integers(0, 23, 8)
    with jax.enable_x64(True):
        xj, yj = jnp.asarray(x), jnp.asarray(y)
        ref15 = entmax.Entmax15Loss(reduction="none")(torch.tensor(x), torch.tensor(y))
        np.testing.assert_allclose(
            L.f_divergence_loss_per_position(xj, yj, 1.5), ref15.numpy(), atol=1e-12
        )
        np.testing.assert_allclose(
            L.f_divergence_loss_per_position(xj, yj, 2.0),
            optax.losses.multiclass_sparsemax_loss(xj, yj),
            atol=1e-12,
        )
        ref13 = entmax.EntmaxBisectLoss(alpha=1.3, n_iter=80, reduction="none")(
            torch.tensor(x), torch.tensor(y)
        )
        np.testing.assert_allclose(
            L.f_divergence_loss_per_position(xj, yj, 1.3), ref13.numpy(), atol=1e-10
        )
        np.testing.assert_allclose(
            L.f_divergence_loss_per_position(xj, yj, 1.0),
            optax.softmax_cross_entropy_with_integer_labels(xj, yj),
            atol=1e-12,
        )
        # Soft targets (distillation): >= 0, 0 at y = f_softargmax(theta), gradient p* - y.
        teacher = jax.nn.softmax(jnp.asarray(_logits(17, (8, 23), dtype=np.float64)))
        for alpha in (1.0, 1.5, 2.0):
            loss = L.f_divergence_loss_per_position(xj, teacher, alpha)
            assert bool(jnp.all(loss >= -1e-12))
            own = L.f_softargmax(xj, alpha)
            np.testing.assert_allclose(
                L.f_divergence_loss_per_position(xj, own, alpha), 0.0, atol=1e-12
            )
            g = jax.grad(
                lambda z, a=alpha: jnp.sum(L.f_divergence_loss_per_position(z, teacher, a))
            )(xj)
            np.testing.assert_allclose(g, own - teacher, atol=1e-12)
        # alpha = 1 with soft targets is KL(y || softmax) (= forward KL with the same logits).
        np.testing.assert_allclose(
            L.f_divergence_loss_per_position(xj, teacher, 1.0),
            L.forward_kl_per_position(xj, jnp.log(teacher)),
            atol=1e-12,
        )
    with pytest.raises(ConfigError, match="alpha >= 1"):
        L.f_softargmax(jnp.asarray(x), 0.5)


# ------------------------------------------------------------------------------------------
# Preferences


def test_dpo_closed_forms():
    rng = np.random.default_rng(18)
    pc, pr, rc, rr = (jnp.asarray(rng.normal(-20, 5, 6), jnp.float32) for _ in range(4))
    beta = 0.1
    # Policy = reference: log 2 exactly, for any label smoothing.
    for eps in (0.0, 0.2):
        assert (
            abs(float(L.dpo_loss(rc, rr, rc, rr, beta, label_smoothing=eps)) - math.log(2)) < 1e-7
        )
    delta = beta * ((pc - rc) - (pr - rr))
    np.testing.assert_allclose(L.dpo_logits(pc, pr, rc, rr, beta), delta, rtol=1e-6)
    # d loss / d log pi(y_w) = -beta sigmoid(-Delta) / B (mean over B), and the opposite for y_l.
    g_c, g_r = jax.grad(lambda a, b: L.dpo_loss(a, b, rc, rr, beta), argnums=(0, 1))(pc, pr)
    np.testing.assert_allclose(g_c, -beta * jax.nn.sigmoid(-delta) / 6, rtol=1e-5)
    np.testing.assert_allclose(g_r, beta * jax.nn.sigmoid(-delta) / 6, rtol=1e-5)
    # Swapping chosen and rejected flips the sign of the margin.
    np.testing.assert_allclose(L.dpo_logits(pr, pc, rr, rc, beta), -delta, rtol=1e-6)
    m, m_swapped = L.dpo_metrics(pc, pr, rc, rr, beta), L.dpo_metrics(pr, pc, rr, rc, beta)
    np.testing.assert_allclose(m_swapped["margin"], -m["margin"], rtol=1e-6)
    np.testing.assert_allclose(m["margin"], jnp.mean(delta), rtol=1e-5)
    np.testing.assert_allclose(m["accuracy"], jnp.mean(delta > 0))
    np.testing.assert_allclose(m["rewards_chosen"], beta * jnp.mean(pc - rc), rtol=1e-5)
    # Label smoothing (TRL's "sigmoid"): -(1 - eps) log s(D) - eps log s(-D).
    np.testing.assert_allclose(
        L.dpo_losses(pc, pr, rc, rr, beta, label_smoothing=0.1),
        -0.9 * jax.nn.log_sigmoid(delta) - 0.1 * jax.nn.log_sigmoid(-delta),
        rtol=1e-6,
    )
    # IPO (TRL: log-ratios divided by completion lengths).
    lc, lr = jnp.asarray([3, 5, 7, 2, 4, 6]), jnp.asarray([4, 4, 1, 9, 2, 3])
    h = (pc - rc) / lc - (pr - rr) / lr
    np.testing.assert_allclose(
        L.ipo_losses(pc, pr, rc, rr, beta, chosen_lengths=lc, rejected_lengths=lr),
        (h - 1 / (2 * beta)) ** 2,
        rtol=1e-5,
    )
    with pytest.raises(ConfigError, match="beta must be > 0"):
        L.dpo_loss(pc, pr, rc, rr, 0.0)


def test_bradley_terry():
    r = jnp.asarray([0.3, -1.2, 2.0])
    assert abs(float(L.bradley_terry_loss(r, r)) - math.log(2)) < 1e-7
    c, j = jnp.asarray([1.0, 2.0, 0.5]), jnp.asarray([0.0, 2.5, 0.5])
    margin = jnp.asarray([0.5, 0.0, 1.0])
    np.testing.assert_allclose(
        L.bradley_terry_loss(c, j, margin=margin),
        jnp.mean(-jax.nn.log_sigmoid(c - j - margin)),
        rtol=1e-6,
    )
    np.testing.assert_allclose(L.reward_centering(c, j), jnp.mean((c + j) ** 2), rtol=1e-6)
    assert float(L.pairwise_accuracy(c, j)) == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------------------
# Policy gradient


def test_rloo_and_reinforce_advantages():
    r = jnp.asarray(np.random.default_rng(19).normal(size=(5, 4)), jnp.float32)
    a = L.rloo_advantages(r)
    loo = np.stack(
        [np.asarray(r)[:, i] - np.delete(np.asarray(r), i, 1).mean(1) for i in range(4)], 1
    )
    np.testing.assert_allclose(a, loo, atol=1e-6)
    np.testing.assert_allclose(a, 4 / 3 * (r - r.mean(1, keepdims=True)), atol=1e-6)
    assert float(jnp.max(jnp.abs(L.rloo_advantages(jnp.full((3, 4), 0.7))))) == 0.0
    with pytest.raises(ConfigError, match="k >= 2"):
        L.rloo_advantages(jnp.ones((3, 1)))
    np.testing.assert_allclose(
        L.reinforce_advantages(r, baseline="group"), r - r.mean(1, keepdims=True), atol=1e-6
    )
    np.testing.assert_allclose(L.reinforce_advantages(r), r - r.mean(), atol=1e-6)
    np.testing.assert_allclose(L.reinforce_advantages(r, baseline="none"), r)


def test_kl_estimators_are_unbiased():
    """E over tokens drawn from pi of k1 and k3 equals KL(pi || ref) exactly; k3 >= 0."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(20)
        pi = jax.nn.softmax(jnp.asarray(rng.normal(size=9)))
        ref = jax.nn.softmax(jnp.asarray(rng.normal(size=9)))
        kl = float(jnp.sum(pi * jnp.log(pi / ref)))
        for name in ("k1", "k3"):
            est = L.kl_estimate(jnp.log(pi), jnp.log(ref), name)
            assert abs(float(jnp.sum(pi * est)) - kl) < 1e-14
        assert bool(jnp.all(L.kl_estimate(jnp.log(pi), jnp.log(ref), "k3") >= 0))
        k2 = float(jnp.sum(pi * L.kl_estimate(jnp.log(pi), jnp.log(ref), "k2")))
        assert abs(k2 - kl) > 1e-3  # biased: not a check that can pass by accident
    logps, refs = jnp.asarray([[-1.0, -2.0, -3.0]]), jnp.asarray([[-1.5, -2.0, -2.0]])
    mask = jnp.asarray([[1.0, 1.0, 0.0]])
    np.testing.assert_allclose(
        L.kl_penalised_rewards(jnp.asarray([1.0]), logps, refs, 0.1, mask=mask),
        [1.0 - 0.1 * 0.5],
        rtol=1e-6,
    )


def test_policy_gradient_loss():
    rng = np.random.default_rng(21)
    logps = jnp.asarray(-rng.random((3, 6)) * 3, jnp.float32)
    adv = jnp.asarray([0.5, -1.0, 2.0])
    mask = jnp.asarray(
        np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]]), jnp.float32
    )
    total, count, metrics = L.policy_gradient_loss(logps, adv, mask)
    assert float(count) == 9.0
    np.testing.assert_allclose(total, -jnp.sum(adv[:, None] * logps * mask), rtol=1e-6)
    np.testing.assert_allclose(metrics["pg_loss"], total / 9.0, rtol=1e-6)
    g = jax.grad(lambda x: L.policy_gradient_loss(x, adv, mask)[0])(logps)
    np.testing.assert_allclose(g, -adv[:, None] * mask)  # the weighted cross-entropy's
    assert float(L.policy_gradient_loss(logps, adv, mask, normaliser="sequences")[1]) == 2.0
    # PPO-style: at ratio 1 the gradient is REINFORCE's, clipped or not, per token or sequence.
    for level in ("token", "sequence"):
        g1 = jax.grad(
            lambda x, lv=level: L.policy_gradient_loss(
                x, adv, mask, behaviour_logps=logps, clip_epsilon=0.2, ratio_level=lv
            )[0]
        )(logps)
        np.testing.assert_allclose(g1, g, rtol=1e-6)
    # Outside the trust region in the advantage's direction the gradient stops.
    old = logps - jnp.asarray([[0.5], [-0.5], [0.0]])  # ratio e^0.5 (A > 0), e^-0.5 (A < 0)
    _, _, m = L.policy_gradient_loss(logps, adv, mask, behaviour_logps=old, clip_epsilon=0.2)
    g2 = jax.grad(
        lambda x: L.policy_gradient_loss(x, adv, mask, behaviour_logps=old, clip_epsilon=0.2)[0]
    )(logps)
    assert float(jnp.max(jnp.abs(g2[:2]))) == 0.0 and float(m["clip_fraction"]) == 1.0
    # A KL term in the loss (k3): d/d log pi = 1 - exp(log ref - log pi).
    ref = logps - 0.3
    g3 = jax.grad(
        lambda x: L.policy_gradient_loss(x, jnp.zeros(3), mask, ref_logps=ref, kl_coef=0.5)[0]
    )(logps)
    np.testing.assert_allclose(g3, 0.5 * (1 - jnp.exp(ref - logps)) * mask, rtol=1e-5)
    with pytest.raises(ConfigError, match="behaviour_logps"):
        L.policy_gradient_loss(logps, adv, mask, clip_epsilon=0.2)


# ------------------------------------------------------------------------------------------
# BOND


def test_best_of_n_distribution_matches_monte_carlo_with_ties():
    """Theorem 1 against 400k simulated Best-of-3 draws (ties to the first): within 4 standard
    errors (<= 3e-3) on every support point."""
    probs = np.array([0.1, 0.25, 0.15, 0.3, 0.2])
    rewards = np.array([1.0, 2.0, 2.0, 3.0, 1.0])  # two ties
    n, trials = 3, 400_000
    rng = np.random.default_rng(22)
    draws = rng.choice(5, size=(trials, n), p=probs)
    picked = draws[np.arange(trials), np.argmax(rewards[draws], axis=1)]
    freq = np.bincount(picked, minlength=5) / trials
    theory = np.asarray(L.best_of_n_distribution(jnp.asarray(probs), jnp.asarray(rewards), n))
    assert abs(theory.sum() - 1) < 1e-6
    assert np.max(np.abs(freq - theory)) < 4 * np.sqrt(0.25 / trials)
    # Closed form by levels: the best reward is at most r with probability p<=^N, so the level
    # of r(y) wins with p<=^N - p<^N, shared in proportion to pi_ref (ties or not).
    for r, n in ((rewards, 3), (np.array([0.1, 0.7, 0.3, 0.9, 0.5]), 4)):
        le = np.array([probs[r <= v].sum() for v in r])
        lt = np.array([probs[r < v].sum() for v in r])
        level = np.array([probs[r == v].sum() for v in r])
        np.testing.assert_allclose(
            L.best_of_n_distribution(jnp.asarray(probs), jnp.asarray(r), n),
            probs / level * (le**n - lt**n),
            rtol=1e-5,
        )


def test_best_of_n_kl_bound():
    """KL(BoN || ref) <= log N - (N-1)/N, and approaches it with many distinct rewards."""
    rng = np.random.default_rng(23)
    for n, bound in ((2, 0.1931), (4, 0.6363), (8, 1.2044)):
        assert L.best_of_n_kl_bound(n) == pytest.approx(bound, abs=1e-4)
        for ties in (False, True):
            p = rng.dirichlet(np.ones(12))
            r = rng.integers(0, 4, 12).astype(float) if ties else rng.normal(size=12)
            bon = np.asarray(L.best_of_n_distribution(jnp.asarray(p), jnp.asarray(r), n))
            kl = float(np.sum(bon * np.log(bon / p)))
            assert 0 <= kl <= L.best_of_n_kl_bound(n) + 1e-6
        flat = np.full(2000, 1 / 2000)
        bon = np.asarray(L.best_of_n_distribution(jnp.asarray(flat), jnp.arange(2000.0), n))
        kl = float(np.sum(bon * np.log(bon / flat)))
        assert L.best_of_n_kl_bound(n) - 0.01 < kl <= L.best_of_n_kl_bound(n) + 1e-6


def test_quantile_estimator_is_unbiased():
    """Exact expectation over every draw of k = 3 anchor samples from a support with ties."""
    probs = np.array([0.2, 0.3, 0.1, 0.4])
    rewards = np.array([0.0, 1.0, 1.0, 2.0])
    k = 3
    combos = np.array(list(itertools.product(range(4), repeat=k)))  # [64, 3]
    weights = np.prod(probs[combos], axis=1)
    for y in range(4):
        est = L.quantile_estimate(jnp.full(len(combos), rewards[y]), jnp.asarray(rewards[combos]))
        expected = float(np.sum(weights * np.asarray(est)))
        assert abs(expected - probs[rewards <= rewards[y]].sum()) < 1e-6
    smoothed = L.quantile_estimate(
        jnp.asarray([0.0]), jnp.asarray([[1.0, 2.0]]), smoothing="laplace"
    )
    assert float(smoothed[0]) == pytest.approx(1 / 4)
    np.testing.assert_allclose(
        L.quantile_reward(jnp.asarray([0.0]), jnp.asarray([[1.0, 2.0]]), 4),
        [3 * math.log(1 / 4)],
        rtol=1e-6,
    )


def test_jbond_reward_and_jeffreys():
    policy = jnp.asarray([0.0, 1.5, 3.0, 1.0])
    anchors = jnp.asarray([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [1.0, 1.0]])
    np.testing.assert_allclose(L.jbond_reward(policy, anchors), [-math.log(16), 0, 0, 0])
    np.testing.assert_allclose(
        L.jbond_reward(policy, anchors, kind="quantile"),
        np.log([1 / 4, 2 / 4, 3 / 4, 3 / 4]),
        rtol=1e-6,
    )
    assert L.jeffreys_weights(0.5) == (0.5, 0.5)
    assert float(L.jeffreys_loss(jnp.asarray(2.0), jnp.asarray(4.0), 0.25)) == 2.5
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        L.jeffreys_weights(1.5)
    with pytest.raises(ConfigError, match="2 anchor samples"):
        L.jbond_reward(policy, jnp.ones((4, 3)))


def test_kl_regularised_optimum():
    """pi* = ref exp(r / beta) / Z is stationary and beats perturbations of itself."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(24)
        ref = jax.nn.softmax(jnp.asarray(rng.normal(size=7)))
        r = jnp.asarray(rng.normal(size=7))
        beta = 0.3
        star = L.kl_regularised_optimum(ref, r, beta)

        def objective(p):
            return float(jnp.sum(p * r) - beta * jnp.sum(p * jnp.log(p / ref)))

        gap = jnp.log(star) - jnp.log(ref) - r / beta
        assert float(jnp.max(gap) - jnp.min(gap)) < 1e-12
        for _ in range(20):
            other = jax.nn.softmax(jnp.log(star) + 0.1 * jnp.asarray(rng.normal(size=7)))
            assert objective(other) < objective(star)
    with pytest.raises(ConfigError, match="beta must be > 0"):
        L.kl_regularised_optimum(ref, r, -0.1)


def test_bad_settings_give_one_clear_error():
    s = jnp.zeros((2, 5))
    for beta in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match=r"beta must lie in \[0, 1\]"):
            L.generalized_jsd(s, s, beta)
    with pytest.raises(ConfigError, match="unknown divergence"):
        L.Divergence("tvd")
    with pytest.raises(ConfigError, match="temperature"):
        L.Divergence("jsd", temperature=0.0)
    with pytest.raises(ConfigError, match="N of Best-of-N"):
        L.best_of_n_distribution(jnp.ones(3) / 3, jnp.arange(3.0), 0)
    with pytest.raises(ConfigError, match="Python number"):
        jax.jit(lambda b: L.generalized_jsd(s, s, b))(0.5)
