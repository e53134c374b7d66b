"""DPO / IPO on the training core (gemma_kit.posttrain.dpo): log 2 and the closed-form gradient
at the first step, the three references giving one loss, a run that raises the margin and
resumes bit-identically, 8 devices against one, TRL's DPOTrainer as an oracle, and bad input.

Tiny Gemma 3 model and toy pairs (tests/support/preference_worker.py). Sequence log-probs here are
recomputed independently: the model's own full-logits forward pass (model(tokens), no chunking,
no packed-row mask; right padding cannot reach earlier positions), log-softmax in float64.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("optax", reason="training needs the [finetune] extra")
# After the skip: these import gemma_kit.training, which needs optax.
from gemma_kit.errors import CheckpointError, ConfigError
from gemma_kit.lora import LoRAParam, apply_lora, merge
from gemma_kit.posttrain.dpo import DPO, DPOConfig, train_dpo
from gemma_kit.posttrain.preference_training import PreferenceData
from gemma_kit.training import RunContext, Trainer, micro_batches, run
from tests.support import preference_worker as toy
from tests.support import tiny, workers

WORKER = "preference_worker"
BETA = 0.5


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return toy.tiny_base(tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture(scope="module")
def pairs(base):
    return toy.mesh_pairs(base[2], n=8)


def _config(**changes) -> DPOConfig:
    settings = dict(
        train_file="-",
        out_dir="-",
        steps=4,
        batch_size=8,
        learning_rate=1e-2,
        warmup_steps=0,
        eval_fraction=0.0,
        beta=BETA,
        progress=False,
    )
    return DPOConfig(**{**settings, **changes}).validate()


def _prepared(config: DPOConfig, policy, tokenizer, pairs, out_dir=pathlib.Path("-")):
    """(objective, trainer) for `policy` as a run would build them, without running."""
    objective = DPO()
    context = RunContext(config, policy, tokenizer, out_dir, True, lambda s: None)
    objective.prepare_with(context, PreferenceData.from_pairs(pairs))
    assert config.steps is not None
    trainer = Trainer(
        config, context.model, config.steps, objective.loss, trainable=objective.trainable(config)
    )
    return objective, trainer


def _batch(pairs, objective=None) -> dict:
    batch = pairs.take(np.arange(len(pairs)))
    if objective is not None and objective.ref_train is not None:
        batch["ref_chosen_logps"] = objective.ref_train.chosen
        batch["ref_rejected_logps"] = objective.ref_train.rejected
    return batch


def _sequence_logps(model, tokens: np.ndarray, completion: np.ndarray):
    """sum over completion targets of log p(token), through model(tokens): [N] jax float32."""
    logits = model(jnp.asarray(tokens)).astype(jnp.float32)
    log_p = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    picked = jnp.take_along_axis(log_p, jnp.asarray(tokens[:, 1:])[..., None], -1)[..., 0]
    return jnp.sum(picked * jnp.asarray(completion[:, 1:], jnp.float32), axis=1)


def _oracle_loss(policy, reference, pairs, beta=BETA) -> float:
    """The DPO loss from independent log-probs, in float64."""
    lp = [
        np.asarray(
            _sequence_logps(m, getattr(pairs, side), getattr(pairs, f"{side}_completion")),
            np.float64,
        )
        for m in (policy, reference)
        for side in ("chosen", "rejected")
    ]
    delta = beta * ((lp[0] - lp[2]) - (lp[1] - lp[3]))
    return float(np.mean(np.log1p(np.exp(-delta))))


def test_first_step_is_log2_with_the_closed_form_gradient(base, pairs):
    """At the first step the LoRA policy is its base (B = 0): Delta = 0, the loss is log 2
    (1e-6) and every implicit reward 0. The gradient equals the closed form
    dL/dtheta = -beta sigmoid(-Delta) mean_i (grad log pi(y_w,i) - grad log pi(y_l,i)), with
    sigmoid(0) = 1/2 and the log-prob gradients from the independent forward pass: <= 1e-4 of
    the largest entry (observed 1.8e-6). The optimizer step reports that loss and gradient norm."""
    _, model, tokenizer = base
    policy = nnx.merge(*nnx.split(model))
    apply_lora(policy, rank=4, alpha=8.0, seed=1)
    config = _config()
    objective, trainer = _prepared(config, policy, tokenizer, pairs)
    frozen = objective.frozen(0, trainer)
    graphdef, lora, rest = nnx.split(policy, LoRAParam, ...)
    batch = {k: jnp.asarray(v) for k, v in _batch(pairs).items()}

    def mean_loss(lora):
        total, count, _ = objective.loss(nnx.merge(graphdef, lora, rest), batch, frozen)
        return total / count

    def logp_difference(lora):  # mean_i log pi(y_w,i) - log pi(y_l,i), independently
        model = nnx.merge(graphdef, lora, rest)
        return jnp.mean(
            _sequence_logps(model, pairs.chosen, pairs.chosen_completion)
            - _sequence_logps(model, pairs.rejected, pairs.rejected_completion)
        )

    grads, g_diff = jax.jit(lambda p: (jax.grad(mean_loss)(p), jax.grad(logp_difference)(p)))(lora)
    closed = jax.tree.map(lambda g: -BETA * 0.5 * g, g_diff)
    ours, theirs = jax.tree.leaves(grads), jax.tree.leaves(closed)
    scale = max(float(jnp.abs(x).max()) for x in theirs)
    assert scale > 1e-3  # B's gradients: the comparison means something
    assert (
        max(float(jnp.abs(a - b).max()) for a, b in zip(ours, theirs, strict=True)) <= 1e-4 * scale
    )

    metrics = trainer.step(trainer.place(micro_batches(_batch(pairs), 1), batch_axis=1), frozen)
    assert metrics["normaliser"] == len(pairs)
    assert abs(metrics["loss"] - math.log(2)) < 1e-6
    assert metrics["rewards_chosen"] == metrics["rewards_rejected"] == metrics["accuracy"] == 0
    norm = math.sqrt(sum(float(jnp.sum(x.astype(jnp.float32) ** 2)) for x in theirs))
    assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-4)


def test_the_three_references_give_one_loss(base, pairs, tmp_path):
    """A policy that is not its base (random LoRA B factors); the reference is the base:
    (a) the policy's network with the adapter off (frozen B = 0), (c) the base's log-probs
    precomputed once and stored, (b) full fine-tuning of the merged policy with the base
    checkpoint given by path. All equal the loss from independent log-probs (float64): <= 1e-5
    relative (observed <= 7e-7). IPO too, with (c)."""
    folder, model, tokenizer = base
    policy = toy.lora_policy(model)
    expected = _oracle_loss(policy, model, pairs)
    assert abs(expected - math.log(2)) > 0.05  # the policy really differs from its base

    def loss_of(config, policy, out_dir=pathlib.Path("-")):
        objective, trainer = _prepared(config, policy, tokenizer, pairs, out_dir)
        batch = trainer.place(_batch(pairs, objective), batch_axis=0)
        total, n, sums = trainer.loss_sums(batch, objective.frozen(0, trainer))
        return objective, total / n, sums

    _, lora_loss, sums_a = loss_of(_config(), policy)
    objective, stored_loss, sums_c = loss_of(_config(precompute_ref_logps=True), policy, tmp_path)
    assert (tmp_path / "reference_logps.npz").is_file() and objective.reference is None
    full = _config(method="full", reference=str(folder), param_dtype="float32")
    _, full_loss, sums_b = loss_of(full, merge(policy))
    for got in (lora_loss, stored_loss, full_loss):
        assert got == pytest.approx(expected, rel=1e-5)
    for key in ("rewards_chosen", "rewards_rejected", "margin"):
        assert sums_c[key] == pytest.approx(sums_a[key], rel=1e-5, abs=1e-5)
        assert sums_b[key] == pytest.approx(sums_a[key], rel=1e-4, abs=1e-4)

    # IPO: (h - 1/(2 beta))^2 with length-normalised log-ratios, from the same log-probs.
    _, ipo_loss, _ = loss_of(
        _config(loss_type="ipo", precompute_ref_logps=True), policy, tmp_path / "ipo"
    )
    lp = [
        np.asarray(
            _sequence_logps(m, getattr(pairs, s), getattr(pairs, f"{s}_completion")), np.float64
        )
        for m in (policy, model)
        for s in ("chosen", "rejected")
    ]
    lengths = [pairs.chosen_completion[:, 1:].sum(1), pairs.rejected_completion[:, 1:].sum(1)]
    h = (lp[0] - lp[2]) / lengths[0] - (lp[1] - lp[3]) / lengths[1]
    assert ipo_loss == pytest.approx(np.mean((h - 1 / (2 * BETA)) ** 2), rel=1e-5)


class _Interrupted(DPO):
    def after_step(self, step, trainer, metrics):
        if step + 1 == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: save, stop, return


def test_dpo_raises_the_margin_and_resumes_bit_identically(base, tmp_path):
    """6 steps of LoRA DPO with precomputed reference log-probs, 2 micro-batches per step: the
    held-out margin rises from 0 and the loss falls below log 2; a run stopped by SIGINT after
    step 3 and resumed (reading the stored reference log-probs back) ends with the same factors
    and metrics rows, bit for bit."""
    _, model, tokenizer = base
    data = toy.write_jsonl(tmp_path / "pairs.jsonl", toy.toy_rows(40, seed=3))
    settings = dict(
        train_file=str(data),
        steps=6,
        batch_size=8,
        grad_accum=2,
        learning_rate=1e-2,
        warmup_steps=1,
        eval_fraction=0.25,
        eval_every=3,
        save_every=2,
        progress=False,
        beta=BETA,
        precompute_ref_logps=True,
    )
    straight = train_dpo(
        DPOConfig(out_dir=str(tmp_path / "straight"), **settings), model=model, tokenizer=tokenizer
    )
    before, after = straight.evaluations["before"], straight.evaluations["after"]
    assert before["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert before["eval_margin"] == 0.0 and after["eval_margin"] > 1.0
    assert after["eval_loss"] < 0.5 * math.log(2) and after["eval_accuracy"] == 1.0
    summary = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert summary["data"]["reference"] == "the base (LoRA off), precomputed"
    assert (tmp_path / "straight" / "dpo.png").is_file()

    out = tmp_path / "run"
    config = DPOConfig(out_dir=str(out), **settings)
    stopped = run(config, _Interrupted(), model=model, tokenizer=tokenizer)
    assert stopped.interrupted and stopped.step == 3
    resumed = train_dpo(config, model=model, tokenizer=tokenizer, resume=True)
    assert resumed.step == 6
    for a, b in zip(
        jax.tree.leaves(nnx.state(resumed.model, LoRAParam)),
        jax.tree.leaves(nnx.state(straight.model, LoRAParam)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def rows(folder):
        return [
            {k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "elapsed")}
            for line in (folder / "metrics.jsonl").read_text().splitlines()
        ]

    assert rows(out) == rows(tmp_path / "straight")
    assert {"rewards_chosen", "rewards_rejected", "accuracy", "margin", "logps_chosen"} <= set(
        rows(out)[1]
    )


def test_mesh_step_equals_one_device(tmp_path, base):
    """Two DPO steps (LoRA, the reference a frozen pytree) on a data 2 x fsdp 4 mesh of 8 CPU
    devices with 2 micro-batches, against one device with one batch of 16 pairs: loss, gradient
    norm and metric sums <= 1e-5 relative; parameters <= 2% of the learning rate (as the core's
    own mesh test: f32 sums in another order, divided by Adam's per-entry scale)."""
    job = dict(kind="mesh", base=str(base[0]), layouts=dict(single=[1, 1, 1], mesh=[2, 4, 2]))
    report = workers.run(WORKER, job, tmp_path, devices=8)
    assert report["devices"] == 8
    for got, ref in zip(report["metrics"], report["reference_metrics"], strict=True):
        assert set(got) == set(ref) >= {"loss", "grad_norm", "margin", "rewards_chosen"}
        for key in ref:
            np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert report["metrics"][1]["loss"] != report["metrics"][0]["loss"]  # the step moved it
    assert report["max_param_diff"] <= 2e-2 * 1e-2


def test_trl_dpo_trainer_agrees(base, pairs, tmp_path):
    """TRL's DPOTrainer as the oracle (posttrain-reference.md 3.1 item 4): the policy (random
    LoRA, merged) and its base exported to transformers, one batch of the same 8 pairs at
    learning_rate 0. TRL's logged loss, implicit rewards, accuracy, margin and log-probs equal
    the objective's (the reference (a), the adapter off): <= 1e-4 relative (observed <= 1e-5).
    TRL is given our token ids (prompt = <bos> prompt, completion = reply <eos>): its own
    tokenising joins prompt and completion, which the HF tokenizer may split differently."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from gemma_kit.checkpoint.hf_export import export_hf

    folder, model, tokenizer = base
    policy = toy.lora_policy(model)
    objective, trainer = _prepared(_config(), policy, tokenizer, pairs)
    total, n, sums = trainer.loss_sums(
        trainer.place(_batch(pairs), batch_axis=0), objective.frozen(0, trainer)
    )
    ours = {"loss": total / n, **{k: v / n for k, v in sums.items()}}

    rows = []
    for i in range(len(pairs)):
        start = int(np.argmax(pairs.chosen_completion[i]))
        rows.append(
            dict(
                prompt_ids=pairs.chosen[i, :start].tolist(),
                chosen_ids=pairs.chosen[i][pairs.chosen_completion[i]].tolist(),
                rejected_ids=pairs.rejected[i][pairs.rejected_completion[i]].tolist(),
            )
        )

    class Pretokenized(trl.DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already token ids

    def load(path):
        return transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager"
        )

    exported = export_hf(merge(policy), tmp_path / "policy", tokenizer=tokenizer, progress=False)
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        learning_rate=0.0,
        beta=BETA,
        per_device_train_batch_size=len(pairs),
        max_steps=1,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        max_length=None,
        bf16=False,
        disable_tqdm=True,
    )
    oracle = Pretokenized(
        model=load(exported),
        ref_model=load(folder),
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=transformers.AutoTokenizer.from_pretrained(folder),
    )
    oracle.train()
    logged = oracle.state.log_history[0]
    pairs_of = {
        "loss": "loss",
        "rewards/chosen": "rewards_chosen",
        "rewards/rejected": "rewards_rejected",
        "rewards/accuracies": "accuracy",
        "rewards/margins": "margin",
        "logps/chosen": "logps_chosen",
        "logps/rejected": "logps_rejected",
    }
    assert abs(logged["loss"] - math.log(2)) > 0.1  # a policy away from its reference
    for theirs, key in pairs_of.items():
        assert ours[key] == pytest.approx(logged[theirs], rel=1e-4, abs=1e-5), key


def test_bad_input_is_one_clear_error(tmp_path, base, capsys):
    from gemma_kit.cli import main

    folder = base[0]
    data = toy.write_jsonl(tmp_path / "pairs.jsonl", toy.toy_rows(8))
    args = [
        "dpo",
        "--train-file",
        str(data),
        "--out-dir",
        str(tmp_path / "o"),
        "--steps",
        "2",
        "--base",
        str(folder),
    ]
    for setting, message in [
        ("beta=0", "beta must be a number > 0, got 0"),
        ("beta=-0.1", "beta must be a number > 0"),
        ("label_smoothing=0.5", "label_smoothing must be in [0, 0.5)"),
        ("loss_type=hinge", "loss_type must be one of sigmoid, ipo"),
        (f"reference={folder}", "needs precompute_ref_logps = true"),
    ]:
        assert main([*args, "--set", setting]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert (
        main(
            [
                "dpo",
                "--train-file",
                str(empty),
                "--out-dir",
                str(tmp_path / "o"),
                "--steps",
                "2",
                "--base",
                str(folder),
            ]
        )
        == 2
    )
    assert "empty" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="label_smoothing applies to the sigmoid loss only"):
        _config(loss_type="ipo", label_smoothing=0.1)

    # A reference of another architecture (full fine-tuning, reference by path).
    _, model, tokenizer = base
    wider = tiny.random_model(model.config.replace(hidden_dim=64))
    with pytest.raises(CheckpointError, match="not the policy's architecture"):
        _prepared(
            _config(method="full", reference=str(folder), param_dtype="float32"),
            wider,
            tokenizer,
            toy.mesh_pairs(tokenizer, 4),
        )
