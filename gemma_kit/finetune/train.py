"""The fine-tuning loop: LoRA, QLoRA or full; resumable, interruptible, and sharded on a mesh.

    from gemma_kit.finetune import TrainConfig, train
    result = train(TrainConfig(train_file="data.jsonl", out_dir="runs/a", steps=200))

What one optimizer step does (`train_step`, jitted once): the batch [A, b, T] is A micro-batches
of b packed rows; for each (a lax.scan) the loss sum and its gradient with respect to the
trainable variables only (`LoRAParam`, or every `nnx.Param` for full fine-tuning) are added up;
the mean over all loss tokens of the step is clipped by global norm and fed to AdamW (linear
warmup, cosine decay). Accumulating sums and dividing once makes A micro-batches of b rows give
the same update as one batch of A * b rows.

The logits [tokens, V] are the largest tensor of a step (V = 262144): the cross-entropy is taken
over chunks of `loss_chunk` tokens under jax.checkpoint, so only one chunk of logits is alive at
a time, in the forward and in the backward pass.

OUT_DIR receives: config.json, checkpoints/ (Orbax CheckpointManager: trainable variables,
optimizer state, data position; the last `keep_checkpoints`), metrics.jsonl, loss.png,
summary.json, and adapter/ (LoRA, QLoRA) or model/ (full: official checkpoint + tokenizer).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

try:
    import optax
except ImportError as err:  # optax is an extra: the core package does not need it
    raise ImportError("fine-tuning needs optax: pip install 'gemma-kit[finetune]'") from err

from gemma_kit.attention import causal_mask, image_block_mask, image_blocks
from gemma_kit.errors import DataError, DivergenceError, TrainingError
from gemma_kit.finetune.config import DATA_ORDER_FIELDS, TrainConfig
from gemma_kit.finetune.data import Dataset, load_dataset
from gemma_kit.finetune.metrics import MetricsLog, plot_losses
from gemma_kit.lora import LoRAParam, apply_lora, save_adapter
from gemma_kit.vision.prompt import soft_token_mask

# Full fine-tuning trains the text model; the image encoder and its projection into the
# embedding space stay frozen (their output is computed once per image, see ImageBank).
FROZEN_IN_FULL = ("vision_encoder", "mm_input_projection", "mm_soft_embedding_norm")

CHECKPOINTS = "checkpoints"


@dataclasses.dataclass
class TrainResult:
    step: int  # optimizer steps completed
    out_dir: pathlib.Path
    adapter: pathlib.Path | None  # LoRA / QLoRA
    model_dir: pathlib.Path | None  # full fine-tuning
    eval_before: float | None  # held-out loss before training (None when resumed)
    eval_after: float | None
    last_loss: float | None
    interrupted: bool
    stats: dict[str, Any]
    model: Any = dataclasses.field(default=None, repr=False)  # the trained model


# ------------------------------------------------------------------------------------------
# Loss


def attention_mask(positions: jax.Array, segments: jax.Array,
                   tokens: jax.Array | None = None) -> jax.Array:
    """[B, T] positions and segment ids -> [B, T, T]: causal, within one packed example only.

    With `tokens`, the soft-token slots of each image also see each other in both directions
    (gemma_kit.attention.image_block_mask), as in the model's own default mask.
    """
    same = segments[:, :, None] == segments[:, None, :]
    allowed = causal_mask(positions, positions)
    if tokens is not None:
        blocks = image_blocks(soft_token_mask(tokens))
        allowed = allowed | image_block_mask(blocks, blocks)
    return allowed & same & (segments > 0)[:, None, :]


def cross_entropy_sums(model, hidden: jax.Array, targets: jax.Array, weights: jax.Array,
                       chunk: int) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted token losses, sum of weights) for hidden [B, T, D], targets [B, T].

    Logits are made chunk tokens at a time inside jax.checkpoint, so the backward pass
    recomputes each chunk instead of keeping [B * T, V] logits alive. Log-softmax in float32.
    """
    D = hidden.shape[-1]
    h, t, w = hidden.reshape(-1, D), targets.reshape(-1), weights.reshape(-1).astype(jnp.float32)
    n = h.shape[0]
    size = min(chunk, n)
    count = -(-n // size)
    pad = count * size - n
    if pad:
        h = jnp.concatenate([h, jnp.zeros((pad, D), h.dtype)])
        t = jnp.concatenate([t, jnp.zeros((pad,), t.dtype)])
        w = jnp.concatenate([w, jnp.zeros((pad,), w.dtype)])

    @jax.checkpoint
    def one(args):
        h, t, w = args
        logits = model.logits(h[None])[0].astype(jnp.float32)  # [size, V]
        # Targets that are image slots (SOFT_TOKEN, -2) are never weighted; clip to index.
        picked = jnp.take_along_axis(logits, jnp.maximum(t, 0)[:, None], axis=-1)[:, 0]
        return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - picked) * w)

    if count == 1:  # one chunk: no loop (a smaller program, compiled faster)
        return one((h, t, w)), jnp.sum(w)
    sums = jax.lax.map(one, (h.reshape(count, size, D), t.reshape(count, size),
                             w.reshape(count, size)))
    return jnp.sum(sums), jnp.sum(w)


