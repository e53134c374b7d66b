"""KL-regularised RL and BOND (gemma_kit.posttrain.rl) on tiny random models: the known optima
of a one-token bandit reached by RLOO and BOND, the pieces of a step against their definitions,
resume after SIGKILL bit-identical (the EMA anchor and a reused batch of rollouts included), an
8-device mesh step against one device, and one clear error per bad input.

Elsewhere, not repeated here: RLOO advantages = k / (k - 1) (r - mean r), zero advantages for
equal rewards, the policy-gradient loss and its clipping (test_posttrain_losses.py); a
signed-weight step equals the weighted cross-entropy step, zero advantages give exactly zero
update (test_training.py); rollout log-probs against a teacher-forced forward pass, no recompile
after Sampler.update_params (test_rollout.py); the Best-of-N distribution against Monte Carlo and
the quantile estimator's unbiasedness (test_posttrain_losses.py).
"""

from __future__ import annotations

import hashlib
import json
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("optax", reason="RL needs the [finetune] extra")
from gemma_kit.errors import ConfigError, DataError, RewardError  # noqa: E402
from gemma_kit.posttrain import losses  # noqa: E402
from gemma_kit.posttrain.rl import PolicyLoss, train_rl  # noqa: E402
from gemma_kit.posttrain.rl_config import RLConfig  # noqa: E402
from tests.support import rl_worker as worker  # noqa: E402  (after the skip: it imports gemma_kit.training)
from tests.support import workers  # noqa: E402

WORKER = "rl_worker"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The children's environment: one JAX compilation cache for all children of this file."""
    return workers.cpu_env(cache=tmp_path_factory.mktemp("jax-cache"))


@pytest.fixture(scope="module")
def tiny():
    return worker.tiny_model()


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return worker.write_prompts(tmp_path_factory.mktemp("prompts") / "prompts.jsonl")


# --------------------------------------------------------------------------------------------
# The one-token bandit: a fixed prompt, completions of one token, a reward per token


BANDIT_PROMPT = "for x in range"


