"""Fine-tuning runs in a child process, for the tests that need one (started by test_finetune*).

A child is needed to kill a run (SIGKILL, SIGINT) and to see 8 fake CPU devices (the device
count is fixed when JAX starts). The child rebuilds the tiny model and the small tokenizer from
seeds (tests/support/tiny.py), reads its job from a JSON file and prints one JSON line as its
last line of output; the parent makes the assertions.

    python -m tests.support.finetune_worker JOB.json    (from the repository root)

Job kinds:
  train:   runs gemma_kit.finetune.train on the tiny model. "config" holds TrainConfig fields,
           "resume" whether to resume, "step_sleep" seconds to pause after each step (so the
           parent can interrupt a run between two given steps; the training itself is untouched).
  sharded: one training step on one device and on a data x fsdp mesh, for LoRA and full
           fine-tuning; reports losses, gradient norms and the largest parameter differences.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from typing import Any

from tests.support import tiny


def tiny_model_and_tokenizer(seed: int = 0, family: str = "gemma3"):
    tokenizer = tiny.small_tokenizer()
    config = {"gemma3": tiny.tiny_gemma3, "gemma2": tiny.tiny_gemma2}[family]()
    return tiny.random_model(config.replace(vocab_size=tokenizer.vocab_size), seed=seed), tokenizer


def run_train(job: dict) -> dict:
    from gemma_kit.finetune import TrainConfig, train
    from gemma_kit.training.trainer import Trainer

    pause = job.get("step_sleep", 0)
    if pause:
        original = Trainer.step

        def slow_step(self, batch, frozen=None):
            metrics = original(self, batch, frozen)
            time.sleep(pause)
            return metrics

        Trainer.step = slow_step  # type: ignore[method-assign]  # slowed down on purpose
    model, tokenizer = tiny_model_and_tokenizer(job.get("model_seed", 0))
    result = train(
        TrainConfig(**job["config"]),
        model=model,
        tokenizer=tokenizer,
        resume=job.get("resume", False),
    )
    return dict(
        step=result.step,
        interrupted=result.interrupted,
        eval_before=result.eval_before,
        eval_after=result.eval_after,
        adapter=str(result.adapter) if result.adapter else None,
    )


def run_sharded(job: dict) -> dict:
    """One step of each method on one device and on a mesh, from the same state and rows."""
    import jax
    import numpy as np
    import optax

    from gemma_kit.finetune import TrainConfig
    from gemma_kit.finetune.data import Example, pack
    from gemma_kit.finetune.train import Trainer
    from gemma_kit.lora import apply_lora
    from gemma_kit.sharding import make_mesh

    rng = np.random.default_rng(job.get("seed", 0))
    # Gemma 2 style (two layers, fused qkv_einsum, soft-caps): the smallest program to compile.
    model, tokenizer = tiny_model_and_tokenizer(job.get("model_seed", 0), "gemma2")
    length, rows = 24, 16
    examples = []
    for _ in range(20):
        n = int(rng.integers(4, length))
        tokens = rng.integers(0, tokenizer.vocab_size, n).astype(np.int32)
        examples.append(Example(tokens, rng.random(n) < 0.7, "random"))
    packed = pack(examples, length)
    host = packed.take(np.arange(rows) % len(packed))
    report: dict[str, Any] = dict(devices=len(jax.devices()), cases=[])
    for method in ("lora", "full"):
        if method == "lora":
            apply_lora(model, rank=4, alpha=8.0, seed=1)
            # Non-zero B, so that A gets gradients too.
            for _, m in model.iter_modules():
                lora = getattr(m, "lora", None)
                if lora is not None:
                    lora.b.value = jax.numpy.asarray(
                        rng.normal(0, 0.05, lora.b.shape), jax.numpy.float32
                    )
        else:
            from gemma_kit.lora import remove_lora

            remove_lora(model)
        results = {}
        for name, (data, fsdp, accum) in job["layouts"].items():
            config = TrainConfig(
                train_file="-",
                out_dir="-",
                steps=10,
                method=method,
                batch_size=rows,
                grad_accum=accum,
                learning_rate=1e-2,
                warmup_steps=0,
                mesh_data=data,
                mesh_fsdp=fsdp,
            ).validate()
            mesh = make_mesh(data=data, fsdp=fsdp) if data * fsdp > 1 else None
            trainer = Trainer(config, model, steps=10, mesh=mesh)
            # Copies (np.array), not views: the step donates its inputs' buffers.
            before = [np.array(x) for x in jax.tree.leaves(trainer.trainable)]
            batch = {k: v.reshape(accum, rows // accum, length) for k, v in host.items()}
            metrics = [trainer.step(trainer.place(batch, batch_axis=1)) for _ in range(2)]
            params = [np.array(x) for x in jax.tree.leaves(trainer.trainable)]
            moved = max(float(np.abs(a - b).max()) for a, b in zip(params, before))
            # Adam's first moment is linear in the gradients (0.9 * 0.1 g1 + 0.1 g2).
            mu = [
                np.array(x)
                for x in jax.tree.leaves(optax.tree_utils.tree_get(trainer.opt_state, "mu"))
            ]
            specs = {
                str(x.sharding.spec)
                for x in jax.tree.leaves(trainer.trainable)
                if hasattr(x.sharding, "spec")
            }
            results[name] = (metrics, params, sorted(specs), moved, mu)
        reference = results.pop("single")
        for name, (metrics, params, shardings, _, mu) in results.items():
            report["cases"].append(
                dict(
                    method=method,
                    layout=name,
                    shardings=shardings,
                    loss=[m["loss"] for m in metrics],
                    reference_loss=[m["loss"] for m in reference[0]],
                    grad_norm=[m["grad_norm"] for m in metrics],
                    reference_grad_norm=[m["grad_norm"] for m in reference[0]],
                    max_param_diff=max(
                        float(np.abs(a - b).max()) for a, b in zip(params, reference[1])
                    ),
                    max_param_change=reference[3],
                    mu_rel_diff=max(
                        float(np.abs(a - b).max() / np.abs(b).max())
                        for a, b in zip(mu, reference[4])
                    ),
                )
            )
    return report


def main(path: str) -> None:
    job = json.loads(pathlib.Path(path).read_text())
    result = {"train": run_train, "sharded": run_sharded}[job["kind"]](job)
    print(json.dumps(result), flush=True)
    sys.exit(130 if result.get("interrupted") else 0)


if __name__ == "__main__":
    main(sys.argv[1])