def loss_sums(model, batch: dict[str, jax.Array], chunk: int) -> tuple[jax.Array, jax.Array]:
    """(loss sum, loss tokens) of a batch of packed rows under `model`.

    A batch with images carries their embeddings ([B, I, M, D], made once by the frozen image
    encoder, see ImageBank) for the rows' soft-token slots.
    """
    images = batch.get("image_embeddings")
    tokens = batch["tokens"]
    mask = attention_mask(batch["positions"], batch["segments"],
                          tokens if images is not None else None)
    hidden = model.hidden_states(tokens, batch["positions"], mask, image_embeddings=images)
    return cross_entropy_sums(model, hidden, batch["targets"], batch["weights"], chunk)


def train_step(graphdef, optimizer, chunk: int, trainable, opt_state, frozen, batch):
    """One optimizer step over batch [A, b, T] (A micro-batches); see the module docstring."""
    def micro_loss(params, micro):
        return loss_sums(nnx.merge(graphdef, params, frozen), micro, chunk)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def accumulate(carry, micro):
        grads, loss, tokens = carry
        (l, n), g = grad_fn(trainable, micro)
        grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
        return (grads, loss + l, tokens + n), None

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
    carry = (zeros, jnp.float32(0), jnp.float32(0))
    if jax.tree.leaves(batch)[0].shape[0] == 1:  # no accumulation: no loop
        (grads, loss, tokens), _ = accumulate(carry, jax.tree.map(lambda x: x[0], batch))
    else:
        (grads, loss, tokens), _ = jax.lax.scan(accumulate, carry, batch)
    tokens = jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g: g / tokens, grads)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = dict(loss=loss / tokens, grad_norm=optax.global_norm(grads), loss_tokens=tokens)
    return trainable, opt_state, metrics


def eval_step(graphdef, chunk: int, trainable, frozen, batch):
    return loss_sums(nnx.merge(graphdef, trainable, frozen), batch, chunk)


_OPTIMIZER_FIELDS = ("learning_rate", "warmup_steps", "min_lr_fraction", "max_grad_norm",
                     "adam_b1", "adam_b2", "weight_decay")


def _optimizer_key(config: TrainConfig) -> tuple:
    return tuple((name, getattr(config, name)) for name in _OPTIMIZER_FIELDS)


@functools.lru_cache(maxsize=4)
def _jitted(graphdef, optimizer_key: tuple, steps: int, chunk: int):
    """(optimizer, schedule, jitted step, jitted eval), shared by runs of the same model and
    settings in one process, so that a second run (a resume, a test) reuses the compiled code."""
    config = TrainConfig(steps=steps, **dict(optimizer_key))
    optimizer, schedule = make_optimizer(config, steps)
    step = jax.jit(functools.partial(train_step, graphdef, optimizer, chunk), donate_argnums=(0, 1))
    evaluate = jax.jit(functools.partial(eval_step, graphdef, chunk))
    return optimizer, schedule, step, evaluate


def make_optimizer(config: TrainConfig, steps: int):
    """AdamW after global-norm clipping; linear warmup to learning_rate, cosine to the end."""
    lr = config.learning_rate
    warmup = min(config.warmup_steps, steps)
    schedule = optax.warmup_cosine_decay_schedule(
        # Warmup starts one step in, so that the very first update is not a wasted lr = 0.
        init_value=lr / (warmup + 1), peak_value=lr, warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1), end_value=lr * config.min_lr_fraction)
    optimizer = optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2,
                    weight_decay=config.weight_decay),
    )
    return optimizer, schedule


