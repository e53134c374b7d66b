"""The training core (gemma_kit.training): the step over any loss with an explicit normaliser,
frozen pytrees as arguments (no recompiles), an objective's own checkpointed state, config
subclasses, and the same step on an 8-device mesh and across two processes.

Tiny Gemma 2 model with random LoRA factors (tests/support/training_worker.py, which also runs the
child-process jobs); fine-tuning's own tests are test_finetune*.py.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("optax", reason="training needs the [finetune] extra")
# After the skip: the worker imports gemma_kit.training, which needs optax.
import optax

from gemma_kit.errors import ConfigError, TrainingError
from gemma_kit.lora import LoRAParam
from gemma_kit.training import (
    CrossEntropy,
    SignedCrossEntropy,
    TrainConfig,
    Trainer,
    micro_batches,
    run,
)
from gemma_kit.training.optimizer import make_optimizer
from tests.support import tiny, workers
from tests.support import training_worker as toy
from tests.support.ports import free_port

LR = 1e-2


@pytest.fixture(scope="module")
def lora_model():
    return toy.tiny_lora_model()[0]


def _mu(trainer) -> list[np.ndarray]:
    return toy.leaves(optax.tree_utils.tree_get(trainer.opt_state, "mu"))


# --------------------------------------------------------------------------------------------
# The step: normalisers, signed weights, accumulation


def test_signed_weights_step_equals_the_policy_gradient_step(lora_model):
    """SignedCrossEntropy over 2 micro-batches with uneven completion lengths and signed
    advantages A is one optimizer step on -sum_i A_i sum_t log pi(y_t) / N, N = all completion
    tokens of the step, computed here independently: the model's own forward pass on each row
    unpacked, jax.grad, the same optax optimizer.

    Loss and gradient norm: <= 1e-5 relative (observed 1e-7). Adam's first moment (linear in
    the clipped gradient): <= 1e-5 of its largest entry (observed 2.3e-6). Parameters: <= 1e-3
    of the learning rate (observed 7e-6; a first Adam step moves each entry by ~lr * sign(g), so
    only a gradient entry at the f32 rounding level could differ more).
    """
    rows = toy.completion_rows(11, 8, 24, 384)
    normaliser = rows["normaliser"].sum()
    config = toy.step_config(grad_accum=2)
    trainer = Trainer(config, lora_model, 10, SignedCrossEntropy(chunk=64))
    metrics = trainer.step(trainer.place(micro_batches(rows, 2), batch_axis=1))

    graphdef, lora, rest = nnx.split(lora_model, LoRAParam, ...)

    @jax.jit
    def row_sums(lora):  # sum_t w_t * (-log pi(y_t)) of each row, through model(tokens)
        # One sequence per row, padded at its end: the causal mask keeps padding out of every
        # weighted position, so the model's own default mask is the right one.
        logits = nnx.merge(graphdef, lora, rest)(jnp.asarray(rows["tokens"]))
        log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
        picked = jnp.take_along_axis(log_p, jnp.asarray(rows["targets"])[..., None], -1)[..., 0]
        return -jnp.sum(rows["weights"] * picked, axis=1)

    loss, grads = jax.jit(jax.value_and_grad(lambda lora: row_sums(lora).sum() / normaliser))(lora)
    optimizer, _ = make_optimizer(config, 10)
    opt_state = optimizer.init(lora)
    updates, opt_state = optimizer.update(grads, opt_state, lora)
    expected = toy.leaves(optax.apply_updates(lora, updates))

    assert metrics["normaliser"] == normaliser
    np.testing.assert_allclose(metrics["loss"], float(loss), rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], float(optax.global_norm(grads)), rtol=1e-5)
    mu = toy.leaves(optax.tree_utils.tree_get(opt_state, "mu"))
    assert max(np.abs(a - b).max() / np.abs(b).max() for a, b in zip(_mu(trainer), mu)) <= 1e-5
    got = toy.leaves(trainer.trainable)
    assert max(np.abs(a - b).max() for a, b in zip(got, expected)) <= 1e-3 * LR
    # The normaliser is the step's, not each micro-batch's: the mean of the two micro-batches'
    # own means (uneven completion lengths) is another number, far outside the tolerance.
    sums, counts = np.asarray(row_sums(lora)), rows["normaliser"]
    naive = (sums[:4].sum() / counts[:4].sum() + sums[4:].sum() / counts[4:].sum()) / 2
    assert abs(naive - metrics["loss"]) > 1e-3


def test_signed_weights_with_their_sum_as_normaliser_is_the_cross_entropy_step(lora_model):
    """With weights >= 0 and normaliser = their sum, SignedCrossEntropy is CrossEntropy (the
    weighted SFT loss) exactly: the same loss, metrics and parameters, bit for bit. (Weights are
    small integers, so that the sum of the weights and the sum of the rows' normalisers, taken
    in different orders, are both exact in float32.)"""
    rows = toy.completion_rows(12, 8, 24, 384, advantages=np.arange(1.0, 9.0))
    rows["normaliser"] = rows["weights"].sum(axis=1)
    config = toy.step_config(grad_accum=2)
    results = []
    for loss in (SignedCrossEntropy(chunk=64), CrossEntropy(chunk=64)):
        trainer = Trainer(config, lora_model, 10, loss)  # CrossEntropy ignores "normaliser"
        metrics = trainer.step(trainer.place(micro_batches(rows, 2), batch_axis=1))
        results.append((metrics, toy.leaves(trainer.trainable)))
    (signed, p_signed), (plain, p_plain) = results
    assert signed["loss"] == plain["loss"] and signed["grad_norm"] == plain["grad_norm"]
    assert signed["normaliser"] == plain["normaliser"] == plain["loss_tokens"]
    for a, b in zip(p_signed, p_plain, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("normaliser", ["tokens", "zero"])
def test_zero_advantages_give_exactly_zero_update(lora_model, normaliser):
    """All A = 0: loss 0, gradient 0 and parameters unchanged bit for bit (AdamW without weight
    decay); also when nothing counts (normaliser 0: no division by zero, no NaN)."""
    rows = toy.completion_rows(13, 8, 24, 384, advantages=np.zeros(8, np.float32))
    if normaliser == "zero":
        rows["normaliser"][:] = 0
    trainer = Trainer(toy.step_config(grad_accum=2), lora_model, 10, SignedCrossEntropy(64))
    before = toy.leaves(trainer.trainable)
    for _ in range(2):
        metrics = trainer.step(trainer.place(micro_batches(rows, 2), batch_axis=1))
        assert metrics["loss"] == 0.0 and metrics["grad_norm"] == 0.0
        assert metrics["weighted_tokens"] == 0.0
    for a, b in zip(toy.leaves(trainer.trainable), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_badly_shaped_batch_is_one_clear_error(lora_model):
    trainer = Trainer(toy.step_config(grad_accum=2), lora_model, 10, SignedCrossEntropy(64))
    rows = toy.completion_rows(14, 8, 24, 384)
    with pytest.raises(TrainingError, match=r"\[grad_accum, micro_batch, \.\.\.\] = \[2, 4"):
        trainer.step(trainer.place(rows, batch_axis=0))


# --------------------------------------------------------------------------------------------
# Frozen pytrees are arguments: new values, no compile


class _Compiles:
    """Counts JAX's tracing, lowering and XLA compiles (jax.monitoring events) while active."""

    def __enter__(self):
        self.events: list[str] = []
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def _listen(self, event, duration, **kwargs):
        if event.startswith("/jax/core/compile/") or "compilation_cache" in event:
            self.events.append(event)

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)


