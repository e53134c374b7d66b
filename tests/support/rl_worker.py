"""RL runs on the tiny model, in this process or a child one (tests/test_rl.py).

A child process is needed to kill a run with SIGKILL and to see 8 fake CPU devices. The child
rebuilds the tiny model, the small tokenizer and the prompts from seeds, reads its job from a
JSON file and prints one JSON line last; the parent makes the assertions.

    python -m tests.support.rl_worker JOB.json    (from the repository root)

Job kinds:
  train:  gemma_kit.posttrain.rl.train_rl on the tiny model ("config": RLConfig fields,
          "resume", "step_sleep": seconds to pause after each step so that the parent can kill
          the run between two given steps).
  mesh:   one RL step (rollouts, rewards, the scoring pass, the update, the EMA anchor) on one
          device and on a data 2 x fsdp 4 mesh of 8 devices, from the same state; reports what
          each gave.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

from tests.support import tiny

WORDS = tiny.SMALL_TEXT.split()


def tiny_model(seed: int = 0):
    """The tiny Gemma 2 model (two layers: the smallest program to compile), vocabulary of the
    small tokenizer."""
    tokenizer = tiny.small_tokenizer()
    config = tiny.tiny_gemma2().replace(vocab_size=tokenizer.vocab_size)
    return tiny.random_model(config, seed=seed), tokenizer


def write_prompts(path: pathlib.Path, count: int = 12) -> pathlib.Path:
    """`count` plain-text prompts of 3 to 6 words of CPython's reference text."""
    rows = [" ".join(WORDS[7 * i : 7 * i + 3 + i % 4]) for i in range(count)]
    path.write_text("".join(json.dumps({"prompt": r}) + "\n" for r in rows))
    return path


def letter_reward(prompts, completions) -> list[float]:
    """A deterministic text reward: the share of the letters e and t in the completion."""
    return [sum(c.count(x) for x in "et") / max(len(c), 1) for c in completions]


def run_train(job: dict) -> dict:
    from gemma_kit.posttrain.rl import train_rl
    from gemma_kit.posttrain.rl_config import RLConfig
    from gemma_kit.training.trainer import Trainer

    pause = job.get("step_sleep", 0)
    if pause:
        original = Trainer.step

        def slow_step(self, batch, frozen=None):
            metrics = original(self, batch, frozen)
            time.sleep(pause)
            return metrics

        Trainer.step = slow_step  # type: ignore[method-assign]  # slowed down on purpose
    model, tokenizer = tiny_model()
    result = train_rl(
        RLConfig(**job["config"]),
        reward=letter_reward,
        model=model,
        tokenizer=tokenizer,
        resume=job.get("resume", False),
    )
    return dict(
        step=result.step,
        interrupted=result.interrupted,
        eval_before=result.eval_before,
        eval_after=result.eval_after,
    )


def one_step(config, model, tokenizer) -> dict:
    """host_batch, step, after_step of step 0, as the run loop does them."""
    import jax
    import numpy as np

    from gemma_kit.posttrain.rl import PolicyOptimisation
    from gemma_kit.training.model import build_model
    from gemma_kit.training.objective import RunContext
    from gemma_kit.training.trainer import Trainer

    objective = PolicyOptimisation(letter_reward)
    objective.check_inputs(config)
    model, tokenizer, _ = build_model(config, model, tokenizer)
    steps = objective.prepare(
        RunContext(config, model, tokenizer, pathlib.Path(config.out_dir), True, lambda _: None)
    )
    mesh = None
    if config.mesh_data * config.mesh_fsdp > 1:
        from gemma_kit.sharding import make_mesh

        mesh = make_mesh(data=config.mesh_data, fsdp=config.mesh_fsdp)
    trainer = Trainer(config, model, steps, objective.loss, mesh)
    rows = objective.host_batch(0, trainer)
    metrics = trainer.step(trainer.place(rows, batch_axis=1), objective.frozen(0, trainer))
    objective.after_step(0, trainer, metrics)
    metrics.update(objective.step_metrics(metrics))

    def leaves(tree):
        return [np.asarray(x) for x in jax.tree.leaves(tree)]

    return dict(
        metrics=metrics,
        params=leaves(trainer.trainable),
        anchor=leaves(objective.anchor),
        # [grad_accum, micro, T] -> [rows, T]: the layouts split the rows differently
        tokens=rows["tokens"].reshape(-1, rows["tokens"].shape[-1]).tolist(),
        weights=rows["weights"].reshape(-1, rows["weights"].shape[-1]),
    )


def run_mesh(job: dict) -> dict:
    import jax
    import numpy as np

    from gemma_kit.posttrain.rl_config import RLConfig

    model, tokenizer = tiny_model()
    results = {}
    for name, (data, fsdp, accum) in job["layouts"].items():
        config = RLConfig(
            **dict(job["config"], mesh_data=data, mesh_fsdp=fsdp, grad_accum=accum)
        ).validate()
        results[name] = one_step(config, model, tokenizer)
    ref = results.pop("single")
    cases = []
    for name, got in results.items():
        cases.append(
            dict(
                layout=name,
                metrics=got["metrics"],
                reference_metrics=ref["metrics"],
                same_tokens=got["tokens"] == ref["tokens"],
                max_weight_diff=float(np.abs(got["weights"] - ref["weights"]).max()),
                max_weight=float(np.abs(ref["weights"]).max()),
                max_param_diff=max(
                    float(np.abs(a - b).max()) for a, b in zip(got["params"], ref["params"])
                ),
                max_anchor_diff=max(
                    float(np.abs(a - b).max()) for a, b in zip(got["anchor"], ref["anchor"])
                ),
            )
        )
    return dict(devices=len(jax.devices()), cases=cases)


def main(path: str) -> None:
    job = json.loads(pathlib.Path(path).read_text())
    result = {"train": run_train, "mesh": run_mesh}[job["kind"]](job)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
