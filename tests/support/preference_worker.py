"""Shared pieces of the reward-model, WARM and DPO tests, and their child-process jobs.

The toy preference set is separable by construction: every chosen completion is about loops, every
rejected one about exceptions, and each prompt appears with both, so a reward model (or a DPO
policy) can only tell them apart by the completion. The tiny base is the Gemma 3 model of
tests/support/tiny.py exported as a transformers folder (config.json carries its custom size, and
tokenizer.model sits inside), so `base = FOLDER` reloads it anywhere: in a child process, from a
saved LoRA reward model, or from the command line.

Child jobs (a process fixes its devices when JAX starts, and a SIGKILL needs a process to kill):
    python -m tests.support.preference_worker JOB.json    (from the repository root)
  kill:  a reward-model run that SIGKILLs itself after step `kill_after` (a checkpoint was saved
         at each multiple of save_every before it); prints nothing (it dies).
  mesh:  one DPO step (reference = the base, LoRA) on one device and on a data 2 x fsdp 4 mesh
         of 8 CPU devices; prints the metrics and the largest parameter difference as JSON.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import sys
from typing import Any

import numpy as np

from tests.support import tiny

GOOD = [
    " the loop ends here",
    " the loop runs over the items",
    " a for loop over a sequence",
    " the while loop ends",
    " each item of the loop",
]
BAD = [
    " raise an exception",
    " it raises an error",
    " the error is raised here",
    " an exception is raised",
    " the try statement fails",
]
PROMPTS = ["The for statement", "while", "An if statement", "try", "with", "The function"]


def toy_rows(n: int, seed: int = 0, *, margin: bool = False) -> list[dict]:
    """n preference rows: chosen from GOOD, rejected from BAD, prompts in turn."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        row: dict[str, Any] = {
            "prompt": PROMPTS[i % len(PROMPTS)],
            "chosen": GOOD[rng.integers(len(GOOD))],
            "rejected": BAD[rng.integers(len(BAD))],
        }
        if margin:
            row["margin"] = float(rng.integers(0, 3)) * 0.25
        rows.append(row)
    return rows


def write_jsonl(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_base(folder: pathlib.Path, seed: int = 0) -> tuple[pathlib.Path, object, object]:
    """(folder, model, tokenizer): the tiny Gemma 3 model written as a transformers folder
    (with tokenizer.model), built from `seed` (the same arrays in every process)."""
    from gemma_kit.checkpoint.hf_export import export_hf

    tokenizer = tiny.small_tokenizer()
    config = tiny.tiny_gemma3().replace(name="tiny-prefs", vocab_size=tokenizer.vocab_size)
    model = tiny.random_model(config, seed=seed)
    if not (folder / "config.json").is_file():
        export_hf(model, folder, tokenizer=tokenizer, progress=False)
    return folder, model, tokenizer


def rm_settings(data: pathlib.Path, out: pathlib.Path, base: pathlib.Path, **changes) -> dict:
    """The reward-model run of the resume test (RewardConfig fields)."""
    settings = dict(
        train_file=str(data),
        out_dir=str(out),
        base=str(base),
        steps=6,
        batch_size=4,
        grad_accum=2,
        learning_rate=1e-2,
        warmup_steps=1,
        save_every=2,
        eval_every=3,
        eval_fraction=0.25,
        progress=False,
        method="full",
        seed=3,
        data_seed=5,
    )
    return {**settings, **changes}


# --------------------------------------------------------------------------------------------
# Jobs


def run_kill(job: dict) -> dict:
    from gemma_kit.posttrain.reward_train import RewardConfig, RewardTraining
    from gemma_kit.training import run

    class Killed(RewardTraining):
        def after_step(self, step, trainer, metrics):
            if step + 1 == job["kill_after"]:
                os.kill(os.getpid(), signal.SIGKILL)  # no handler, no save: the process is gone

    run(RewardConfig(**job["config"]), Killed())
    return {"error": "the run was not killed"}


def mesh_pairs(tokenizer, n: int = 16):
    """n toy pairs as Preferences (tokenised here, so no file is needed)."""
    import tempfile

    from gemma_kit.posttrain.preferences import load_preferences

    with tempfile.TemporaryDirectory() as tmp:
        path = write_jsonl(pathlib.Path(tmp) / "pairs.jsonl", toy_rows(n, seed=11))
        return load_preferences(path, tokenizer)


def lora_policy(model, seed: int = 4):
    """The tiny model with LoRA whose B factors are random (a policy that is not its base)."""
    import jax
    from flax import nnx

    from gemma_kit.lora import LoRAParam, apply_lora

    model = nnx.merge(*nnx.split(model))
    apply_lora(model, rank=4, alpha=8.0, seed=seed)
    rng = np.random.default_rng(seed)
    state = nnx.state(model, LoRAParam)
    values = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            x if p[-1].key == "a" else jax.numpy.asarray(rng.normal(0, 0.2, x.shape), np.float32)
        ),
        nnx.to_pure_dict(state),
    )
    nnx.replace_by_pure_dict(state, values)
    nnx.update(model, state)
    return model


def run_mesh(job: dict) -> dict:
    import jax

    from gemma_kit.posttrain.dpo import DPO, DPOConfig
    from gemma_kit.posttrain.preference_training import PreferenceData
    from gemma_kit.sharding import make_mesh
    from gemma_kit.training import RunContext, Trainer, micro_batches

    folder, model, tokenizer = tiny_base(pathlib.Path(job["base"]))
    pairs = mesh_pairs(tokenizer)
    results: dict[str, dict[str, Any]] = {}
    for name, (data, fsdp, accum) in job["layouts"].items():
        config = DPOConfig(
            train_file="-",
            out_dir="-",
            steps=4,
            batch_size=16,
            grad_accum=accum,
            learning_rate=1e-2,
            warmup_steps=0,
            eval_fraction=0.0,
            mesh_data=data,
            mesh_fsdp=fsdp,
            beta=0.5,
        ).validate()
        objective = DPO()
        policy = lora_policy(model)
        context = RunContext(config, policy, tokenizer, pathlib.Path("-"), True, lambda s: None)
        objective.prepare_with(context, PreferenceData.from_pairs(pairs))
        mesh = make_mesh(data=data, fsdp=fsdp) if data * fsdp > 1 else None
        trainer = Trainer(
            config, context.model, 4, objective.loss, mesh, trainable=objective.trainable(config)
        )
        metrics = []
        for step in range(2):
            rows = micro_batches(pairs.take(np.arange(16)), accum)
            metrics.append(
                trainer.step(trainer.place(rows, batch_axis=1), objective.frozen(step, trainer))
            )
        results[name] = dict(
            metrics=metrics, params=[np.asarray(x) for x in jax.tree.leaves(trainer.trainable)]
        )
    ref, got = results["single"], results["mesh"]
    return dict(
        devices=len(jax.devices()),
        metrics=got["metrics"],
        reference_metrics=ref["metrics"],
        max_param_diff=max(
            float(np.abs(a - b).max()) for a, b in zip(got["params"], ref["params"])
        ),
    )


def main(path: str) -> None:
    job = json.loads(pathlib.Path(path).read_text())
    result = {"kill": run_kill, "mesh": run_mesh}[job["kind"]](job)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