# ------------------------------------------------------------------------------------------
# Model


def build_model(config: TrainConfig, model=None, tokenizer=None):
    """(model ready to train, tokenizer, description of the base) from the config.

    A model passed in is used as given (its LoRA, if any, is kept), else the base checkpoint (or
    the embedded 270M) is loaded in param_dtype. QLoRA quantizes the frozen base to int8 before
    LoRA is added.
    """
    from gemma_kit.lora import has_lora

    dtype = jnp.dtype(config.resolved_param_dtype())
    compute = jnp.dtype(config.resolved_compute_dtype())
    if model is None:
        if config.base == "default":
            from gemma_kit.embedded import default_model

            model, default_tokenizer = default_model(dtype, compute_dtype=compute)
            tokenizer = tokenizer or default_tokenizer
            base = "default"
        else:
            from gemma_kit.checkpoint.official import find_checkpoint, find_tokenizer
            from gemma_kit.errors import TokenizerError
            from gemma_kit.loading import load_model
            from gemma_kit.tokenizer import Tokenizer

            find_checkpoint(config.base)
            if tokenizer is None:
                path = config.tokenizer or find_tokenizer(config.base)
                if path is None:
                    raise TokenizerError(
                        f"no tokenizer.model in or beside {config.base!r}; set `tokenizer`")
                tokenizer = Tokenizer(path)
            model = load_model(config.base, config.preset, dtype, compute_dtype=compute)
            base = str(pathlib.Path(config.base).expanduser().absolute())
    else:
        if tokenizer is None:
            raise TrainingError("a model passed to train() needs its tokenizer too")
        # A shallow copy (the arrays are shared): LoRA and the compute dtype are set on it,
        # never on the caller's model.
        model = nnx.merge(*nnx.split(model))
        model.dtype = compute
        base = getattr(model.config, "name", "model")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise TrainingError(
            f"the tokenizer has {tokenizer.vocab_size} pieces but the model only "
            f"{model.config.vocab_size} embedding rows; they do not belong together")
    if config.method == "qlora":
        from gemma_kit.quant import quantize_model

        model = quantize_model(model, bits=4 if config.quant == "int4" else 8)
    if config.trains_lora and not has_lora(model):
        apply_lora(model, config.lora_rank, config.lora_alpha, config.lora_targets,
                   seed=config.seed)
    if config.method == "full" and has_lora(model):
        raise TrainingError("full fine-tuning of a model that carries LoRA: merge it first")
    return model, tokenizer, base


def total_steps(config: TrainConfig, data: Dataset) -> int:
    if config.steps is not None:
        return config.steps
    return max(1, math.ceil(config.epochs * len(data.train) / config.batch_size))


# ------------------------------------------------------------------------------------------
# The trainer: state, placement on devices, checkpoints


class ImageBank:
    """The image embeddings of every image file of the data, made once by the frozen encoder.

    The encoder (SigLIP, ~0.4 B parameters) does not train, so its output for an image never
    changes: computing it once, instead of in every step that shows the image, keeps the
    training step as cheap as a text-only one. Embeddings are held on the host in the compute
    dtype ([M, D] per image) and gathered per batch.
    """

    def __init__(self, model, files: list[str], *, batch: int = 8, max_images: int,
                 progress: bool = True):
        from tqdm import tqdm

        from gemma_kit.vision import preprocess_image

        model.require_vision()
        size = model.config.vision.image_size
        graphdef, state = nnx.split(model)
        encode = jax.jit(lambda s, px: nnx.merge(graphdef, s).encode_images(px))
        self.index = {f: i for i, f in enumerate(files)}
        self.max_images = max_images
        chunks = []
        for start in tqdm(range(0, len(files), batch), desc="encoding images", unit="batch",
                          disable=not progress):
            group = files[start:start + batch]
            pixels = np.stack([preprocess_image(f, size) for f in group])
            if len(group) < batch:  # one compiled shape for every group
                pixels = np.concatenate([pixels, np.zeros((batch - len(group), *pixels.shape[1:]),
                                                          pixels.dtype)])
            chunks.append(np.asarray(encode(state, pixels))[:len(group)])
        self.embeddings = np.concatenate(chunks)  # [files, M, D]

    def gather(self, rows: list[tuple[str, ...]]) -> np.ndarray:
        """[rows, max_images, M, D]: each row's images in slot order, zero-padded."""
        M, D = self.embeddings.shape[1:]
        out = np.zeros((len(rows), self.max_images, M, D), self.embeddings.dtype)
        for r, files in enumerate(rows):
            for k, f in enumerate(files):
                out[r, k] = self.embeddings[self.index[f]]
        return out