def test_new_frozen_values_do_not_compile_again(lora_model):
    """The anchor (a frozen pytree) changes every step and the loss follows it, yet only the
    first step compiles (no tracing, lowering or XLA compile after it, counted through
    jax.monitoring); a second Trainer of the same objective reuses the compiled step."""
    config = toy.step_config(grad_accum=2)
    rows = micro_batches(toy.completion_rows(15, 8, 24, 384), 2)
    anchors = toy.anchors_for(lora_model, 4)
    trainer = Trainer(config, lora_model, 10, toy.AnchoredLoss())
    trainer.step(trainer.place(rows, batch_axis=1), anchors[0])  # compiles
    pulls = []
    with _Compiles() as seen:
        for anchor in anchors[1:]:
            pulls.append(trainer.step(trainer.place(rows, batch_axis=1), anchor)["pull"])
        again = Trainer(config, lora_model, 10, toy.AnchoredLoss())
        again.step(again.place(rows, batch_axis=1), anchors[0])
    assert seen.events == []
    assert again.compiled is trainer.compiled
    assert len(set(pulls)) == 3  # the frozen values really reach the loss

    with _Compiles() as seen:
        jax.jit(lambda x: x * 3)(np.ones(5, np.float32))
    assert seen.events  # the counter sees a new program (it is not blind)


