"""The one run loop: any objective, resumable, interruptible, sharded, single- or multi-host.

    result = run(config, objective)                    # or run(config, objective, resume=True)

What a run does (the objective's hooks: gemma_kit.training.objective):
  1. checks the settings and out_dir (a fresh run refuses a folder holding checkpoints; --resume
     refuses changed settings among type(config).RESUME_FIELDS); with `distributed`, joins the
     other processes (jax.distributed, CPU collectives through gloo);
  2. builds the model (base checkpoint or the embedded 270M; LoRA, QLoRA or full) and lets the
     objective prepare its data; builds the Trainer (compiled step of the objective's loss) on
     the (data, fsdp) mesh;
  3. on --resume restores the trained variables, the optimizer state, the data position and the
     objective's own state from the latest checkpoint, and checks the data fingerprint;
  4. evaluates, then steps: each step's batch and frozen pytrees come from the objective; a
     NaN/inf loss or gradient norm raises DivergenceError before anything of that step is saved;
     metrics.jsonl gets one row per step and per evaluation; a checkpoint is saved every
     save_every steps, at the end and on Ctrl-C/SIGTERM (then the run returns interrupted=True);
  5. at the end: held-out evaluation, adapter/ (LoRA, QLoRA) or model/ (full), loss.png and the
     objective's plots, summary.json.

OUT_DIR receives: config.json, checkpoints/ (Orbax CheckpointManager: trainable variables,
optimizer state, progress JSON, the objective's arrays; the last `keep_checkpoints`),
metrics.jsonl, loss.png, summary.json, and adapter/ or model/ (or what the objective's
save_result writes instead, e.g. a reward model folder).

With several processes, each runs the same command on the same data: every process builds the
same global batch and hands JAX the rows its devices hold; Orbax writes the checkpoints from all
of them; process 0 alone writes config.json, metrics, plots, summary and the adapter.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import signal
import sys
import threading
import time
from typing import Any

import jax

from gemma_kit.errors import DataError, DivergenceError, TrainingError
from gemma_kit.lora import save_adapter
from gemma_kit.training.config import TrainConfig
from gemma_kit.training.metrics import MetricsLog, plot_losses
from gemma_kit.training.model import build_model, save_full
from gemma_kit.training.objective import Objective, RunContext
from gemma_kit.training.trainer import Trainer

CHECKPOINTS = "checkpoints"


@dataclasses.dataclass
class TrainResult:
    step: int  # optimizer steps completed
    out_dir: pathlib.Path
    adapter: pathlib.Path | None  # LoRA / QLoRA
    model_dir: pathlib.Path | None  # full fine-tuning
    eval_before: float | None  # the objective's eval_key before training (None when resumed)
    eval_after: float | None
    last_loss: float | None
    interrupted: bool
    stats: dict[str, Any]
    model: Any = dataclasses.field(default=None, repr=False)  # the trained model
    # Every held-out metric: {"before": {...}, "after": {...}} (as far as they were measured).
    evaluations: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------------------
# Stopping on Ctrl-C / SIGTERM


class _StopRequest:
    """Turns the first SIGINT/SIGTERM into a flag checked between steps (a second one kills)."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        self.signal = signum
        print(
            f"\n{signal.Signals(signum).name}: finishing this step, saving a checkpoint and "
            "stopping (press Ctrl-C again to stop at once, without saving)",
            file=sys.stderr,
        )
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------------------------------
# Before the run


def initialize_distributed(config: TrainConfig) -> None:
    """Joins the other processes of a multi-host run (once per process; see TrainConfig).

    run() calls it; code that builds the model itself must call it first, since JAX joins the
    other processes only before its first computation.

    On CPU the processes exchange arrays through gloo, JAX's CPU collectives (its default
    jax_cpu_collectives_implementation); on accelerators through their own interconnect.
    """
    if not config.distributed or jax.distributed.is_initialized():
        return
    try:
        jax.distributed.initialize(
            coordinator_address=config.coordinator_address,
            num_processes=config.num_processes,
            process_id=config.process_id,
        )
    except RuntimeError as err:
        if "must be called before" not in str(err):
            raise
        raise TrainingError(
            "distributed = true, but this process already used JAX (a model was built or an "
            "array made) before joining the other processes; call gemma_kit.training."
            "initialize_distributed(config) first, before building the model"
        ) from None


