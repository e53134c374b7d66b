"""Distillation runs in child processes, for the tests that need one (tests/test_distill.py).

A child is needed to kill a run (SIGKILL) and to see 8 fake CPU devices or join a second
process (JAX fixes its devices when it starts). The child rebuilds the tiny student and teacher
and the small tokenizer from seeds (tests/support/tiny.py), reads its job from a JSON file and
prints one JSON line as its last line of output; the parent makes the assertions.

    python -m tests.support.distill_worker JOB.json    (from the repository root)

Job kinds:
  train:        gemma_kit.posttrain.distill.train_distill on the tiny models; "config" holds
                DistillConfig fields, "resume" whether to resume, "step_sleep" seconds to pause
                after each step (so that the parent can kill the run between two given steps).
  mesh:         two distillation steps (DistillLoss: JSD with a separate teacher, whose values
                change between the steps; sampled top-K with the student's own base as the
                teacher) on a data x fsdp mesh of 8 devices and on one device; reports both.
  distributed:  one of two processes joined by jax.distributed on 127.0.0.1 (one device each),
                a data = 2 mesh over both: the same two JSD steps; writes OUT/process-N.npz.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

from tests.support import tiny

LR = 1e-2


def tiny_models(family: str = "gemma3"):
    """(student, teacher, tokenizer): the tiny model of `family` from seeds 0 and 1, on this
    process's own device (jax.devices()[0] is process 0's in a two-process run)."""
    import jax

    from gemma_kit.loading import model_from_params

    tokenizer = tiny.small_tokenizer()
    config = {"gemma3": tiny.tiny_gemma3, "gemma2": tiny.tiny_gemma2}[family]()
    config = config.replace(vocab_size=tokenizer.vocab_size)
    device = jax.local_devices()[0]
    student, teacher = (
        model_from_params(config, jax.device_put(tiny.random_params(config, seed=seed), device))
        for seed in (0, 1)
    )
    return student, teacher, tokenizer


def run_train(job: dict) -> dict:
    from gemma_kit.posttrain.distill import train_distill
    from gemma_kit.posttrain.distill_config import DistillConfig
    from gemma_kit.training.trainer import Trainer

    pause = job.get("step_sleep", 0)
    if pause:
        original = Trainer.step

        def slow_step(self, batch, frozen=None):
            metrics = original(self, batch, frozen)
            time.sleep(pause)
            return metrics

        setattr(Trainer, "step", slow_step)  # noqa: B010 (patching the class, on purpose)
    student, teacher, tokenizer = tiny_models()
    result = train_distill(
        DistillConfig(**job["config"]),
        student=student,
        teacher=teacher,
        tokenizer=tokenizer,
        resume=job.get("resume", False),
    )
    return dict(
        step=result.step,
        interrupted=result.interrupted,
        eval_before=result.eval_before,
        eval_after=result.eval_after,
    )


# --------------------------------------------------------------------------------------------
# One-step comparisons on other devices / processes


def step_rows(rows: int, vocab: int, seed: int = 4) -> dict:
    """Aligned (student, teacher) rows of random prompts and completions, the teacher's prompt
    a few tokens longer (a hidden prefix), with token-mean weights and top-K keys."""
    import numpy as np

    from gemma_kit.posttrain.distill import paired_rows, reduction_weights
    from gemma_kit.posttrain.rollout import Rollout

    rng = np.random.default_rng(seed)
    N = 8
    lengths = rng.integers(3, N + 1, rows)
    students = [list(rng.integers(4, vocab, int(rng.integers(3, 9)))) for _ in range(rows)]
    teachers = [list(rng.integers(4, vocab, 3)) + s for s in students]
    out = Rollout(
        prompt_index=np.arange(rows, dtype=np.int32),
        prompt_ids=students,
        completion_ids=rng.integers(4, vocab, (rows, N)).astype(np.int32),
        completion_mask=np.arange(N)[None] < lengths[:, None],
        logprobs=np.zeros((rows, N), np.float32),
        finish_reasons=[""] * rows,
        texts=[""] * rows,
    )
    batch = paired_rows(out, students, teachers, 24, 32)
    batch["loss_weights"], batch["normaliser"] = reduction_weights(
        batch["weights"], batch["segments"], "token-mean"
    )
    batch["topk_keys"] = np.arange(2 * rows, dtype=np.uint32).reshape(rows, 2)
    return batch


def step_cases(
    student,
    teacher,
    tokenizer,
    mesh,
    data: int,
    fsdp: int,
    accum: int,
    rows: int = 16,
    cases=("jsd", "topk"),
) -> dict[str, dict]:
    """Two steps of each case on `mesh` (None: one device); what each gave."""
    import jax
    import numpy as np
    import optax
    from flax import nnx

    from gemma_kit.lora import LoRAParam, apply_lora
    from gemma_kit.posttrain import losses
    from gemma_kit.posttrain.distill import DistillLoss
    from gemma_kit.posttrain.distill_config import DistillConfig
    from gemma_kit.posttrain.policy import reference_values
    from gemma_kit.training import Trainer, micro_batches

    def leaves(tree):
        return [np.asarray(x) for x in jax.tree.leaves(tree)]

    host = micro_batches(step_rows(rows, tokenizer.vocab_size), accum)
    out = {}
    for case in cases:
        config = DistillConfig(
            teacher="t",
            prompts_file="p",
            out_dir="-",
            steps=10,
            batch_size=rows,
            grad_accum=accum,
            learning_rate=LR,
            warmup_steps=0,
            mesh_data=data,
            mesh_fsdp=fsdp,
        ).validate()
        model = nnx.merge(*nnx.split(student))
        apply_lora(model, rank=4, alpha=8.0, seed=1)
        # B factors made non-zero (so that A gets gradients, and the student is not its base).
        rng = np.random.default_rng(5)
        for _, m in nnx.iter_modules(model):
            lora = getattr(m, "lora", None)
            if lora is not None:
                lora.b.value = jax.device_put(
                    rng.normal(0, 0.05, lora.b.shape).astype(np.float32), jax.local_devices()[0]
                )
        graphdef, state = nnx.split(teacher)
        if case == "jsd":
            loss = DistillLoss(
                divergence=losses.Divergence("jsd", beta=0.5), teacher=graphdef, chunk=16
            )
            other = jax.tree.map(lambda x: x * 1.01, nnx.to_pure_dict(state))
            frozen = [{"teacher": nnx.to_pure_dict(state)}, {"teacher": other}]
        else:  # the student's own base network as the teacher (LoRA B = 0)
            loss = DistillLoss(topk=5, chunk=16)
            frozen = [{"teacher": reference_values(nnx.state(model, LoRAParam))}] * 2
        trainer = Trainer(config, model, 10, loss, mesh)
        before = leaves(trainer.trainable)
        metrics = [trainer.step(trainer.place(host, batch_axis=1), f) for f in frozen]
        mu = optax.tree_utils.tree_get(trainer.opt_state, "mu")
        after = leaves(trainer.trainable)
        out[case] = dict(
            metrics=metrics,
            params=after,
            mu=leaves(mu),
            moved=max(float(np.abs(a - b).max()) for a, b in zip(after, before)),
        )
    return out


def compare(got: dict, ref: dict) -> dict:
    import numpy as np

    return dict(
        metrics=got["metrics"],
        reference_metrics=ref["metrics"],
        max_param_diff=max(
            float(np.abs(a - b).max()) for a, b in zip(got["params"], ref["params"])
        ),
        mu_rel_diff=max(
            float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(got["mu"], ref["mu"])
        ),
        moved=ref["moved"],
    )


def run_mesh(job: dict) -> dict:
    import jax

    from gemma_kit.sharding import make_mesh

    student, teacher, tokenizer = tiny_models("gemma2")
    single = step_cases(student, teacher, tokenizer, None, 1, 1, 1)
    meshed = step_cases(student, teacher, tokenizer, make_mesh(data=2, fsdp=4), 2, 4, 2)
    return dict(
        devices=len(jax.devices()),
        cases={case: compare(meshed[case], single[case]) for case in single},
    )


def run_distributed(job: dict) -> dict:
    import jax
    import numpy as np

    from gemma_kit.posttrain.distill_config import DistillConfig
    from gemma_kit.sharding import make_mesh
    from gemma_kit.training import initialize_distributed

    config = DistillConfig(
        teacher="t",
        prompts_file="p",
        out_dir="-",
        steps=1,
        distributed=True,
        coordinator_address=f"127.0.0.1:{job['port']}",
        num_processes=2,
        process_id=job["process"],
        mesh_data=2,
    )
    initialize_distributed(config)  # before this process makes any array
    student, teacher, tokenizer = tiny_models("gemma2")
    got = step_cases(
        student, teacher, tokenizer, make_mesh(data=2), 2, 1, 1, rows=8, cases=("jsd",)
    )["jsd"]
    path = pathlib.Path(job["out"]) / f"process-{jax.process_index()}.npz"
    arrays = {f"params_{i}": p for i, p in enumerate(got["params"])}
    arrays.update(
        {
            f"metrics_{i}": np.asarray([m[k] for k in sorted(m)])
            for i, m in enumerate(got["metrics"])
        }
    )
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return dict(
        process=jax.process_index(),
        processes=jax.process_count(),
        devices=len(jax.devices()),
        npz=str(path),
        moved=got["moved"],
    )


def main(path: str) -> None:
    job = json.loads(pathlib.Path(path).read_text())
    kinds = {"train": run_train, "mesh": run_mesh, "distributed": run_distributed}
    print(json.dumps(kinds[job["kind"]](job)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