# --------------------------------------------------------------------------------------------
# A whole run of a non-SFT objective: its state is checkpointed and resumed bit for bit


def _run_config(out: pathlib.Path, **changes) -> toy.ToyConfig:
    settings = dict(
        out_dir=str(out),
        steps=6,
        batch_size=4,
        grad_accum=2,
        max_length=24,
        learning_rate=LR,
        warmup_steps=1,
        save_every=2,
        eval_every=3,
        progress=False,
        seed=3,
    )
    return toy.ToyConfig(**{**settings, **changes})


def test_objective_state_resumes_bit_identically(tmp_path):
    """An EMA anchor (after_step), a frozen argument of every step, saved with each checkpoint:
    a run stopped by SIGINT after step 3 and resumed ends with the same trained factors, anchor,
    update count and metrics rows as an uninterrupted run."""
    model, tokenizer = toy.tiny_lora_model()
    straight = toy.AnchorObjective()
    ref = run(_run_config(tmp_path / "ref"), straight, model=model, tokenizer=tokenizer)
    assert ref.step == 6 and not ref.interrupted and straight.updates == 6
    assert ref.stats == {"kind": "toy"} and set(ref.evaluations) == {"before", "after"}
    assert ref.eval_after == ref.evaluations["after"]["eval_loss"] != ref.eval_before

    out = tmp_path / "run"
    stopped = run(
        _run_config(out), toy.AnchorObjective(interrupt_after=3), model=model, tokenizer=tokenizer
    )
    assert stopped.interrupted and stopped.step == 3
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [2, 3]
    assert (out / "checkpoints" / "3" / "objective").is_dir()
    assert not (out / "adapter").exists()

    resumed_objective = toy.AnchorObjective()
    resumed = run(
        _run_config(out), resumed_objective, model=model, tokenizer=tokenizer, resume=True
    )
    assert resumed.step == 6 and resumed_objective.updates == 6
    for a, b in zip(
        toy.leaves(toy.lora_copy(resumed.model)), toy.leaves(toy.lora_copy(ref.model)), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(toy.leaves(resumed_objective.anchor), toy.leaves(straight.anchor), strict=True):
        np.testing.assert_array_equal(a, b)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [
        json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
    ]

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed")} for r in rows]

    assert strip(rows) == strip(ref_rows)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))
    assert {"pull", "weight_sum", "weighted_tokens"} <= set(rows[1])  # the loss's own sums
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["adapter"] == str(out / "adapter")
    # loss.png, and the objective's own plot, named in the summary.
    assert summary["plots"] == {"pull": str(out / "pull.png")}
    for png in ("loss.png", "pull.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The objective's own resume field is checked like the core's.
    with pytest.raises(TrainingError, match=r"ema_rate: 0.25 -> 0.5"):
        run(
            _run_config(out, ema_rate=0.5),
            toy.AnchorObjective(),
            model=model,
            tokenizer=tokenizer,
            resume=True,
        )


# --------------------------------------------------------------------------------------------
# Config subclasses and the shared command-line plumbing


@dataclasses.dataclass(frozen=True)
class _DistillLike(TrainConfig):
    teacher: str = ""
    beta: float = 0.5
    layers: tuple[int, ...] = (0, 1)
    PATH_FIELDS = TrainConfig.PATH_FIELDS + ("teacher",)
    RESUME_FIELDS = TrainConfig.RESUME_FIELDS + ("teacher",)

    def validate(self):
        super().validate()
        if not 0 <= self.beta <= 1:
            raise ConfigError(f"beta must be in [0, 1], got {self.beta}")
        return self


def test_config_subclasses_read_override_and_check_like_the_base(tmp_path):
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "run.toml"
    path.write_text(
        'train_file = "data.jsonl"\nout_dir = "out"\nsteps = 3\n'
        'teacher = "teacher_ckpt"\nbeta = 0.25\nlayers = [2, 3]\n'
    )
    config = _DistillLike.from_file(path)
    assert type(config) is _DistillLike and config.beta == 0.25
    assert config.teacher == str(tmp_path / "cfg" / "teacher_ckpt")  # relative to the file
    assert config.train_file == str(tmp_path / "cfg" / "data.jsonl")
    with pytest.raises(ConfigError, match="unknown setting 'betta'; did you mean 'beta'"):
        config.with_overrides({"betta": 0.1})
    with pytest.raises(ConfigError, match="beta must be in"):
        config.with_overrides({"beta": 2.0}).validate()
    saved = config.to_dict()
    assert saved["layers"] == [2, 3] and saved["beta"] == 0.25
    assert json.loads(json.dumps(saved)) == saved
    assert type(config.replace(beta=0.5)) is _DistillLike

    from gemma_kit.training.loop import check_out_dir

    out = tmp_path / "out"
    (out / "checkpoints" / "2").mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(saved))
    assert check_out_dir(config.replace(beta=0.9), out, resume=True) == 2  # not a resume field
    with pytest.raises(TrainingError, match=r"teacher: '.*teacher_ckpt' -> 'other'"):
        check_out_dir(config.replace(teacher="other"), out, resume=True)