def _text_value(text: str) -> float:
    """A reward in [0, 1) per completion text, fixed by its hash (no structure to exploit)."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 2**32


def _bandit(tiny, tmp_path):
    """(reward function, per-token rewards r [V], the model's exact pi(. | prompt) function)."""
    model, tokenizer = tiny
    texts = [tokenizer.decode([t]) for t in range(tokenizer.vocab_size)]
    r = np.array([_text_value(t) for t in texts])  # tokens of one text share its reward

    def reward(prompts, completions):
        return [_text_value(c) for c in completions]

    ids = jnp.asarray([tokenizer.encode(BANDIT_PROMPT)])

    def distribution(m) -> np.ndarray:
        return np.asarray(jax.nn.softmax(m(ids)[0, -1].astype(jnp.float32)), np.float64)

    path = tmp_path / "bandit.jsonl"
    path.write_text(json.dumps({"prompt": BANDIT_PROMPT}) + "\n")
    return reward, r, distribution, path


def _bandit_config(path, out, **changes) -> RLConfig:
    # Full fine-tuning: with LoRA the logits stay in the span of the frozen embedding, which
    # cannot hold an arbitrary target distribution over the vocabulary.
    settings = dict(
        prompts_file=str(path),
        out_dir=str(out),
        method="full",
        batch_size=1,
        num_samples=32,
        max_new_tokens=1,
        stop_token_ids=(),
        learning_rate=1e-2,
        warmup_steps=0,
        eval_fraction=0.0,
        save_every=10**6,
        max_length=32,
        progress=False,
    )
    return RLConfig(**{**settings, **changes})


def _tv(p: np.ndarray, q: np.ndarray) -> float:
    return float(0.5 * np.abs(p - q).sum())


def test_rloo_with_a_fixed_reference_reaches_the_kl_regularised_optimum(tiny, tmp_path):
    """RLOO (k = 32, beta = 0.25, k1 in the reward, the reference = the initial model) on the
    one-token bandit ends within total variation 0.08 of pi* = pi_ref exp(r / beta) / Z
    (losses.kl_regularised_optimum), having moved from pi_ref, 0.43 away.

    The bound: 200 steps reach TV 0.029 and 0.032 (two runs measured on the shared 2-core CPU);
    what is left is the stationary noise of Adam on sampled gradients (at lr 1e-3 by the end of
    the cosine), not a bias. A sign error, a missing KL term or a wrong baseline lands far
    outside it: beta -> 0 would give the argmax (TV ~0.9 from pi*).
    """
    reward, r, distribution, path = _bandit(tiny, tmp_path)
    model, tokenizer = tiny
    beta = 0.25
    ref = distribution(model)
    target = np.asarray(losses.kl_regularised_optimum(jnp.asarray(ref), jnp.asarray(r), beta))
    assert _tv(ref, target) > 0.35
    config = _bandit_config(path, tmp_path / "rloo", algo="rloo", kl_coef=beta, steps=200)
    result = train_rl(config, reward=reward, model=model, tokenizer=tokenizer)
    pi = distribution(result.model)
    assert _tv(pi, target) <= 0.08, (_tv(pi, target), _tv(ref, target))
    rows = workers.read_jsonl(tmp_path / "rloo" / "metrics.jsonl")
    assert rows[0]["kl"] == 0.0  # the first rollouts come from the reference itself
    # The exact KL metric measures what the policy did: KL(pi || pi_ref) at the one state.
    kl = float(np.sum(pi * (np.log(pi) - np.log(ref))))
    assert abs(np.mean([row["kl"] for row in rows[-20:]]) - kl) < 0.1 * kl


def test_bond_reaches_the_best_of_n_distribution(tiny, tmp_path):
    """BOND (N = 4, the anchor = the initial model, Jeffreys beta 0.5: 32 policy samples and 32
    Best-of-4 samples from 128 anchor samples per step) on the one-token bandit ends within total
    variation 0.15 of the Best-of-4 distribution of BOND's Theorem 1
    (losses.best_of_n_distribution), 0.47 from pi_ref.

    Measured: 0.065 after 200 steps. The bound is wider than RLOO's because both parts are
    noisier: the forward part is maximum likelihood of 32 samples a step (200 x 32 samples of a
    384-way distribution are themselves ~0.1 from it in TV), and the backward reward uses p<=
    estimated from 128 anchor samples (Laplace-smoothed). Forward only measured 0.096, backward
    only 0.097.
    """
    reward, r, distribution, path = _bandit(tiny, tmp_path)
    model, tokenizer = tiny
    ref = distribution(model)
    target = np.asarray(losses.best_of_n_distribution(jnp.asarray(ref), jnp.asarray(r), 4))
    assert _tv(ref, target) > 0.4
    config = _bandit_config(
        path,
        tmp_path / "bond",
        algo="bond",
        best_of=4,
        anchor_samples=128,
        jeffreys_beta=0.5,
        steps=200,
        min_lr_fraction=0.01,
    )
    result = train_rl(config, reward=reward, model=model, tokenizer=tokenizer)
    pi = distribution(result.model)
    assert _tv(pi, target) <= 0.15, (_tv(pi, target), _tv(ref, target))
    rows = workers.read_jsonl(tmp_path / "bond" / "metrics.jsonl")
    # Best-of-4 samples of the anchor score above its plain samples, by the expected margin.
    best = np.mean([row["best_of_reward"] for row in rows])
    expected = float(np.sum(target * r))
    assert abs(best - expected) < 0.02 and best > np.mean([row["anchor_reward"] for row in rows])


# --------------------------------------------------------------------------------------------
# The pieces of a step


def test_policy_loss_without_ratio_is_the_signed_cross_entropy_step(tiny):
    """PolicyLoss (policy_gradient_loss at the rows' completion positions) is the core's
    SignedCrossEntropy (every position) when nothing else enters: the same loss and gradient
    norm (1e-6 relative: the same sums through different chunked log-prob code) and parameters
    after a first Adam step within 1e-3 of the learning rate (that step moves each entry by ~lr *
    sign(g), so a gradient entry at the f32 rounding level may move differently; observed
    3.6e-8), so the RL step inherits test_training's proof that it equals the weighted
    cross-entropy step."""
    from gemma_kit.lora import apply_lora
    from gemma_kit.training import SignedCrossEntropy, Trainer, micro_batches
    from tests.support import training_worker as toy

    model, _ = tiny
    from gemma_kit.posttrain.rl import gather_completions

    plain = toy.completion_rows(5, 8, 24, 384)
    rows = gather_completions(dict(plain, mask=(plain["weights"] != 0).astype(np.float32)), 24)
    config = toy.step_config(grad_accum=2)
    from flax import nnx

    lora_model = nnx.merge(*nnx.split(model))
    apply_lora(lora_model, rank=2, alpha=4.0, seed=1)
    results = []
    for loss, batch in ((PolicyLoss(chunk=64), rows), (SignedCrossEntropy(chunk=64), plain)):
        trainer = Trainer(config, lora_model, 10, loss)
        m = trainer.step(trainer.place(micro_batches(batch, 2), batch_axis=1))
        results.append((m, [np.asarray(x) for x in jax.tree.leaves(trainer.trainable)]))
    (a, pa), (b, pb) = results
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-6)
    assert a["normaliser"] == b["normaliser"]
    for x, y in zip(pa, pb, strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-3 * config.learning_rate)


