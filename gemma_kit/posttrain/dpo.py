"""DPO and IPO (Rafailov et al. 2023; Azar et al. 2023) as one objective on the training core.

    from gemma_kit.posttrain.dpo import DPOConfig, train_dpo
    result = train_dpo(DPOConfig(train_file="prefs.jsonl", out_dir="runs/dpo", steps=100,
                                 beta=0.1))

The command line is `gemma-kit dpo --config FILE [--resume] [--set key=value ...]`.

For a pair (x, y_w, y_l) with sequence log-probs log pi(y|x) summed over the completion tokens
(gemma_kit.posttrain.preferences: the completion and its <eos> / <end_of_turn>),

    Delta = beta [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]
    sigmoid: -(1 - eps) log sigmoid(Delta) - eps log sigmoid(-Delta)   (eps = label_smoothing)
    ipo:     (Delta_avg / beta - 1 / (2 beta))^2, the log-ratios divided by the completion
             lengths (TRL's "ipo")

(gemma_kit.posttrain.losses.dpo_losses / ipo_losses), summed over the pairs of a step and
divided by their number. Metrics per step and held out: the loss, the implicit rewards
beta (log pi - log ref) of the chosen and rejected completions, accuracy (chosen reward strictly
above), margin (their difference), and the policy's sequence log-probs.

The reference, one of three:
  (a) reference unset, LoRA / QLoRA: the base, i.e. the policy's own network with every LoRA B
      factor zero (gemma_kit.posttrain.policy.reference_values), passed to each step as a frozen
      pytree: no second model. Full fine-tuning: a frozen copy of the initial weights.
  (b) reference = a checkpoint folder (full fine-tuning): that model's weights as the frozen
      pytree (same architecture as the policy; one clear error otherwise).
  (c) precompute_ref_logps = true: the reference log-probs of every training and held-out pair
      are computed ONCE before the first step (from (a)'s network, or from the model at
      `reference`, which may then differ in size and be used with LoRA) and stored in
      OUT_DIR/reference_logps.npz (a resumed run reads them back); the steps then run no
      reference forward pass at all.
At the first step pi = ref, so Delta = 0 and the loss is log 2 (sigmoid), whatever the data.

OUT_DIR receives what every run writes (config.json, checkpoints/, metrics.jsonl, loss.png,
summary.json, adapter/ or model/), and dpo.png (implicit rewards and margin).
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_kit.errors import CheckpointError, ConfigError
from gemma_kit.lora import LoRAParam
from gemma_kit.posttrain import losses
from gemma_kit.posttrain.logprobs import DEFAULT_CHUNK
from gemma_kit.posttrain.policy import completion_logprobs, reference_values, with_trained
from gemma_kit.posttrain.preference_training import (
    PreferenceConfig,
    PreferenceData,
    check_preference_files,
    held_out_batches,
    load_preference_data,
    pair_token_count,
)
from gemma_kit.posttrain.preferences import Preferences
from gemma_kit.training.config import TrainConfig
from gemma_kit.training.loop import TrainResult, run
from gemma_kit.training.model import trainable_filter
from gemma_kit.training.objective import Objective, RunContext

LOSS_TYPES = ("sigmoid", "ipo")
REFERENCE_FILE = "reference_logps.npz"


@dataclasses.dataclass(frozen=True)
class DPOConfig(PreferenceConfig):
    """The settings of a DPO run: every TrainConfig / PreferenceConfig field, plus

    beta: the strength of the KL constraint (> 0; 0.1 as TRL and Tunix).
    label_smoothing: eps in [0, 0.5), the assumed fraction of flipped labels (sigmoid only).
    loss_type: "sigmoid" (DPO) or "ipo".
    reference: a checkpoint folder to use as the reference (see the module docstring);
      unset: the base (LoRA) or the initial weights (full).
    precompute_ref_logps: compute the reference log-probs once before training.
    """

    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"
    reference: str | None = None
    precompute_ref_logps: bool = False

    PATH_FIELDS: ClassVar[tuple[str, ...]] = PreferenceConfig.PATH_FIELDS + ("reference",)
    RESUME_FIELDS: ClassVar[tuple[str, ...]] = PreferenceConfig.RESUME_FIELDS + (
        "reference",
        "precompute_ref_logps",
    )

    def validate(self) -> DPOConfig:
        super().validate()

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        number = (int, float)
        need(
            isinstance(self.beta, number) and not isinstance(self.beta, bool) and self.beta > 0,
            f"beta must be a number > 0, got {self.beta!r}",
        )
        need(
            isinstance(self.label_smoothing, number) and 0 <= self.label_smoothing < 0.5,
            f"label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}",
        )
        need(
            self.loss_type in LOSS_TYPES,
            f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}",
        )
        need(
            self.loss_type != "ipo" or self.label_smoothing == 0,
            "label_smoothing applies to the sigmoid loss only; set it to 0 for ipo",
        )
        need(
            isinstance(self.precompute_ref_logps, bool),
            f"precompute_ref_logps must be true or false, got {self.precompute_ref_logps!r}",
        )
        need(
            not (self.reference and self.trains_lora and not self.precompute_ref_logps),
            "a reference model given by path with LoRA needs precompute_ref_logps = true (a "
            "LoRA policy's own network is its base; another model would be a second copy of "
            "the weights in every step), or leave reference unset to use the base",
        )
        return self


def trained_kind(lora: bool):
    """The nnx filter of the trained variables: LoRA factors, or the full fine-tuning filter."""
    return LoRAParam if lora else trainable_filter(TrainConfig(method="full"))


# ------------------------------------------------------------------------------------------
# Sequence log-probs of preference pairs


def pair_rows(batch: dict) -> dict[str, jax.Array]:
    """The chosen and rejected sequences of b pairs as [2b, T] rows in the packed-row layout
    (one sequence per row, right-padded with id 0): tokens, targets (the next token), positions,
    segments (1 on real tokens) and weights (1 where the target is a completion token)."""
    tokens = jnp.concatenate([batch["chosen"], batch["rejected"]])
    completion = jnp.concatenate([batch["chosen_completion"], batch["rejected_completion"]])
    B, T = tokens.shape
    shift = jnp.zeros((B, 1), tokens.dtype)
    return dict(
        tokens=tokens,
        targets=jnp.concatenate([tokens[:, 1:], shift], axis=1),
        positions=jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
        segments=(tokens != 0).astype(jnp.int32),
        weights=jnp.concatenate([completion[:, 1:], jnp.zeros((B, 1), bool)], axis=1).astype(
            jnp.float32
        ),
    )


def sequence_logps(
    model, rows: dict[str, jax.Array], chunk: int = DEFAULT_CHUNK
) -> tuple[jax.Array, jax.Array]:
    """(sum of the completion tokens' log-probs [2b], number of completion tokens [2b])."""
    per_token = completion_logprobs(model, rows, chunk)
    return jnp.sum(per_token * rows["weights"], axis=1), jnp.sum(rows["weights"], axis=1)


@dataclasses.dataclass(frozen=True)
class DPOLoss:
    """The DPO / IPO loss on the core: `(model, batch, frozen) -> (loss sum, pairs, sums)`.

    batch: "chosen", "rejected" [b, T], their completion masks, optionally "valid" [b] (pair
    weights; 0 for padding pairs) and, when `precomputed`, "ref_chosen_logps" and
    "ref_rejected_logps" [b]. frozen: the reference's values of the trained variables (None
    when precomputed). lora: which variables those are (LoRA factors, or every Param).
    """

    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"
    lora: bool = True
    precomputed: bool = False
    chunk: int = DEFAULT_CHUNK

    def __call__(self, model, batch, frozen=None):
        b = batch["chosen"].shape[0]
        rows = pair_rows(batch)
        logps, lengths = sequence_logps(model, rows, self.chunk)
        if self.precomputed:
            ref = jnp.concatenate([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
        else:
            reference = with_trained(model, frozen, trained_kind(self.lora))
            ref, _ = sequence_logps(reference, rows, self.chunk)
        ref = jax.lax.stop_gradient(ref.astype(jnp.float32))
        pc, pr, rc, rr = logps[:b], logps[b:], ref[:b], ref[b:]
        if self.loss_type == "ipo":
            per_pair = losses.ipo_losses(
                pc, pr, rc, rr, self.beta, chosen_lengths=lengths[:b], rejected_lengths=lengths[b:]
            )
        else:
            per_pair = losses.dpo_losses(
                pc, pr, rc, rr, self.beta, label_smoothing=self.label_smoothing
            )
        valid = batch.get("valid")
        v = jnp.ones((b,), jnp.float32) if valid is None else valid.astype(jnp.float32)
        # TRL's metrics (losses.dpo_metrics), as sums over the pairs: the step adds them over
        # micro-batches and the objective divides by the pair count.
        chosen, rejected = self.beta * (pc - rc), self.beta * (pr - rr)
        sums = dict(
            rewards_chosen=jnp.sum(v * chosen),
            rewards_rejected=jnp.sum(v * rejected),
            accuracy=jnp.sum(v * (chosen > rejected).astype(jnp.float32)),
            margin=jnp.sum(v * (chosen - rejected)),
            logps_chosen=jnp.sum(v * pc),
            logps_rejected=jnp.sum(v * pr),
        )
        return jnp.sum(v * per_pair), jnp.sum(v), sums


@dataclasses.dataclass(frozen=True)
class _RefLogps:
    """Sequence log-probs of the chosen and rejected side of every pair, [N] each."""

    chosen: np.ndarray
    rejected: np.ndarray


def pair_logps(
    model, pairs: Preferences, rows: int, *, chunk: int = DEFAULT_CHUNK, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(log pi(chosen) [N], log pi(rejected) [N]) of every pair under `model`, `rows` pairs at a
    time (one compiled shape; the last batch padded)."""
    from tqdm.auto import tqdm

    graphdef, state = nnx.split(model)

    @jax.jit
    def batch_logps(state, batch):
        logps, _ = sequence_logps(nnx.merge(graphdef, state), pair_rows(batch), chunk)
        return logps

    chosen, rejected = [], []
    batches = list(held_out_batches(pairs, rows))
    for batch in tqdm(
        batches, desc="reference log-probs", unit="batch", disable=not progress or len(batches) < 2
    ):
        n = int(batch["valid"].sum())
        logps = np.asarray(batch_logps(state, {k: jnp.asarray(v) for k, v in batch.items()}))
        chosen.append(logps[:rows][:n])
        rejected.append(logps[rows:][:n])
    return np.concatenate(chosen), np.concatenate(rejected)


# ------------------------------------------------------------------------------------------
# The objective


class DPO(Objective):
    """DPO / IPO on preference pairs against a frozen reference (see the module docstring)."""

    name = "dpo"
    eval_key = "eval_loss"
    loss_label = "DPO loss (nats / pair)"

    config: DPOConfig
    data: PreferenceData  # set by prepare

    def __init__(self):
        self.stats: dict[str, Any] = {}
        self.reference: Any = None  # the frozen values of (a) / (b)
        self.placed: Any = None
        self.ref_train: _RefLogps | None = None
        self.ref_eval: _RefLogps | None = None

    def check_inputs(self, config: TrainConfig) -> None:
        check_preference_files(config)
        if isinstance(config, DPOConfig) and config.reference:
            from gemma_kit.checkpoint.official import find_checkpoint
            from gemma_kit.checkpoint.safetensors_io import is_hf_folder

            if not is_hf_folder(config.reference):
                find_checkpoint(config.reference)

    def prepare(self, context: RunContext) -> int:
        config = context.config
        if not isinstance(config, DPOConfig):
            raise ConfigError("DPO training takes a DPOConfig")
        return self.prepare_with(context, load_preference_data(config, context.tokenizer))

    def prepare_with(self, context: RunContext, data: PreferenceData) -> int:
        """prepare() with the pairs given (tests, notebooks): the loss and the reference."""
        config = context.config
        if not isinstance(config, DPOConfig):
            raise ConfigError("DPO training takes a DPOConfig")
        self.config, self.pad_id = config, context.tokenizer.pad_id
        self.data = data
        self.stats = dict(self.data.stats)
        kind = trained_kind(config.trains_lora)
        self.loss = DPOLoss(
            float(config.beta),
            float(config.label_smoothing),
            config.loss_type,
            lora=config.trains_lora,
            precomputed=config.precompute_ref_logps,
            chunk=config.loss_chunk,
        )
        s = self.data.stats
        context.say(
            f"data: {s['train_pairs']} training pairs, {s['eval_pairs']} held out "
            f"(sequences of up to {s['train_length']} tokens; {s['skipped']} skipped)"
        )
        policy = context.model
        if config.precompute_ref_logps:
            self._precompute(context, kind)
        elif config.reference:
            ref_model = self._load_reference(context)
            values = nnx.to_pure_dict(nnx.state(ref_model, kind))
            check_same_structure(
                values, nnx.to_pure_dict(nnx.state(policy, kind)), config.reference
            )
            self.reference = values
        else:
            self.reference = reference_values(nnx.state(policy, kind), kind)
        self.stats["reference"] = self.describe_reference()
        return self.data.total_steps(config)

    def describe_reference(self) -> str:
        c = self.config
        source = c.reference or ("the base (LoRA off)" if c.trains_lora else "the initial weights")
        return f"{source}{', precomputed' if c.precompute_ref_logps else ''}"

    def _load_reference(self, context: RunContext):
        from gemma_kit.loading import load_model

        c = self.config
        assert c.reference, "called only with a reference path"
        context.say(f"reference model: {c.reference}")
        return load_model(
            c.reference,
            c.preset,
            jnp.dtype(c.resolved_param_dtype()),
            compute_dtype=jnp.dtype(c.resolved_compute_dtype()),
            text_only=True,
        )

    def _precompute(self, context: RunContext, kind) -> None:
        """(c): the reference log-probs of every pair, computed once (or read back)."""
        c = self.config
        key = reference_key(self.data.fingerprint, c)
        path = context.out_dir / REFERENCE_FILE
        stored = read_reference_logps(path, key)
        if stored is not None:
            context.say(f"reference log-probs: read back from {path}")
            self.ref_train, self.ref_eval = stored
            return
        if c.reference:
            model = self._load_reference(context)
        else:
            model = with_trained(
                context.model, reference_values(nnx.state(context.model, kind), kind), kind
            )
        context.say("reference log-probs: computing them once for every pair")
        progress = c.progress and context.lead
        self.ref_train = _RefLogps(
            *pair_logps(
                model, self.data.train, c.micro_batch, chunk=c.loss_chunk, progress=progress
            )
        )
        if self.data.eval is not None:
            self.ref_eval = _RefLogps(
                *pair_logps(
                    model, self.data.eval, c.micro_batch, chunk=c.loss_chunk, progress=progress
                )
            )
        if context.lead:
            write_reference_logps(path, key, self.ref_train, self.ref_eval)

    def host_batch(self, step: int, trainer=None) -> dict[str, np.ndarray]:
        c = self.config
        index = self.data.batch_index(step, c.batch_size, c.order_seed)
        batch = self.data.train.take(index)
        if self.ref_train is not None:
            batch["ref_chosen_logps"] = self.ref_train.chosen[index]
            batch["ref_rejected_logps"] = self.ref_train.rejected[index]
        from gemma_kit.training.trainer import micro_batches

        return micro_batches(batch, c.grad_accum)

    def frozen(self, step: int, trainer):
        if self.reference is None:
            return None
        if self.placed is None:  # placed once: the same device arrays every step
            self.placed = trainer.place_frozen(self.reference)
        return self.placed

    def count_tokens(self, batch: dict[str, np.ndarray]) -> int:
        return pair_token_count(batch, self.pad_id)

    def step_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        pairs = max(metrics["normaliser"], 1.0)
        return {
            k: v / pairs for k, v in metrics.items() if k not in ("loss", "grad_norm", "normaliser")
        }

    def evaluate(self, trainer) -> dict[str, float]:
        if self.data.eval is None:
            return {}
        extra = None
        if self.ref_eval is not None:
            extra = dict(
                ref_chosen_logps=self.ref_eval.chosen, ref_rejected_logps=self.ref_eval.rejected
            )
        loss = pairs = 0.0
        sums: dict[str, float] = {}
        frozen = self.frozen(0, trainer)
        for batch in held_out_batches(
            self.data.eval, self.config.micro_batch, limit=self.config.eval_max_rows, extra=extra
        ):
            s, n, m = trainer.loss_sums(trainer.place(batch, batch_axis=0), frozen)
            loss, pairs = loss + s, pairs + n
            sums = {k: sums.get(k, 0.0) + v for k, v in m.items()}
        return dict(eval_loss=loss / pairs, **{f"eval_{k}": v / pairs for k, v in sums.items()})

    def checkpoint_state(self, step: int):
        return None, dict(
            pairs_seen=step * self.config.batch_size,
            epoch=step * self.config.batch_size / len(self.data.train),
        )

    def fingerprint(self) -> str:
        return self.data.fingerprint

    def plots(self, metrics_path, out_dir) -> dict[str, Any]:
        from gemma_kit.training.metrics import plot_metrics

        png = plot_metrics(
            metrics_path,
            out_dir / "dpo.png",
            {
                "rewards_chosen": "implicit reward, chosen",
                "rewards_rejected": "implicit reward, rejected",
                "margin": "margin",
                "eval_margin": "held-out margin",
            },
            ylabel="beta * log(pi / ref)",
            smooth=("rewards_chosen", "rewards_rejected", "margin"),
            markers=("eval_margin",),
        )
        return {"dpo": png} if png else {}

    def summary(self) -> dict[str, Any]:
        return dict(data=self.stats)


# ------------------------------------------------------------------------------------------
# Helpers: structure checks and the stored reference log-probs


def check_same_structure(reference: dict, policy: dict, where: str) -> None:
    """CheckpointError unless the reference's trained variables have the policy's paths and
    shapes (the reference of (b) must be the same architecture)."""
    ref_flat = {
        "/".join(map(str, k)): v for k, v in nnx.traversals.flatten_mapping(reference).items()
    }
    pol_flat = {"/".join(map(str, k)): v for k, v in nnx.traversals.flatten_mapping(policy).items()}
    for path in sorted(set(ref_flat) | set(pol_flat)):
        a, b = ref_flat.get(path), pol_flat.get(path)
        if a is None or b is None or tuple(a.shape) != tuple(b.shape):
            got = "missing" if a is None else tuple(a.shape)
            want = "missing" if b is None else tuple(b.shape)
            raise CheckpointError(
                f"the reference model {where!r} is not the policy's architecture: {path} is "
                f"{got} there and {want} in the policy; give a checkpoint of the same model, or "
                "set precompute_ref_logps = true to use a different one"
            )


def reference_key(fingerprint: str, config: DPOConfig) -> str:
    """What the stored reference log-probs depend on: the data and the reference."""
    reference = config.reference
    if reference:
        path = pathlib.Path(reference)
        reference = f"{path.absolute()}@{path.stat().st_mtime_ns if path.exists() else 0}"
    text = repr(
        (
            fingerprint,
            reference,
            config.base,
            config.method,
            config.loss_chunk,
            config.resolved_compute_dtype(),
            config.resolved_param_dtype(),
        )
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_reference_logps(
    path: pathlib.Path, key: str, train: _RefLogps, held: _RefLogps | None
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = dict(
        key=np.asarray(key), train_chosen=train.chosen, train_rejected=train.rejected
    )
    if held is not None:
        arrays.update(eval_chosen=held.chosen, eval_rejected=held.rejected)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def read_reference_logps(path: pathlib.Path, key: str):
    """(train, eval) stored for `key`, or None (no file, or one for other data/reference)."""
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as f:
        if str(f["key"]) != key:
            return None
        train = _RefLogps(f["train_chosen"], f["train_rejected"])
        held = _RefLogps(f["eval_chosen"], f["eval_rejected"]) if "eval_chosen" in f else None
    return train, held


def train_dpo(
    config: DPOConfig, *, model=None, tokenizer=None, resume: bool = False
) -> TrainResult:
    """Runs (or resumes) a DPO / IPO run as `config` describes (see the module docstring).

    model / tokenizer: the policy's starting model instead of loading `config.base`; LoRA is
    added unless it has some (the reference (a) is then its base with the adapter off).
    """
    return run(config, DPO(), model=model, tokenizer=tokenizer, resume=resume)
