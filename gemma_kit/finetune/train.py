"""Supervised fine-tuning (LoRA, QLoRA or full) as one objective on the training core.

    from gemma_kit.finetune import TrainConfig, train
    result = train(TrainConfig(train_file="data.jsonl", out_dir="runs/a", steps=200))

The run itself (model, compiled step, mesh, checkpoints, --resume, Ctrl-C, NaN stop, metrics,
plots, adapter/ or model/) is gemma_kit.training.loop.run; this module supplies the objective,
`FineTuning`: packed rows of the JSONL data (gemma_kit.finetune.data), batch k a pure function of
k and the seed; the loss is gemma_kit.training.losses.CrossEntropy, the token cross-entropy summed
over the weighted targets and divided by their number (so A micro-batches of b rows give the
update of one batch of A * b rows); the held-out loss and perplexity before, every eval_every
steps and after. Rows with images carry embeddings made once by the frozen image encoder
(ImageBank).

OUT_DIR receives: config.json, checkpoints/, metrics.jsonl (training rows: step, loss,
grad_norm, lr, loss_tokens, tokens_per_s, elapsed; held-out rows: step, eval_loss, eval_ppl),
loss.png, summary.json, and adapter/ (LoRA, QLoRA) or model/ (full).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx

from gemma_kit.finetune.data import Dataset, Rows, load_dataset, read_jsonl
from gemma_kit.training.config import TrainConfig
from gemma_kit.training.loop import TrainResult, run
from gemma_kit.training.losses import CrossEntropy, token_loss_sums
from gemma_kit.training.model import FROZEN_IN_FULL, build_model
from gemma_kit.training.objective import Objective, RunContext
from gemma_kit.training.optimizer import make_optimizer
from gemma_kit.training.trainer import Trainer as CoreTrainer
from gemma_kit.training.trainer import micro_batches

# The packed-row loss under its earlier name: (sum of weighted token losses, sum of weights).
loss_sums = token_loss_sums

__all__ = [
    "FROZEN_IN_FULL",
    "FineTuning",
    "ImageBank",
    "TrainResult",
    "Trainer",
    "build_model",
    "loss_sums",
    "make_optimizer",
    "total_steps",
    "train",
]


def total_steps(config: TrainConfig, data: Dataset) -> int:
    if config.steps is not None:
        return config.steps
    assert config.epochs is not None  # TrainConfig.validate: exactly one of steps and epochs
    return max(1, math.ceil(config.epochs * len(data.train) / config.batch_size))


class ImageBank:
    """The image embeddings of every image file of the data, made once by the frozen encoder.

    The encoder (SigLIP, ~0.4 B parameters) does not train, so its output for an image never
    changes: computing it once, instead of in every step that shows the image, keeps the
    training step as cheap as a text-only one. Embeddings are held on the host in the compute
    dtype ([M, D] per image) and gathered per batch.
    """

    def __init__(
        self, model, files: list[str], *, batch: int = 8, max_images: int, progress: bool = True
    ):
        from tqdm import tqdm

        from gemma_kit.vision import preprocess_image

        model.require_vision()
        size = model.config.vision.image_size
        graphdef, state = nnx.split(model)
        encode = jax.jit(lambda s, px: nnx.merge(graphdef, s).encode_images(px))
        self.index = {f: i for i, f in enumerate(files)}
        self.max_images = max_images
        chunks = []
        for start in tqdm(
            range(0, len(files), batch), desc="encoding images", unit="batch", disable=not progress
        ):
            group = files[start : start + batch]
            pixels = np.stack([preprocess_image(f, size) for f in group])
            if len(group) < batch:  # one compiled shape for every group
                pixels = np.concatenate(
                    [pixels, np.zeros((batch - len(group), *pixels.shape[1:]), pixels.dtype)]
                )
            chunks.append(np.asarray(encode(state, pixels))[: len(group)])
        self.embeddings = np.concatenate(chunks)  # [files, M, D]

    def gather(self, rows: list[tuple[str, ...]]) -> np.ndarray:
        """[rows, max_images, M, D]: each row's images in slot order, zero-padded."""
        M, D = self.embeddings.shape[1:]
        out = np.zeros((len(rows), self.max_images, M, D), self.embeddings.dtype)
        for r, files in enumerate(rows):
            for k, f in enumerate(files):
                out[r, k] = self.embeddings[self.index[f]]
        return out


# ------------------------------------------------------------------------------------------
# Batches and the held-out loss (shared by the objective and the Trainer below)


def rows_batch(rows: Rows, index, images: ImageBank | None) -> dict[str, np.ndarray]:
    """Host arrays of rows `index` of `rows`, with their image embeddings if any."""
    batch = rows.take(index)
    if images is not None:
        batch["image_embeddings"] = images.gather(rows.images_of(index))
    return batch


def step_batch(
    config: TrainConfig, data: Dataset, step: int, images: ImageBank | None
) -> dict[str, np.ndarray]:
    """The rows of optimizer step `step` as [grad_accum, micro_batch, ...] host arrays."""
    index = data.batch_index(step, config.batch_size, config.seed)
    return micro_batches(rows_batch(data.train, index, images), config.grad_accum)