def test_a_run_with_an_ema_anchor_and_ppo_epochs(tiny, prompts, tmp_path):
    """RLOO with an EMA anchor, k3 in the loss and 2 clipped epochs per batch of rollouts: the
    metrics, plots and samples a run writes, the exact KL starting at 0, the ratio exactly 1 at
    each batch's first epoch and moving at its second, the anchor between the reference and the
    policy, and an equal reward for every sample leaving the parameters unchanged."""
    model, tokenizer = tiny
    out = tmp_path / "run"
    config = RLConfig(
        prompts_file=str(prompts),
        out_dir=str(out),
        steps=4,
        batch_size=2,
        num_samples=2,
        max_new_tokens=6,
        learning_rate=2e-2,
        warmup_steps=0,
        eval_fraction=0.25,
        eval_every=2,
        progress=False,
        anchor="ema",
        ema_rate=0.5,
        kl_penalty="loss",
        kl_coef=0.1,
        ppo_epochs=2,
        clip_epsilon=0.2,
        max_length=32,
        seed=1,
    )
    result = train_rl(config, reward=worker.letter_reward, model=model, tokenizer=tokenizer)
    rows = workers.read_jsonl(out / "metrics.jsonl")
    steps = [row for row in rows if "loss" in row]
    evals = [row for row in rows if "eval_reward" in row]
    assert [row["step"] for row in steps] == [1, 2, 3, 4]
    assert [row["step"] for row in evals] == [0, 2, 4]
    first, second = steps[0], steps[1]
    assert {
        "reward_mean",
        "reward_std",
        "kl",
        "kl_anchor",
        "kl_k1",
        "entropy",
        "length",
        "stop_rate",
        "rollout_s",
        "kl_k3",
        "ratio",
        "clip_fraction",
    } <= set(first)
    assert "reward_mean" not in second  # the second epoch reuses the first's rollouts
    # At the first step policy, reference and anchor are one network, so every KL is 0 up to
    # float32 rounding: each network's log-normalisers are computed in their own XLA fusions,
    # which may reduce over the vocabulary in different orders (measured: 5.5e-8 nats for the
    # exact KL, 3.9e-9 for the sampled k1 sum).
    for name in ("kl", "kl_anchor", "kl_k1"):
        assert abs(first[name]) < 1e-6, (name, first[name])
    # pi / pi_old at a batch's first epoch: the same log-probs from two compiled programs.
    assert abs(first["ratio"] - 1.0) < 1e-6 and first["clip_fraction"] == 0.0
    assert abs(second["ratio"] - 1.0) > 1e-4
    assert steps[2]["kl"] > 0 and steps[2]["kl_anchor"] < steps[2]["kl"]
    assert abs(evals[0]["eval_kl"]) < 1e-6 and evals[-1]["eval_kl"] > 0  # 0 up to rounding
    assert result.eval_before == evals[0]["eval_reward"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rl"]["anchor_updates"] == 4 and summary["rl"]["algo"] == "rloo"
    for png in ("reward.png", "kl.png", "loss.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    samples = workers.read_jsonl(out / "samples.jsonl")
    assert {s["step"] for s in samples} == {0, 2, 4} and all("completion" in s for s in samples)

    # Equal rewards for every sample, no KL term: every advantage is 0 and nothing moves.
    flat = RLConfig(
        **dict(
            config.to_dict(),
            out_dir=str(tmp_path / "flat"),
            kl_coef=0.0,
            kl_penalty="reward",
            ppo_epochs=1,
            clip_epsilon=None,
            steps=2,
            eval_fraction=0.0,
            weight_decay=0.0,
        )
    )
    flat_result = train_rl(
        flat, reward=lambda p, c: [0.5] * len(c), model=model, tokenizer=tokenizer
    )
    from flax import nnx

    from gemma_kit.lora import LoRAParam

    after = jax.tree.leaves(nnx.state(flat_result.model, LoRAParam))
    from gemma_kit.training.model import build_model

    before = jax.tree.leaves(nnx.state(build_model(flat, model, tokenizer)[0], LoRAParam))
    for x, y in zip(after, before, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _objective(tiny, config, reward, tmp_path):
    """The objective prepared and a Trainer built, as the run loop does it."""
    from gemma_kit.posttrain.rl import PolicyOptimisation
    from gemma_kit.training.model import build_model
    from gemma_kit.training.objective import RunContext
    from gemma_kit.training.trainer import Trainer

    model, tokenizer = tiny
    objective = PolicyOptimisation(reward)
    objective.check_inputs(config)
    built, tokenizer, _ = build_model(config, model, tokenizer)
    steps = objective.prepare(RunContext(config, built, tokenizer, tmp_path, True, lambda _: None))
    return objective, Trainer(config, built, steps, objective.loss), tokenizer


@pytest.mark.parametrize("algo", ["rloo", "reinforce", "bond", "jbond"])
def test_the_rows_of_a_step_follow_the_definitions(tiny, prompts, tmp_path, algo):
    """The batch host_batch builds, against the definitions written out here in numpy from the
    rewards the reward function was called with (kl_coef = 0, so the reward is the task's):
    per-token weights = the sequence's advantage (RLOO: r - mean of the others; REINFORCE: r -
    the batch mean; BOND: Jeffreys beta x the leave-one-out advantage of (N - 1) log p<= from
    the anchor samples, Laplace-smoothed, / k; J-BOND: of -log 16 when worse than both anchor
    samples), on completion tokens only; BOND's forward rows are the best of each group of N
    anchor samples (ties to the first), weighted (1 - beta) / groups; the normaliser counts
    sequences (prompts for BOND). Weights: 1e-6 (float32)."""
    calls = []

    def reward(prompts_, completions):
        values = [float(len(c) % 5) for c in completions]  # ties on purpose
        calls.append((list(completions), values))
        return values

    k = 1 if algo == "reinforce" else 2
    extra = dict(best_of=2, anchor_samples=4) if algo == "bond" else {}
    config = RLConfig(
        prompts_file=str(prompts),
        out_dir=str(tmp_path),
        steps=2,
        batch_size=2,
        num_samples=k,
        max_new_tokens=6,
        eval_fraction=0.0,
        max_length=32,
        algo=algo,
        kl_coef=0.0,
        jeffreys_beta=0.25,
        anchor="ema",
        **extra,
    )
    objective, trainer, tokenizer = _objective(tiny, config.validate(), reward, tmp_path)
    rows = {
        name: v.reshape(-1, *v.shape[2:]) for name, v in objective.host_batch(0, trainer).items()
    }
    ((completions, values),) = calls
    P, r = 2, np.array(values)
    policy = r[: P * k]
    if algo == "rloo":
        grouped = policy.reshape(P, k)
        adv = (grouped - (grouped.sum(1, keepdims=True) - grouped) / (k - 1)).reshape(-1)
        weight, share = adv, np.ones(P * k)
    elif algo == "reinforce":
        weight, share = policy - policy.mean(), np.ones(P * k)
    else:
        M = config.resolved_anchor_samples
        anchors = r[P * k :].reshape(P, M)
        mine = np.repeat(anchors, k, axis=0)
        if algo == "bond":
            count = (mine <= policy[:, None]).sum(1)
            shaped = (config.best_of - 1) * np.log((count + 1) / (M + 2))
        else:
            shaped = np.where(policy < mine.min(1), -np.log(16.0), 0.0)
        grouped = shaped.reshape(P, k)
        adv = (grouped - (grouped.sum(1, keepdims=True) - grouped) / (k - 1)).reshape(-1)
        weight, share = 0.25 * adv / k, np.full(P * k, 1.0 / k)
    mask = rows["mask"][: P * k]
    np.testing.assert_allclose(rows["weights"][: P * k], mask * weight[:, None], atol=1e-6)
    np.testing.assert_allclose(rows["normaliser"][: P * k], share, rtol=1e-6)
    assert np.all(mask.sum(1) >= 1) and np.all(rows["weights"][: P * k][mask == 0] == 0)
    if algo in ("bond", "jbond"):
        G = config.best_of_groups
        groups = r[P * k :].reshape(P * G, config.best_of)
        best = [
            completions[P * k + g * config.best_of + int(np.argmax(groups[g]))]
            for g in range(P * G)
        ]
        forward = slice(P * k, None)
        assert rows["tokens"].shape[0] == P * k + P * G
        targets = np.take_along_axis(rows["targets"], rows["index"], axis=1)
        texts = [
            tokenizer.decode(t[m > 0].tolist())
            for t, m in zip(targets[forward], rows["mask"][forward])
        ]
        assert [t.removesuffix(tokenizer.decode([1])) for t in texts] == best
        np.testing.assert_allclose(rows["weights"][forward], 0.75 / G * rows["mask"][forward])
        assert np.all(rows["normaliser"][forward] == 0)


def test_the_scoring_pass_takes_new_anchors_without_compiling(tiny, prompts, tmp_path):
    """The reference's and the anchor's values are arguments of the compiled scoring pass: new
    anchor values give new KLs and compile nothing."""
    from gemma_kit.posttrain.policy import snapshot

    config = RLConfig(
        prompts_file=str(prompts),
        out_dir=str(tmp_path),
        steps=3,
        batch_size=2,
        num_samples=2,
        max_new_tokens=5,
        anchor="ema",
        eval_fraction=0.0,
        max_length=32,
    ).validate()
    objective, trainer, _ = _objective(tiny, config, worker.letter_reward, tmp_path)
    objective.host_batch(0, trainer)  # compiles the rollout and the scoring pass
    rows = objective.scorer.rows(
        objective.scorer.draw(
            trainer.trainable, objective.train.batch(1, 2, seed=0), 2, seed=0, step=1
        )
    )
    kls, compiles = [], []

    def listen(event, duration, **kwargs):
        if event.startswith("/jax/core/compile/"):
            compiles.append(event)

    # The factors shifted (B = 0 at the start: a scaled anchor would still be the base).
    anchors = [
        jax.tree.map(lambda x, s=shift: x + s, snapshot(trainer.trainable))
        for shift in (0.01, 0.02, 0.04)
    ]
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        for anchor in anchors:
            objective.anchor = anchor
            kls.append(float(objective.score_rows(trainer, rows)["kl_anchor"].sum()))
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert compiles == []
    assert len(set(kls)) == 3


# --------------------------------------------------------------------------------------------
# Resume and devices (child processes)


def _strip(rows: list[dict]) -> list[dict]:
    timing = ("tokens_per_s", "elapsed", "rollout_s", "reward_s", "score_s")
    return [{k: v for k, v in r.items() if k not in timing} for r in rows]


def test_resume_after_sigkill_is_bit_identical(prompts, tmp_path, env):
    """A run killed with SIGKILL after its checkpoint at step 3 (in the middle of a batch of
    rollouts used for 2 epochs) and resumed ends with the same adapter, EMA anchor, metrics rows
    and samples as a run that was never stopped: the anchor, the batch being reused and the
    rollout seeds are in the checkpoint."""
    base = dict(
        prompts_file=str(prompts),
        steps=6,
        batch_size=2,
        num_samples=2,
        max_new_tokens=5,
        learning_rate=2e-2,
        warmup_steps=0,
        eval_fraction=0.25,
        eval_every=2,
        save_every=3,
        progress=False,
        anchor="ema",
        ema_rate=0.3,
        ppo_epochs=2,
        clip_epsilon=0.2,
        max_length=32,
        seed=2,
    )
    ref_out, out = tmp_path / "ref", tmp_path / "run"
    reference = workers.start(
        WORKER, dict(kind="train", config=dict(base, out_dir=str(ref_out))), tmp_path, env
    )
    code, ref, err = workers.finish(reference)
    assert code == 0, err[-3000:]

    job = dict(kind="train", config=dict(base, out_dir=str(out)), step_sleep=1.0)
    proc = workers.start(WORKER, job, tmp_path, env)
    deadline = time.monotonic() + 300
    while not (workers.logged_steps(out) and workers.logged_steps(out)[-1] >= 4):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[1]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    code, _, _ = workers.finish(proc)
    assert code == -signal.SIGKILL
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [3]
    assert not (out / "adapter").exists()

    code, resumed, err = workers.finish(
        workers.start(
            WORKER,
            dict(kind="train", config=dict(base, out_dir=str(out)), resume=True),
            tmp_path,
            env,
        )
    )
    assert code == 0, err[-3000:]
    assert resumed["step"] == 6 and resumed["eval_after"] == ref["eval_after"]
    import orbax.checkpoint as ocp

    def adapter(folder):
        return jax.tree.leaves(ocp.PyTreeCheckpointer().restore(folder / "adapter" / "params"))

    for a, b in zip(adapter(out), adapter(ref_out), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    anchors = [
        ocp.PyTreeCheckpointer().restore(folder / "checkpoints" / "6" / "objective")
        for folder in (out, ref_out)
    ]
    for a, b in zip(jax.tree.leaves(anchors[0]), jax.tree.leaves(anchors[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert _strip(workers.read_jsonl(out / "metrics.jsonl")) == _strip(
        workers.read_jsonl(ref_out / "metrics.jsonl")
    )
    assert workers.read_jsonl(out / "samples.jsonl") == workers.read_jsonl(
        ref_out / "samples.jsonl"
    )


def test_mesh_step_equals_one_device(prompts, tmp_path):
    """One RL step (rollouts, rewards, the scoring pass with its exact KLs, the update with an
    EMA anchor, k1 in the reward) on a data 2 x fsdp 4 mesh of 8 CPU devices with 2
    micro-batches, against one device with one batch, from the same state.

    The rollouts are the same tokens (drawn by the one Sampler before any update). Metrics,
    the exact KLs of the scoring pass included, and the advantages (rewards minus beta times
    its k1): <= 1e-5 relative (f32 sums in another order).
    Parameters: <= 2% of the learning rate, as in test_training's mesh test (Adam divides each
    gradient entry by its own magnitude); the anchor, an average with them: the same bound times
    its rate.
    """
    config = dict(
        prompts_file=str(prompts),
        out_dir=str(tmp_path),
        steps=2,
        batch_size=16,
        num_samples=2,
        max_new_tokens=5,
        learning_rate=1e-2,
        warmup_steps=0,
        eval_fraction=0.0,
        anchor="ema",
        ema_rate=0.5,
        kl_coef=0.1,
        max_length=32,
    )
    job = dict(kind="mesh", config=config, layouts=dict(single=[1, 1, 1], mesh=[2, 4, 2]))
    report = workers.run(WORKER, job, tmp_path, devices=8)
    assert report["devices"] == 8
    (case,) = report["cases"]
    assert case["same_tokens"]
    # The token weights (advantages) come from rewards minus beta * k1 of the scoring pass.
    assert case["max_weight_diff"] <= 1e-5 * case["max_weight"], case
    got, ref = case["metrics"], case["reference_metrics"]
    timing = {"rollout_s", "reward_s", "score_s"}
    assert set(got) == set(ref) >= {"loss", "grad_norm", "kl", "kl_anchor", "reward_mean"}
    for key in set(ref) - timing:
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert case["max_param_diff"] <= 2e-2 * 1e-2, case
    assert case["max_anchor_diff"] <= 0.5 * 2e-2 * 1e-2, case


# --------------------------------------------------------------------------------------------
# Bad input: one clear error each


def test_bad_settings_are_one_clear_error_before_the_model_loads(prompts, tmp_path):
    def config(**changes):
        return RLConfig(
            **{
                **dict(prompts_file=str(prompts), out_dir=str(tmp_path), steps=2, reward="x:y"),
                **changes,
            }
        )

    cases = [
        (dict(num_samples=1), r"RLOO needs num_samples \(k\) >= 2"),
        (dict(kl_coef=-0.1), r"kl_coef \(the KL coefficient beta\) must be a number >= 0"),
        (dict(jeffreys_beta=1.5, algo="bond"), r"jeffreys_beta must lie in \[0, 1\]"),
        (dict(ema_rate=2.0), r"ema_rate must lie in \[0, 1\]"),
        (dict(algo="jbond", best_of=4), "J-BOND draws n = 2 anchor samples"),
        (dict(algo="bond", anchor_samples=5, best_of=2), "anchor_samples must be a multiple"),
        (dict(algo="bond", clip_epsilon=0.2), "BOND trains on each batch once"),
        (dict(algo="ppo"), "algo must be one of rloo, reinforce, bond, jbond"),
        (dict(prompts_file=""), "prompts_file is required"),
        (dict(max_new_tokens=600), r"max_new_tokens \(600\) must be below max_length"),
    ]
    for changes, message in cases:
        with pytest.raises(ConfigError, match=message):
            config(**changes).validate()
    config(algo="reinforce", num_samples=1).validate()  # one sample is fine without RLOO


def test_bad_inputs_at_run_time_are_one_clear_error(tiny, prompts, tmp_path):
    model, tokenizer = tiny
    base = dict(
        prompts_file=str(prompts),
        steps=1,
        batch_size=2,
        num_samples=2,
        max_new_tokens=4,
        eval_fraction=0.0,
        progress=False,
        max_length=32,
    )
    with pytest.raises(RewardError, match=r"returned 3 value\(s\) for 4 completions"):
        train_rl(
            RLConfig(out_dir=str(tmp_path / "a"), **base),
            reward=lambda p, c: [0.0, 1.0, 2.0],
            model=model,
            tokenizer=tokenizer,
        )
    with pytest.raises(RewardError, match="rewards must be numbers"):
        train_rl(
            RLConfig(out_dir=str(tmp_path / "b"), **base),
            reward=lambda p, c: ["good"] * len(c),
            model=model,
            tokenizer=tokenizer,
        )
    with pytest.raises(ConfigError, match="reward is required"):
        train_rl(RLConfig(out_dir=str(tmp_path / "c"), **base), model=model, tokenizer=tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt here"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: a prompt row needs \"prompt\""):
        train_rl(
            RLConfig(out_dir=str(tmp_path / "d"), **dict(base, prompts_file=str(bad))),
            reward=worker.letter_reward,
            model=model,
            tokenizer=tokenizer,
        )
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": " ".join(worker.WORDS[:40])}) + "\n")
    with pytest.raises(DataError, match="would exceed max_length = 32"):
        train_rl(
            RLConfig(out_dir=str(tmp_path / "e"), **dict(base, prompts_file=str(long))),
            reward=worker.letter_reward,
            model=model,
            tokenizer=tokenizer,
        )


def test_cli_refuses_bad_settings_in_one_line(prompts, tmp_path, capsys):
    from gemma_kit.cli import main

    config = tmp_path / "rl.toml"
    config.write_text(
        f'prompts_file = "{prompts}"\nout_dir = "{tmp_path / "out"}"\n'
        'steps = 2\nreward = "x:y"\nalgo = "rloo"\nnum_samples = 1\n'
    )
    assert main(["rl", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: RLOO needs num_samples (k) >= 2") and "\n" not in err
    assert (
        main(["rl", "--config", str(config), "--set", "num_samples=2", "--set", "kl_coef=-1"]) == 2
    )
    assert "kl_coef" in capsys.readouterr().err
