"""The training core in child processes, and the toy objective its tests share.

Two kinds of job need a fresh process, since JAX fixes its devices when it starts:
  mesh:         8 fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8): two
                steps of a NON-SFT loss (signed token weights plus a pull towards frozen anchor
                factors, the anchor changing between the steps) on a data 2 x fsdp 4 mesh with 2
                micro-batches, and on one device with one batch; prints what each gave.
  distributed:  one of two processes joined by jax.distributed on 127.0.0.1 (CPU collectives,
                gloo), one device each: a fine-tuning run through gemma_kit.finetune.train (mesh
                data 2, checkpoints, adapter written by process 0), then one step of the toy loss
                with a frozen anchor; writes what it got to OUT/process-N.npz and prints JSON.
The child rebuilds the tiny model and the small tokenizer from seeds (tests/support/tiny.py); the
parent makes the assertions (tests/test_training.py), and computes the single-process reference with
the same functions of this module.

    python -m tests.support.training_worker JOB.json    (from the repository root)
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_kit.lora import apply_lora, lora_state
from gemma_kit.training import (
    Objective,
    SignedCrossEntropy,
    TrainConfig,
    micro_batches,
)
from tests.support import tiny

# --------------------------------------------------------------------------------------------
# The toy objective: policy-gradient-shaped rows, a frozen anchor, an EMA after each step.


def tiny_lora_model(seed: int = 0, rank: int = 4):
    """The tiny Gemma 2 model (two layers: the smallest program to compile) with LoRA whose B
    factors are random too (so that A gets gradients), built on this process's own device."""
    from gemma_kit.loading import model_from_params

    tokenizer = tiny.small_tokenizer()
    config = tiny.tiny_gemma2().replace(vocab_size=tokenizer.vocab_size)
    params = jax.device_put(tiny.random_params(config, seed=seed), jax.local_devices()[0])
    model = model_from_params(config, params)
    apply_lora(model, rank=rank, alpha=2.0 * rank, seed=seed + 1)
    rng = np.random.default_rng(seed + 2)
    for _, m in model.iter_modules():
        lora = getattr(m, "lora", None)
        if lora is not None:
            lora.b.value = jax.device_put(
                rng.normal(0, 0.05, lora.b.shape).astype(np.float32), jax.local_devices()[0]
            )
    return model, tokenizer