class Trainer:
    """Holds the split model, the optimizer and the compiled step; knows how to save/restore."""

    def __init__(self, config: TrainConfig, model, steps: int, mesh=None, *,
                 keep_model: bool = True):
        """keep_model: copy the trainable arrays first. The step donates its inputs' buffers,
        so without a copy the trainable arrays `model` holds are consumed by the first step
        (what train() does with a model it loaded itself: no second copy of the weights)."""
        self.config = config
        self.mesh = mesh
        if config.trains_lora:
            self.kind = LoRAParam
        else:
            self.kind = nnx.All(nnx.Param, nnx.Not(nnx.Any(*map(nnx.PathContains,
                                                                 FROZEN_IN_FULL))))
        self.graphdef, trainable, frozen = nnx.split(model, self.kind, ...)
        if not jax.tree.leaves(trainable):
            raise TrainingError("the model has no variables to train for method "
                                f"{config.method!r}")
        self.images: ImageBank | None = None
        if keep_model:
            trainable = jax.tree.map(lambda x: jax.device_put(x, may_alias=False), trainable)
        if mesh is not None:
            from gemma_kit.sharding import shard_params

            trainable = shard_params(trainable, mesh)
            frozen = shard_params(frozen, mesh)
        else:
            # Committed to one device, as the step's outputs are: jit compiles separately for
            # uncommitted and committed inputs, which would cost a second compile at step 2.
            device = jax.devices()[0]
            trainable, frozen = jax.device_put((trainable, frozen), device)
        self.trainable, self.frozen = trainable, frozen
        self.optimizer, self.schedule, self._step, self._eval = _jitted(
            self.graphdef, _optimizer_key(config), steps, config.loss_chunk)
        # Eagerly: zeros_like keeps each parameter's sharding for its moments; the step counter
        # is then placed like the rest (committed), as the step's outputs will be.
        self.opt_state = self._commit(self.optimizer.init(trainable))
        if mesh is not None:
            # Pin the step's outputs to its inputs' shardings: left free, XLA may split a
            # replicated LoRA factor in the output, and step 2 would compile again for it.
            from jax.sharding import NamedSharding, PartitionSpec

            place = (jax.tree.map(lambda x: x.sharding, self.trainable),
                     jax.tree.map(lambda x: x.sharding, self.opt_state),
                     NamedSharding(mesh, PartitionSpec()))
            self._step = jax.jit(
                functools.partial(train_step, self.graphdef, self.optimizer, config.loss_chunk),
                out_shardings=place, donate_argnums=(0, 1))

    def _commit(self, tree):
        """Places uncommitted arrays of `tree` (replicated over the mesh, or on device 0)."""
        if self.mesh is None:
            target = jax.devices()[0]
        else:
            from jax.sharding import NamedSharding, PartitionSpec

            target = NamedSharding(self.mesh, PartitionSpec())
        return jax.tree.map(
            lambda x: x if getattr(x, "committed", False) else jax.device_put(x, target), tree)

    @property
    def trainable_count(self) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.trainable)))

    def model(self):
        return nnx.merge(self.graphdef, self.trainable, self.frozen)

    # -- batches on devices ---------------------------------------------------------------
    def place(self, batch: dict[str, np.ndarray], batch_axis: int) -> dict[str, jax.Array]:
        """Host arrays -> device arrays, rows split over the mesh's data and fsdp axes.

        Every process holds the whole (cheap) host batch and hands jax only the slices its own
        devices hold, so the same code runs on one host or many.
        """
        if self.mesh is None:
            return jax.device_put(batch, jax.devices()[0])
        from jax.sharding import NamedSharding, PartitionSpec

        spec = [None] * batch_axis + [("data", "fsdp")]
        sharding = NamedSharding(self.mesh, PartitionSpec(*spec))
        return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
                for k, v in batch.items()}

    def rows(self, rows, index) -> dict[str, np.ndarray]:
        """Host arrays of rows `index` of `rows`, with their image embeddings if any."""
        batch = rows.take(index)
        if self.images is not None:
            batch["image_embeddings"] = self.images.gather(rows.images_of(index))
        return batch

    def host_batch(self, data: Dataset, step: int) -> dict[str, np.ndarray]:
        """The rows of step `step` as [grad_accum, micro_batch, ...] host arrays."""
        c = self.config
        batch = self.rows(data.train, data.batch_index(step, c.batch_size, c.seed))
        return {k: v.reshape(c.grad_accum, c.micro_batch, *v.shape[1:]) for k, v in batch.items()}

    # -- compiled work --------------------------------------------------------------------
    def step(self, batch) -> dict[str, float]:
        self.trainable, self.opt_state, metrics = self._step(
            self.trainable, self.opt_state, self.frozen, batch)
        return {k: float(v) for k, v in metrics.items()}

    def evaluate(self, data: Dataset) -> float | None:
        """Mean loss per token over the held-out rows (None without any)."""
        rows = data.eval
        if rows is None:
            return None
        cap = self.config.eval_max_rows
        n = len(rows) if cap is None else min(len(rows), cap)
        b = self.config.micro_batch
        total = count = 0.0
        for start in range(0, n, b):
            index = np.arange(start, start + b)
            real = index < n
            batch = self.rows(rows, np.where(real, index, 0))
            batch["weights"] = batch["weights"] * real[:, None]  # padding rows count nothing
            s, c = self._eval(self.trainable, self.frozen, self.place(batch, batch_axis=0))
            total += float(s)
            count += float(c)
        return total / max(count, 1.0)

    # -- checkpoints ----------------------------------------------------------------------
    def manager(self, directory: pathlib.Path):
        import orbax.checkpoint as ocp

        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.config.keep_checkpoints, create=True,
            # Synchronous: on CPU a jax array and the host copy orbax writes from can be the same
            # memory, which the next step (donating its inputs) would overwrite mid-write.
            enable_async_checkpointing=False)
        return ocp.CheckpointManager(directory, options=options)

    def save(self, manager, step: int, progress: dict) -> None:
        import orbax.checkpoint as ocp

        manager.save(step, args=ocp.args.Composite(
            trainable=ocp.args.StandardSave(nnx.to_pure_dict(self.trainable)),
            opt_state=ocp.args.StandardSave({"leaves": jax.tree.leaves(self.opt_state)}),
            progress=ocp.args.JsonSave(progress)), force=True)
        manager.wait_until_finished()

    def restore(self, manager, step: int) -> dict:
        import orbax.checkpoint as ocp

        def abstract(tree):
            return jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)

        pure = nnx.to_pure_dict(self.trainable)
        leaves, treedef = jax.tree.flatten(self.opt_state)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                trainable=ocp.args.StandardRestore(abstract(pure)),
                opt_state=ocp.args.StandardRestore(abstract({"leaves": leaves})),
                progress=ocp.args.JsonRestore()))
        except Exception as err:  # orbax raises many types; the user needs one clear message
            raise TrainingError(
                f"cannot restore checkpoint step {step} from {manager.directory} "
                f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); it does not fit "
                "this run's model and method, or it is damaged") from err
        nnx.replace_by_pure_dict(self.trainable, restored["trainable"])
        self.opt_state = jax.tree.unflatten(treedef, restored["opt_state"]["leaves"])
        return dict(restored["progress"])