def test_cli_helper_builds_subclass_configs(tmp_path):
    """gemma_kit.cli.training: --config, the common flags, a command's own flag and --set."""
    import argparse

    from gemma_kit.cli.training import add_training_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_training_arguments(parser)
    parser.add_argument("--teacher", default=None)
    path = tmp_path / "run.toml"
    path.write_text('train_file = "d.jsonl"\nout_dir = "o"\nepochs = 2\nbeta = 0.1\n')
    args = parser.parse_args(
        [
            "--config",
            str(path),
            "--steps",
            "5",
            "--teacher",
            "t/",
            "--set",
            "beta=0.75",
            "--set",
            "layers=[4]",
        ]
    )
    config = config_from_args(args, _DistillLike, extra_flags=("teacher",))
    assert (config.steps, config.epochs, config.teacher, config.beta, config.layers) == (
        5,
        None,
        "t/",
        0.75,
        [4],
    )
    args = parser.parse_args(["--config", str(path), "--set", "teachr=x"])
    with pytest.raises(ConfigError, match="did you mean 'teacher'"):
        config_from_args(args, _DistillLike)


def test_distributed_after_jax_started_is_one_clear_error():
    from gemma_kit.training import initialize_distributed

    jax.devices()  # this process has started JAX (as a test process always has)
    with pytest.raises(TrainingError, match="initialize_distributed\\(config\\) first"):
        initialize_distributed(
            TrainConfig(
                distributed=True, coordinator_address="127.0.0.1:1", num_processes=2, process_id=0
            )
        )


# --------------------------------------------------------------------------------------------
# Other devices and processes (child processes: a process fixes its devices when JAX starts)