def check_out_dir(config: TrainConfig, out: pathlib.Path, resume: bool) -> int | None:
    """Latest checkpoint step to resume from (None for a fresh run); refuses unsafe cases."""
    ckpt = out / CHECKPOINTS
    steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []
    if not resume:
        if steps:
            raise TrainingError(
                f"{out} already holds checkpoints of a run (up to step {steps[-1]}); pass "
                "--resume (resume=True) to continue it, or choose another out_dir"
            )
        return None
    if not steps:
        raise TrainingError(f"nothing to resume: {ckpt} holds no checkpoint")
    saved = out / "config.json"
    if saved.is_file():
        before = json.loads(saved.read_text())
        now = config.to_dict()
        changed = [k for k in type(config).RESUME_FIELDS if before.get(k) != now.get(k)]
        if changed:
            details = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
            raise TrainingError(
                f"cannot resume {out}: settings that fix the model or the data order changed "
                f"({details}); restore them or start a new out_dir"
            )
    return steps[-1]


def write_json(path: pathlib.Path, value) -> None:
    """Writes `value` as JSON through a temporary file renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str) + "\n")
    tmp.replace(path)


def _describe(evaluation: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in evaluation.items())


# ------------------------------------------------------------------------------------------
# The run


def run(
    config: TrainConfig, objective: Objective, *, model=None, tokenizer=None, resume: bool = False
) -> TrainResult:
    """Runs (or resumes) a training run of `objective` as `config` describes; see the module
    docstring.

    model / tokenizer: use these instead of loading `config.base` (tests, notebooks); the model
      given is left as it is (its trained variables are copied).
    resume: continue from the latest checkpoint in out_dir, with the very batch the stopped run
      would have taken next. Ctrl-C (or SIGTERM) saves a checkpoint and returns with
      interrupted=True; a NaN/inf loss raises DivergenceError without saving.
    """
    config = config.validate()
    initialize_distributed(config)
    out = pathlib.Path(config.out_dir).expanduser().absolute()
    resume_from = check_out_dir(config, out, resume)
    lead = jax.process_index() == 0

    def say(message: str) -> None:
        if config.progress and lead:
            print(message, file=sys.stderr)

    objective.check_inputs(config)
    given_model = model is not None
    model, tokenizer, base = build_model(config, model, tokenizer)
    context = RunContext(config, model, tokenizer, out, lead, say)
    steps = objective.prepare(context)
    model = context.model  # prepare may wrap it (e.g. a reward model's head around it)

    devices = config.mesh_data * config.mesh_fsdp
    if jax.process_count() > 1 and devices != jax.device_count():
        raise TrainingError(
            f"this run has {jax.process_count()} processes with {jax.device_count()} devices in "
            f"all, but its mesh_data x mesh_fsdp = {devices}: a multi-process mesh must use "
            "every device of every process"
        )
    mesh = None
    if devices > 1:
        from gemma_kit.sharding import make_mesh

        mesh = make_mesh(data=config.mesh_data, fsdp=config.mesh_fsdp)
    trainer = Trainer(
        config,
        model,
        steps,
        objective.loss,
        mesh,
        keep_model=given_model,
        trainable=objective.trainable(config),
    )
    say(
        f"model: {model.config.name} ({base}), method {config.method}, "
        f"{trainer.trainable_count:,} trainable parameters, compute "
        f"{config.resolved_compute_dtype()}"
    )

    out.mkdir(parents=True, exist_ok=True)
    manager = trainer.manager(out / CHECKPOINTS)
    start, eval_before, tokens_seen = 0, None, 0
    evaluations: dict[str, dict[str, float]] = {}
    fingerprint = objective.fingerprint()
    if resume_from is not None:
        template, _ = objective.checkpoint_state(resume_from)
        progress, arrays = trainer.restore(manager, resume_from, template)
        if fingerprint is not None and progress.get("data_fingerprint") != fingerprint:
            raise DataError(
                f"the training data or its settings changed since {out} was checkpointed; a "
                "resumed run must see the same rows in the same order. Restore the data, or "
                "start a new out_dir"
            )
        objective.restore_state(arrays, dict(progress.get("objective", {})))
        start, tokens_seen = int(progress["step"]), int(progress.get("tokens_seen", 0))
        eval_before = progress.get("eval_before")
        say(f"resuming from step {start} of {steps}")
    if lead:
        write_json(out / "config.json", config.to_dict())
    metrics = None
    if lead:
        metrics = MetricsLog(
            out / "metrics.jsonl", resume_step=start if resume_from is not None else None
        )
    log = metrics.write if metrics else (lambda row: None)

    def save(step: int) -> None:
        arrays, info = objective.checkpoint_state(step)
        trainer.save(
            manager,
            step,
            dict(
                step=step,
                data_fingerprint=fingerprint,
                tokens_seen=tokens_seen,
                eval_before=eval_before,
                objective=info,
            ),
            arrays,
        )

    key = objective.eval_key
    if resume_from is None:
        evaluations["before"] = objective.evaluate(trainer)
        eval_before = evaluations["before"].get(key)
        if evaluations["before"]:
            log(dict(step=0, **evaluations["before"]))
            say(f"held-out before training: {_describe(evaluations['before'])}")

    from tqdm import tqdm

    last_saved = resume_from
    last_loss = None
    interrupted = False
    bar = tqdm(
        total=steps,
        initial=start,
        desc=objective.name,
        unit="step",
        dynamic_ncols=True,
        disable=not (config.progress and lead),
    )
    try:
        with _StopRequest() as stop:
            tick = time.perf_counter()
            for step in range(start, steps):
                rows = objective.host_batch(step, trainer)
                frozen = objective.frozen(step, trainer)
                m = trainer.step(trainer.place(rows, batch_axis=1), frozen)
                done = step + 1
                now = time.perf_counter()
                seen = objective.count_tokens(rows)
                tokens_seen += seen
                seconds, tick = now - tick, now
                rate = seen / max(seconds, 1e-9)
                if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
                    where = (
                        f"step {last_saved} in {out / CHECKPOINTS}"
                        if last_saved is not None
                        else "none was saved yet"
                    )
                    raise DivergenceError(
                        f"the loss became {m['loss']} (gradient norm {m['grad_norm']}) at step "
                        f"{done}; stopped without saving that state. The last good checkpoint "
                        f"is {where}. Lower learning_rate (now {config.learning_rate}) or raise "
                        "warmup_steps, then continue with --resume."
                    )
                last_loss = m["loss"]
                if step == start:
                    say(f"first step (compiles the step): {seconds:.1f} s")
                log(
                    dict(
                        step=done,
                        loss=m["loss"],
                        grad_norm=m["grad_norm"],
                        lr=float(trainer.schedule(step)),
                        **objective.step_metrics(m),
                        tokens_per_s=rate,
                        elapsed=bar.format_dict.get("elapsed", 0.0),
                    )
                )
                objective.after_step(step, trainer, m)
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{rate:,.0f}")
                if done % config.eval_every == 0 and done < steps:
                    held = objective.evaluate(trainer)
                    if held:
                        log(dict(step=done, **held))
                        bar.write(f"step {done}: held-out {_describe(held)}")
                if done % config.save_every == 0 or done == steps or stop.signal is not None:
                    save(done)
                    last_saved = done
                if stop.signal is not None:
                    interrupted = True
                    say(
                        f"stopped at step {done}; checkpoint saved in {out / CHECKPOINTS}. "
                        "Continue with --resume."
                    )
                    break
                tick = time.perf_counter()  # evaluating and saving are not training time
    finally:
        bar.close()
        manager.close()

    step_now = steps
    if interrupted:
        assert last_saved is not None  # an interrupted run saves its step before stopping
        step_now = last_saved
    result = TrainResult(
        step=step_now,
        out_dir=out,
        adapter=None,
        model_dir=None,
        eval_before=eval_before,
        eval_after=None,
        last_loss=last_loss,
        interrupted=interrupted,
        stats=getattr(objective, "stats", {}),
        evaluations=evaluations,
    )
    if interrupted:
        return result
    evaluations["after"] = objective.evaluate(trainer)
    result.eval_after = evaluations["after"].get(key)
    if evaluations["after"]:
        log(dict(step=steps, **evaluations["after"]))
        say(f"held-out after training: {_describe(evaluations['after'])}")
    trained = trainer.model()
    result.model = trained
    if lead:
        own = objective.save_result(trained, tokenizer, out, base)
        if own is not None:
            result.model_dir = own
        elif config.trains_lora:
            result.adapter = save_adapter(
                trained,
                out / "adapter",
                overwrite=True,
                extra=dict(base=base, method=config.method, steps=steps),
            )
        elif jax.process_count() > 1:
            # The official-checkpoint writer saves from one process through an Orbax barrier
            # that the other processes never reach, and weights split over hosts are not all
            # here: the run's own checkpoints hold the trained weights instead.
            print(
                f"note: a multi-process full fine-tune does not write {out / 'model'} yet; "
                f"the trained weights are in the last checkpoint in {out / CHECKPOINTS}",
                file=sys.stderr,
            )
        else:
            result.model_dir = save_full(trained, tokenizer, out / "model")
        png = plot_losses(out / "metrics.jsonl", out / "loss.png", ylabel=objective.loss_label)
        plots = objective.plots(out / "metrics.jsonl", out)
        write_json(
            out / "summary.json",
            dict(
                steps=steps,
                method=config.method,
                base=base,
                eval_before=eval_before,
                eval_after=result.eval_after,
                last_loss=last_loss,
                tokens_seen=tokens_seen,
                trainable_parameters=trainer.trainable_count,
                **objective.summary(),
                adapter=result.adapter,
                model=result.model_dir,
                loss_png=png,
                **({"plots": plots} if plots else {}),
            ),
        )
        say(f"wrote {result.adapter or result.model_dir}")
    return result