def completion_rows(
    seed: int, rows: int, length: int, vocab: int, advantages: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Rows of one prompt + completion each, as the policy-gradient loss takes them: packed-row
    arrays [rows, length] (padding at the end), weights = the row's advantage on its completion
    targets (0 on the prompt and padding), normaliser [rows] = its completion tokens."""
    rng = np.random.default_rng(seed)
    if advantages is None:
        advantages = rng.normal(0.0, 1.0, rows).astype(np.float32)
    out = {
        k: np.zeros((rows, length), np.int32)
        for k in ("tokens", "targets", "positions", "segments")
    }
    out["weights"] = np.zeros((rows, length), np.float32)
    out["normaliser"] = np.zeros((rows,), np.float32)
    for r in range(rows):
        n = int(rng.integers(length // 2, length + 1))  # sequence + 1 target
        prompt = int(rng.integers(2, n // 2))
        seq = rng.integers(4, vocab, n + 1).astype(np.int32)
        out["tokens"][r, :n] = seq[:n]
        out["targets"][r, :n] = seq[1:]
        out["positions"][r, :n] = np.arange(n)
        out["segments"][r, :n] = 1
        out["weights"][r, prompt:n] = advantages[r]  # targets after the prompt: the completion
        out["normaliser"][r] = n - prompt
    return out


@dataclasses.dataclass(frozen=True)
class AnchoredLoss:
    """Signed token weights (SignedCrossEntropy) plus strength * |theta - anchor|^2 per
    normaliser unit; the anchor (LoRA factors as a dict) is the frozen pytree."""

    chunk: int = 64
    strength: float = 0.5

    def __call__(self, model, batch, frozen):
        loss, normaliser, metrics = SignedCrossEntropy(self.chunk)(model, batch, frozen)
        current = jax.tree.leaves(nnx.to_pure_dict(lora_state(model)))
        pull = sum(
            jnp.sum((a - b) ** 2) for a, b in zip(current, jax.tree.leaves(frozen), strict=True)
        )
        return loss + self.strength * normaliser * pull, normaliser, dict(metrics, pull=pull)


@dataclasses.dataclass(frozen=True)
class ToyConfig(TrainConfig):
    """A config subclass as post-training configs are: no train_file, one field of its own."""

    ema_rate: float = 0.25
    RESUME_FIELDS = TrainConfig.RESUME_FIELDS + ("ema_rate",)  # a class constant, not a field

    def validate_data(self) -> None:
        pass  # its rows are drawn from (seed, step)


def lora_copy(tree) -> dict:
    """The LoRA factors of an nnx State (or model) as a dict of fresh arrays (never aliases of
    the trainer's, which the step donates)."""
    state = tree if isinstance(tree, nnx.State) else lora_state(tree)
    return jax.tree.map(jnp.array, nnx.to_pure_dict(state))


class AnchorObjective(Objective):
    """Steps on completion_rows(seed, step); the frozen anchor follows the trained factors by an
    EMA after each step, and is checkpointed with a count of its updates."""

    name = "anchored"

    def __init__(self, interrupt_after: int | None = None):
        self.interrupt_after = interrupt_after
        self.updates = 0
        self.loss = AnchoredLoss()

    def prepare(self, context) -> int:
        self.config = context.config
        self.vocab = context.model.config.vocab_size
        self.anchor = lora_copy(context.model)
        self.stats = {"kind": "toy"}
        return context.config.steps

    def host_batch(self, step: int, trainer=None) -> dict[str, np.ndarray]:
        c = self.config
        rows = completion_rows(c.seed * 1000 + step, c.batch_size, c.max_length, self.vocab)
        return micro_batches(rows, c.grad_accum)

    def frozen(self, step: int, trainer):
        return self.anchor

    def after_step(self, step: int, trainer, metrics) -> None:
        mu = self.config.ema_rate
        self.anchor = jax.tree.map(
            lambda a, t: (1 - mu) * a + mu * t, self.anchor, nnx.to_pure_dict(trainer.trainable)
        )
        self.updates += 1
        if self.interrupt_after == step + 1:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C would: save, stop, return

    def evaluate(self, trainer) -> dict[str, float]:
        rows = completion_rows(12345, self.config.micro_batch, self.config.max_length, self.vocab)
        loss, normaliser, _ = trainer.loss_sums(trainer.place(rows, batch_axis=0), self.anchor)
        return {"eval_loss": loss / normaliser}

    def checkpoint_state(self, step: int):
        return self.anchor, {"updates": self.updates}

    def plots(self, metrics_path, out_dir) -> dict:
        from gemma_kit.training.metrics import plot_metrics

        return {
            "pull": plot_metrics(
                metrics_path,
                out_dir / "pull.png",
                {"pull": "|theta - anchor|^2, summed over micro-batches"},
                ylabel="squared distance",
                smooth=("pull",),
            )
        }

    def restore_state(self, arrays, info) -> None:
        self.anchor, self.updates = arrays, info["updates"]


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


# --------------------------------------------------------------------------------------------
# Jobs


def anchor_steps(trainer, rows: dict[str, np.ndarray], anchors: list) -> list[dict]:
    """One step per anchor on the same rows ([grad_accum, micro, ...] host arrays)."""
    return [trainer.step(trainer.place(rows, batch_axis=1), anchor) for anchor in anchors]


def step_config(grad_accum: int, data: int = 1, fsdp: int = 1, rows: int = 8) -> ToyConfig:
    return ToyConfig(
        out_dir="-",
        steps=10,
        batch_size=rows,
        grad_accum=grad_accum,
        learning_rate=1e-2,
        warmup_steps=0,
        max_length=24,
        mesh_data=data,
        mesh_fsdp=fsdp,
    ).validate()


def anchors_for(model, count: int) -> list[dict]:
    """`count` anchors: the model's factors moved by a different random offset each."""
    rng = np.random.default_rng(7)
    base = lora_copy(model)
    return [
        jax.tree.map(lambda x: x + rng.normal(0, 0.02, x.shape).astype(np.float32), base)
        for _ in range(count)
    ]


def run_mesh(job: dict) -> dict:
    from gemma_kit.sharding import make_mesh
    from gemma_kit.training import Trainer

    model, tokenizer = tiny_lora_model()
    host = completion_rows(3, 16, 24, tokenizer.vocab_size)
    anchors = anchors_for(model, 2)
    results: dict[str, dict[str, Any]] = {}
    for name, (data, fsdp, accum) in job["layouts"].items():
        config = step_config(accum, data, fsdp, rows=16)
        mesh = make_mesh(data=data, fsdp=fsdp) if data * fsdp > 1 else None
        trainer = Trainer(config, model, 10, AnchoredLoss(), mesh)
        before = leaves(trainer.trainable)
        metrics = anchor_steps(trainer, micro_batches(host, accum), anchors)
        import optax

        mu = optax.tree_utils.tree_get(trainer.opt_state, "mu")
        results[name] = dict(
            metrics=metrics,
            params=leaves(trainer.trainable),
            mu=leaves(mu),
            moved=max(
                float(np.abs(a - b).max()) for a, b in zip(leaves(trainer.trainable), before)
            ),
        )
    ref = results.pop("single")
    report: dict[str, Any] = dict(devices=len(jax.devices()), cases=[])
    for name, got in results.items():
        report["cases"].append(
            dict(
                layout=name,
                metrics=got["metrics"],
                reference_metrics=ref["metrics"],
                max_param_diff=max(
                    float(np.abs(a - b).max()) for a, b in zip(got["params"], ref["params"])
                ),
                mu_rel_diff=max(
                    float(np.abs(a - b).max() / np.abs(b).max())
                    for a, b in zip(got["mu"], ref["mu"])
                ),
                moved=ref["moved"],
            )
        )
    return report


def finetune_config(data_file: str, out_dir: str, **changes) -> TrainConfig:
    """The fine-tuning run of the two-process test (and of its one-process reference)."""
    return TrainConfig(
        train_file=data_file,
        out_dir=out_dir,
        steps=2,
        batch_size=4,
        max_length=48,
        learning_rate=1e-2,
        warmup_steps=0,
        eval_fraction=0.1,
        save_every=1,
        progress=False,
        **changes,
    )


def distributed_job(model, tokenizer, config: TrainConfig, mesh) -> dict[str, list]:
    """What the two-process test compares: a fine-tuning run, then one toy step."""
    from gemma_kit.finetune import train
    from gemma_kit.training import Trainer

    result = train(config, model=model, tokenizer=tokenizer)
    losses = (
        [
            json.loads(line).get("loss")
            for line in (pathlib.Path(config.out_dir) / "metrics.jsonl").read_text().splitlines()
        ]
        if jax.process_index() == 0
        else []
    )
    trainer = Trainer(step_config(1, data=config.mesh_data), model, 10, AnchoredLoss(), mesh)
    rows = micro_batches(completion_rows(5, 8, 24, tokenizer.vocab_size), 1)
    metrics = anchor_steps(trainer, rows, anchors_for(model, 1))[0]
    return dict(
        finetuned=leaves(lora_state(result.model)),
        toy=leaves(trainer.trainable),
        toy_metrics=[metrics[k] for k in sorted(metrics)],
        eval=[result.eval_before, result.eval_after],
        losses=[x for x in losses if x],
    )


def run_distributed(job: dict) -> dict:
    from gemma_kit.sharding import make_mesh
    from gemma_kit.training import initialize_distributed

    changes = dict(
        distributed=True,
        coordinator_address=f"127.0.0.1:{job['port']}",
        num_processes=2,
        process_id=job["process"],
        mesh_data=2,
    )
    config = finetune_config(job["data"], job["out"], **changes)
    initialize_distributed(config)  # before this process makes any array
    model, tokenizer = tiny_lora_model()
    got = distributed_job(model, tokenizer, config, make_mesh(data=2))
    path = pathlib.Path(job["out"]).parent / f"process-{jax.process_index()}.npz"
    arrays: dict[str, Any] = {
        f"{k}_{i}": np.asarray(v) for k, vs in got.items() for i, v in enumerate(vs)
    }
    np.savez(path, **arrays)
    return dict(
        process=jax.process_index(),
        processes=jax.process_count(),
        devices=len(jax.devices()),
        local_devices=len(jax.local_devices()),
        adapter=(pathlib.Path(job["out"]) / "adapter").is_dir(),
        npz=str(path),
    )


def main(path: str) -> None:
    job = json.loads(pathlib.Path(path).read_text())
    result = {"mesh": run_mesh, "distributed": run_distributed}[job["kind"]](job)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