def test_mesh_step_of_a_non_sft_loss_equals_one_device(tmp_path):
    """Two steps of the anchored signed-weight loss (the anchor, a frozen dict of factors,
    different at each step) on a data 2 x fsdp 4 mesh of 8 CPU devices with 2 micro-batches of 8
    rows, against one device with one batch of 16 rows.

    Loss, gradient norm and the loss's sums over the micro-batches: <= 1e-5 relative (observed
    1.3e-6). Adam's first moment: <= 1e-4 of its largest entry (observed 1.7e-6). Parameters:
    <= 2% of the learning rate (observed 0.003%; as in test_finetune_resume: f32 sums in
    another order, and Adam dividing each gradient entry by its own magnitude).
    """
    job = dict(kind="mesh", layouts=dict(single=[1, 1, 1], mesh=[2, 4, 2]))
    report = workers.run("training_worker", job, tmp_path, devices=8)
    assert report["devices"] == 8 and len(report["cases"]) == 1
    case = report["cases"][0]
    for got, ref in zip(case["metrics"], case["reference_metrics"], strict=True):
        assert set(got) == set(ref) >= {"loss", "grad_norm", "normaliser", "pull"}
        # Each metric is summed over the micro-batches: the pull (one value per micro-batch,
        # not a sum over rows) comes twice from 2 micro-batches; the row sums once.
        scale = dict(pull=2.0)
        for key in ref:
            np.testing.assert_allclose(
                got[key], scale.get(key, 1.0) * ref[key], rtol=1e-5, err_msg=key
            )
    assert case["metrics"][0]["pull"] != case["metrics"][1]["pull"]  # the anchor did change
    assert case["mu_rel_diff"] <= 1e-4, case
    assert case["max_param_diff"] <= 2e-2 * LR, case
    assert case["moved"] > LR


def test_two_processes_equal_one(tmp_path):
    """Two processes on 127.0.0.1 joined by jax.distributed (CPU collectives), one device each,
    a data=2 mesh over both: a 2-step fine-tuning run (Orbax checkpoints written by both,
    the adapter by process 0) and one step of the anchored signed-weight loss, against the same
    in this one process on one device, from the same global batches.

    The gradient's all-reduce across the processes sums in another order, nothing else differs:
    losses of the run, held-out losses and the toy step's loss, gradient norm and sums: <= 1e-5
    relative (observed <= 1.1e-6, in the sum of the signed weights, which cancel). Trained
    factors: <= 2% of the learning rate, as in test_finetune_resume (observed 0.7% after the
    run's 2 steps, 0.008% after the toy's 1): Adam divides each gradient entry by its own
    running magnitude, so where two steps' gradients nearly cancel in the first moment an f32
    rounding difference becomes a visible fraction of a step.
    """
    lines = [line.strip() for line in tiny.SMALL_TEXT.splitlines() if len(line.strip()) > 20]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": line[:80]}) + "\n" for line in lines[:40]))
    port = free_port()
    jobs = [
        dict(
            kind="distributed",
            process=process,
            port=port,
            data=str(data),
            out=str(tmp_path / "two"),
        )
        for process in (0, 1)
    ]
    reports = workers.run_together("training_worker", jobs, tmp_path)
    assert [(r["process"], r["processes"], r["devices"], r["local_devices"]) for r in reports] == [
        (0, 2, 2, 1),
        (1, 2, 2, 1),
    ]
    assert [r["adapter"] for r in reports] == [True, True]  # process 0 wrote it, both see it
    out = tmp_path / "two"
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [1, 2]

    model, tokenizer = toy.tiny_lora_model()
    ref = toy.distributed_job(
        model, tokenizer, toy.finetune_config(str(data), str(tmp_path / "one")), None
    )
    for r in reports:
        got = np.load(r["npz"])
        for key, values in ref.items():
            if key == "losses" and r["process"] == 1:
                continue  # process 0 alone writes metrics.jsonl
            assert len(values) > 0
            for i, value in enumerate(values):
                value, other = np.asarray(value, np.float64), got[f"{key}_{i}"]
                if key in ("finetuned", "toy"):
                    diff = float(np.abs(other - value).max())
                    assert diff <= 2e-2 * LR, (key, i, diff)
                else:
                    np.testing.assert_allclose(other, value, rtol=1e-5, err_msg=key)