# ------------------------------------------------------------------------------------------
# Stopping on Ctrl-C / SIGTERM


class _StopRequest:
    """Turns the first SIGINT/SIGTERM into a flag checked between steps (a second one kills)."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, saving a checkpoint and "
              "stopping (press Ctrl-C again to stop at once, without saving)", file=sys.stderr)
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
# The run


def _check_out_dir(config: TrainConfig, out: pathlib.Path, resume: bool) -> int | None:
    """Latest checkpoint step to resume from (None for a fresh run); refuses unsafe cases."""
    ckpt = out / CHECKPOINTS
    steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []
    if not resume:
        if steps:
            raise TrainingError(
                f"{out} already holds checkpoints of a run (up to step {steps[-1]}); pass "
                "--resume (resume=True) to continue it, or choose another out_dir")
        return None
    if not steps:
        raise TrainingError(f"nothing to resume: {ckpt} holds no checkpoint")
    saved = out / "config.json"
    if saved.is_file():
        before = json.loads(saved.read_text())
        now = config.to_dict()
        keys = DATA_ORDER_FIELDS + ("method", "lora_rank", "lora_alpha", "lora_targets")
        changed = [k for k in keys if before.get(k) != now.get(k)]
        if changed:
            details = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
            raise TrainingError(
                f"cannot resume {out}: settings that fix the model or the data order changed "
                f"({details}); restore them or start a new out_dir")
    return steps[-1]


def _write_json(path: pathlib.Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str) + "\n")
    tmp.replace(path)


def train(config: TrainConfig, *, model=None, tokenizer=None, resume: bool = False) -> TrainResult:
    """Runs (or resumes) a fine-tuning run as `config` describes; see the module docstring.

    model / tokenizer: use these instead of loading `config.base` (tests, notebooks).
    resume: continue from the latest checkpoint in out_dir, with the very batch the stopped run
      would have taken next. Ctrl-C (or SIGTERM) saves a checkpoint and returns with
      interrupted=True; a NaN/inf loss raises DivergenceError without saving.
    """
    config = config.validate()
    if config.distributed:
        jax.distributed.initialize(coordinator_address=config.coordinator_address,
                                   num_processes=config.num_processes,
                                   process_id=config.process_id)
    out = pathlib.Path(config.out_dir).expanduser().absolute()
    resume_from = _check_out_dir(config, out, resume)
    lead = jax.process_index() == 0

    def say(message: str) -> None:
        if config.progress and lead:
            print(message, file=sys.stderr)

    # Missing or empty data files are reported before seconds of loading the model.
    from gemma_kit.finetune.data import read_jsonl

    for path in (config.train_file, config.eval_file):
        if path is not None:
            read_jsonl(path)
    given_model = model is not None
    model, tokenizer, base = build_model(config, model, tokenizer)
    vision = getattr(model, "has_vision", False)
    data = load_dataset(config.train_file, tokenizer, max_length=config.max_length,
                        eval_file=config.eval_file, eval_fraction=config.eval_fraction,
                        packing=config.packing, skip_bad_rows=config.skip_bad_rows,
                        seed=config.seed,
                        num_soft_tokens=model.config.vision.num_soft_tokens if vision else None)
    s = data.stats
    skipped = (f"; skipped {s['skipped']} bad rows, first: {s['skipped_reasons'][0]}"
               if s["skipped"] else "")
    say(f"data: {s['train_rows']} training rows -> {s['packed_rows']} packed rows of "
        f"{config.max_length} tokens ({s['fill']:.0%} filled, {s['train_loss_tokens']} loss "
        f"tokens); {s['eval_rows']} held-out rows{skipped}")
    images = None
    if data.max_images:
        files = data.image_files
        say(f"encoding {len(files)} images once with the frozen image encoder")
        images = ImageBank(model, files, max_images=data.max_images,
                           progress=config.progress and jax.process_index() == 0)
    steps = total_steps(config, data)

    mesh = None
    if config.mesh_data * config.mesh_fsdp > 1:
        from gemma_kit.sharding import make_mesh

        mesh = make_mesh(data=config.mesh_data, fsdp=config.mesh_fsdp)
    trainer = Trainer(config, model, steps, mesh, keep_model=given_model)
    trainer.images = images
    say(f"model: {model.config.name} ({base}), method {config.method}, "
        f"{trainer.trainable_count:,} trainable parameters, compute "
        f"{config.resolved_compute_dtype()}")

    out.mkdir(parents=True, exist_ok=True)
    manager = trainer.manager(out / CHECKPOINTS)
    start, eval_before, tokens_seen = 0, None, 0
    if resume_from is not None:
        progress = trainer.restore(manager, resume_from)
        if progress.get("data_fingerprint") != data.fingerprint:
            raise DataError(
                f"the training data or its settings changed since {out} was checkpointed; a "
                "resumed run must see the same rows in the same order. Restore the data, or "
                "start a new out_dir")
        start, tokens_seen = int(progress["step"]), int(progress.get("tokens_seen", 0))
        eval_before = progress.get("eval_before")
        say(f"resuming from step {start} of {steps}")
    if lead:
        _write_json(out / "config.json", config.to_dict())
    metrics = None
    if lead:
        metrics = MetricsLog(out / "metrics.jsonl",
                             resume_step=start if resume_from is not None else None)
    log = metrics.write if metrics else (lambda row: None)

    def progress_info(step: int) -> dict:
        return dict(step=step, data_fingerprint=data.fingerprint,
                    rows_seen=step * config.batch_size, tokens_seen=tokens_seen,
                    epoch=step * config.batch_size / len(data.train), eval_before=eval_before)

    if resume_from is None:
        eval_before = trainer.evaluate(data)
        if eval_before is not None:
            log(dict(step=0, eval_loss=eval_before, eval_ppl=math.exp(min(eval_before, 50))))
            say(f"held-out loss before training: {eval_before:.4f}")

    from tqdm import tqdm

    last_saved = resume_from
    last_loss = None
    interrupted = False
    bar = tqdm(total=steps, initial=start, desc="fine-tuning", unit="step", dynamic_ncols=True,
               disable=not (config.progress and lead))
    try:
        with _StopRequest() as stop:
            tick = time.perf_counter()
            for step in range(start, steps):
                rows = trainer.host_batch(data, step)
                m = trainer.step(trainer.place(rows, batch_axis=1))
                done = step + 1
                now = time.perf_counter()
                seen = int((rows["segments"] > 0).sum())
                tokens_seen += seen
                seconds, tick = now - tick, now
                rate = seen / max(seconds, 1e-9)
                if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
                    where = (f"step {last_saved} in {out / CHECKPOINTS}" if last_saved is not None
                             else "none was saved yet")
                    raise DivergenceError(
                        f"the loss became {m['loss']} (gradient norm {m['grad_norm']}) at step "
                        f"{done}; stopped without saving that state. The last good checkpoint "
                        f"is {where}. Lower learning_rate (now {config.learning_rate}) or raise "
                        "warmup_steps, then continue with --resume.")
                last_loss = m["loss"]
                if step == start:
                    say(f"first step (compiles the step): {seconds:.1f} s")
                log(dict(step=done, loss=m["loss"], grad_norm=m["grad_norm"],
                         lr=float(trainer.schedule(step)), loss_tokens=int(m["loss_tokens"]),
                         tokens_per_s=rate, elapsed=bar.format_dict.get("elapsed", 0.0)))
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{rate:,.0f}")
                if done % config.eval_every == 0 and done < steps:
                    held = trainer.evaluate(data)
                    if held is not None:
                        log(dict(step=done, eval_loss=held, eval_ppl=math.exp(min(held, 50))))
                        bar.write(f"step {done}: held-out loss {held:.4f}")
                if done % config.save_every == 0 or done == steps or stop.signal is not None:
                    trainer.save(manager, done, progress_info(done))
                    last_saved = done
                if stop.signal is not None:
                    interrupted = True
                    say(f"stopped at step {done}; checkpoint saved in {out / CHECKPOINTS}. "
                        "Continue with --resume.")
                    break
                tick = time.perf_counter()  # evaluating and saving are not training time
    finally:
        bar.close()
        manager.close()

    step_now = last_saved if interrupted else steps
    result = TrainResult(step=step_now, out_dir=out, adapter=None, model_dir=None,
                         eval_before=eval_before, eval_after=None, last_loss=last_loss,
                         interrupted=interrupted, stats=data.stats)
    if interrupted:
        return result
    eval_after = trainer.evaluate(data)
    result.eval_after = eval_after
    if eval_after is not None:
        log(dict(step=steps, eval_loss=eval_after, eval_ppl=math.exp(min(eval_after, 50))))
        say(f"held-out loss after training: {eval_after:.4f}" +
            (f" (before: {eval_before:.4f})" if eval_before is not None else ""))
    trained = trainer.model()
    result.model = trained
    if lead:
        if config.trains_lora:
            result.adapter = save_adapter(
                trained, out / "adapter", overwrite=True,
                extra=dict(base=base, method=config.method, steps=steps))
        else:
            result.model_dir = _save_full(trained, tokenizer, out / "model")
        png = plot_losses(out / "metrics.jsonl", out / "loss.png")
        _write_json(out / "summary.json", dict(
            steps=steps, method=config.method, base=base, eval_before=eval_before,
            eval_after=eval_after, last_loss=last_loss, tokens_seen=tokens_seen,
            trainable_parameters=trainer.trainable_count, data=data.stats,
            adapter=result.adapter, model=result.model_dir, loss_png=png))
        say(f"wrote {result.adapter or result.model_dir}")
    return result


def _save_full(model, tokenizer, folder: pathlib.Path) -> pathlib.Path:
    """A fully fine-tuned model as a model folder: official-layout checkpoint + tokenizer."""
    from gemma_kit.checkpoint.convert import write_model_folder

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return write_model_folder(folder, params, tokenizer.to_bytes(), overwrite=True)