def held_out_loss(trainer: CoreTrainer, data: Dataset, images: ImageBank | None) -> float | None:
    """Mean loss per token over the held-out rows (None without any), micro_batch rows at a
    time; the last batch is padded with rows that count nothing."""
    rows = data.eval
    if rows is None:
        return None
    cap = trainer.config.eval_max_rows
    n = len(rows) if cap is None else min(len(rows), cap)
    b = trainer.config.micro_batch
    total = count = 0.0
    for start in range(0, n, b):
        index = np.arange(start, start + b)
        real = index < n
        batch = rows_batch(rows, np.where(real, index, 0), images)
        batch["weights"] = batch["weights"] * real[:, None]  # padding rows count nothing
        s, c, _ = trainer.loss_sums(trainer.place(batch, batch_axis=0))
        total += s
        count += c
    return total / max(count, 1.0)


# ------------------------------------------------------------------------------------------
# The objective


class FineTuning(Objective):
    """Supervised fine-tuning on the JSONL data of config.train_file (see the module doc)."""

    name = "fine-tuning"
    eval_key = "eval_loss"
    loss_label = "cross-entropy (nats / token)"

    def __init__(self):
        self.data: Dataset | None = None
        self.images: ImageBank | None = None
        self.stats = {}

    def check_inputs(self, config: TrainConfig) -> None:
        # Missing or empty data files are reported before seconds of loading the model.
        for path in (config.train_file, config.eval_file):
            if path is not None:
                read_jsonl(path)

    def prepare(self, context: RunContext) -> int:
        config, model = context.config, context.model
        self.config = config
        self.loss = CrossEntropy(config.loss_chunk)
        vision = getattr(model, "has_vision", False)
        data = load_dataset(
            config.train_file,
            context.tokenizer,
            max_length=config.max_length,
            eval_file=config.eval_file,
            eval_fraction=config.eval_fraction,
            packing=config.packing,
            skip_bad_rows=config.skip_bad_rows,
            seed=config.seed,
            num_soft_tokens=model.config.vision.num_soft_tokens if vision else None,
        )
        s = data.stats
        skipped = (
            f"; skipped {s['skipped']} bad rows, first: {s['skipped_reasons'][0]}"
            if s["skipped"]
            else ""
        )
        context.say(
            f"data: {s['train_rows']} training rows -> {s['packed_rows']} packed rows of "
            f"{config.max_length} tokens ({s['fill']:.0%} filled, "
            f"{s['train_loss_tokens']} loss tokens); {s['eval_rows']} held-out "
            f"rows{skipped}"
        )
        if data.max_images:
            files = data.image_files
            context.say(f"encoding {len(files)} images once with the frozen image encoder")
            self.images = ImageBank(
                model, files, max_images=data.max_images, progress=config.progress and context.lead
            )
        self.data, self.stats = data, data.stats
        return total_steps(config, data)

    @property
    def dataset(self) -> Dataset:
        """The data `prepare` loaded (the training core calls it before the other hooks)."""
        assert self.data is not None, "FineTuning.prepare has not run"
        return self.data

    def host_batch(self, step: int, trainer=None) -> dict[str, np.ndarray]:
        return step_batch(self.config, self.dataset, step, self.images)

    def step_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        return dict(loss_tokens=int(metrics["loss_tokens"]))

    def evaluate(self, trainer) -> dict[str, float]:
        loss = held_out_loss(trainer, self.dataset, self.images)
        if loss is None:
            return {}
        return dict(eval_loss=loss, eval_ppl=math.exp(min(loss, 50)))

    def checkpoint_state(self, step: int):
        c = self.config
        return None, dict(
            rows_seen=step * c.batch_size, epoch=step * c.batch_size / len(self.dataset.train)
        )

    def fingerprint(self) -> str:
        return self.dataset.fingerprint

    def summary(self) -> dict:
        return dict(data=self.dataset.stats)


def train(config: TrainConfig, *, model=None, tokenizer=None, resume: bool = False) -> TrainResult:
    """Runs (or resumes) a fine-tuning run as `config` describes; see the module docstring.

    model / tokenizer: use these instead of loading `config.base` (tests, notebooks).
    resume: continue from the latest checkpoint in out_dir, with the very batch the stopped run
      would have taken next. Ctrl-C (or SIGTERM) saves a checkpoint and returns with
      interrupted=True; a NaN/inf loss raises DivergenceError without saving.
    """
    return run(config, FineTuning(), model=model, tokenizer=tokenizer, resume=resume)


class Trainer(CoreTrainer):
    """The core Trainer with the fine-tuning loss, and its data helpers (for benchmarks and
    tests that drive steps themselves): host_batch(data, step), evaluate(data)."""

    def __init__(
        self, config: TrainConfig, model, steps: int, mesh=None, *, keep_model: bool = True
    ):
        super().__init__(
            config, model, steps, CrossEntropy(config.loss_chunk), mesh, keep_model=keep_model
        )
        self.images: ImageBank | None = None

    def host_batch(self, data: Dataset, step: int) -> dict[str, np.ndarray]:
        """The rows of step `step` as [grad_accum, micro_batch, ...] host arrays."""
        return step_batch(self.config, data, step, self.images)

    def evaluate(self, data: Dataset) -> float | None:
        """Mean loss per token over the held-out rows (None without any)."""
        return held_out_loss(self, data, self.images)
