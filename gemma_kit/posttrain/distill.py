"""Knowledge distillation (GKD, 2306.13649) as one objective on the training core.

    from gemma_kit.posttrain.distill import train_distill
    from gemma_kit.posttrain.distill_config import DistillConfig
    result = train_distill(DistillConfig.from_file("posttrain/configs/distill_gkd.toml"))

The command line is `gemma-kit distill --config FILE [--resume] [--set key=value ...]`; the run
itself (the compiled step, mesh, checkpoints, --resume, Ctrl-C, NaN stop, metrics.jsonl,
loss.png, summary.json, adapter/ or model/) is gemma_kit.training.loop.run. This module supplies
the objective, `Distillation`:

Data. Step s draws u from (seed, s): with u < lmbda it is ON-POLICY, the student's own samples
of batch_size / num_samples prompts (drawn by gemma_kit.posttrain.rollout from the CURRENT
parameters, from (seed, s), so a resumed run draws the same), else OFF-POLICY: the outputs of
train_file's rows (supervised KD), or with seq_kd the teacher's samples (drawn fresh at each step,
or once for the whole run with teacher_samples = "fixed"). Either way the loss is a divergence
between the teacher's and the student's next-token distributions at every completion token.

Alignment. Every row comes as a pair: the student's row (its prompt, then the completion) and
the teacher's row (the teacher's prompt, which may hold a hidden prefix, then the same
completion), with teacher_index [B, T] mapping each student position to the teacher position
that predicts the same completion token (t + len(teacher prompt) - len(student prompt)). The
teacher's final hidden states are gathered at those positions, so the two models' logits are
compared for the same completion token whatever each one saw before it.

Loss (gemma_kit.posttrain.losses and logprobs: chunked, [B, T, V] never whole): DistillLoss,
with the teacher's parameters a FROZEN pytree of the step (another teacher of the same shapes
runs the same compiled program). teacher = "base" is the student's own network under other
values of its trained variables (LoRA with B = 0: the base model, no second copy of the
weights; gemma_kit.posttrain.policy). The per-position values are weighted by the reduction's
weights: token-mean (each completion token once) or sequence-mean (1 / the completion's length),
over a normaliser that counts tokens or sequences.

Sampled top-K (Gemma 3): targets drawn inside the step from the teacher's distribution, K ids
per position with the key fold_in(row key, position) (a pool row's key is fold_in(seed stream,
row index)); OFFLINE (topk_targets), the same draws are written once for the fixed pool of rows
(write_topk_targets, an .npz of ids and probs per completion position) and the step reads them:
no teacher forward pass in training.

Held-out metrics (every eval_every steps, and before and after): on held-out prompts the reverse
KL(student || teacher) on fresh student samples and the forward KL(teacher || student) on
teacher samples (drawn once), with an optional golden teacher (the teacher-hacking probe of
2502.02671: the training divergence falling while a golden one rises), and on held-out dataset
rows the forward KL and the student's perplexity. divergence.png draws them against the step.

OUT_DIR receives what `gemma-kit finetune` writes (config.json, checkpoints/, metrics.jsonl,
loss.png, summary.json, adapter/ or model/) and divergence.png.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_kit.decode import bucket
from gemma_kit.errors import ChatFormatError, ConfigError, DataError
from gemma_kit.finetune.data import batch_index, fingerprint, load_dataset, read_jsonl
from gemma_kit.lora import LoRAParam
from gemma_kit.posttrain import logprobs, losses
from gemma_kit.posttrain.distill_config import TEACHER_KEYWORDS, DistillConfig
from gemma_kit.posttrain.policy import reference_values, with_trained
from gemma_kit.posttrain.rollout import Rollout, rollout
from gemma_kit.training.loop import TrainResult, run
from gemma_kit.training.losses import attention_mask
from gemma_kit.training.model import trainable_filter
from gemma_kit.training.objective import Objective, RunContext
from gemma_kit.training.trainer import micro_batches

__all__ = [
    "DistillLoss",
    "Distillation",
    "Prompt",
    "paired_rows",
    "read_prompts",
    "reduction_weights",
    "train_distill",
    "write_topk_targets",
]

# Independent random streams of a run, each keyed by (seed, stream): seed * STREAMS + stream.
STREAMS = 16
STUDENT, TEACHER, POOL, EVAL_STUDENT, EVAL_TEACHER, GOLDEN, TOPK, TOPK_FRESH, MIX = range(9)
TARGETS_FORMAT = "gemma_kit.topk_targets/1"
STUDENT_ARRAYS = ("tokens", "targets", "weights", "positions", "segments")
TEACHER_ARRAYS = ("teacher_tokens", "teacher_positions", "teacher_segments", "teacher_index")


def stream_seed(seed: int, stream: int) -> int:
    return seed * STREAMS + stream


# ------------------------------------------------------------------------------------------
# Prompts


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt as token ids, <bos> first: what the student sees and what the teacher sees
    (the same, or with the hidden prefix); source is "file:line"."""

    student: tuple[int, ...]
    teacher: tuple[int, ...]
    source: str


def read_prompts(path: str | os.PathLike, tokenizer, prefix: str = "") -> list[Prompt]:
    """A JSONL file of {"prompt": str} or {"messages": [...]} rows -> Prompts.

    A "messages" prompt is written in the Gemma chat format with the generation prompt (so it
    must end with a user turn); the teacher's prefix becomes its system prompt (before an
    existing one). A "prompt" is plain text; the teacher's is prefix + prompt. A malformed row
    raises DataError naming file:line; an empty file, one naming the file.
    """
    path = pathlib.Path(path).expanduser()
    out = []
    for line_no, line in read_jsonl(path):
        try:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"not valid JSON ({err.msg} at column {err.colno})") from None
            student, teacher = _prompt_ids(obj, tokenizer, prefix)
        except (ValueError, ChatFormatError) as err:
            raise DataError(str(err), path=path, line=line_no) from None
        out.append(Prompt(tuple(student), tuple(teacher), f"{path}:{line_no}"))
    return out


def _prompt_ids(obj: Any, tokenizer, prefix: str) -> tuple[list[int], list[int]]:
    if not isinstance(obj, dict) or len({"prompt", "messages"} & set(obj)) != 1:
        found = f"keys {sorted(obj)}" if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(
            'a prompt row needs exactly one of {"prompt": str} or '
            f'{{"messages": [...]}}; found {found}'
        )
    if "prompt" in obj:
        text = obj["prompt"]
        if not isinstance(text, str) or not text:
            raise ValueError('"prompt" must be a non-empty string')
        return tokenizer.encode(text), tokenizer.encode(prefix + text)
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list of {"role", "content"}')
    student = tokenizer.encode_chat(messages, add_generation_prompt=True)
    if not prefix:
        return student, student
    first = messages[0]
    if isinstance(first, dict) and first.get("role") == "system":
        hidden = [dict(first, content=prefix + str(first.get("content", "")))] + messages[1:]
    else:
        hidden = [{"role": "system", "content": prefix}] + messages
    return student, tokenizer.encode_chat(hidden, add_generation_prompt=True)


# ------------------------------------------------------------------------------------------
# Rows: student and teacher, aligned on the completion


def paired_rows(
    out: Rollout, student_prompts, teacher_prompts, length: int, teacher_length: int
) -> dict[str, np.ndarray]:
    """A rollout's completions as aligned (student, teacher) rows.

    student_prompts / teacher_prompts: each rollout row's prompt ids as the student and as the
    teacher sees it (the rollout itself may have been drawn from either). Returns the student's
    arrays [R, length] (tokens, targets, weights, positions, segments: the packed-row layout,
    weights 1 on the completion tokens, the stop token included) and the teacher's
    teacher_tokens, teacher_positions, teacher_segments [R, teacher_length], with teacher_index
    [R, length]: the teacher position that predicts the same completion token as the student's
    position t (t + len(teacher prompt) - len(student prompt) where weights > 0, else 0).
    """
    student = dataclasses.replace(out, prompt_ids=[list(p) for p in student_prompts])
    teacher = dataclasses.replace(out, prompt_ids=[list(p) for p in teacher_prompts])
    rows = student.training_batch(length)
    other = teacher.training_batch(teacher_length)
    shift = np.array([len(t) - len(s) for s, t in zip(student_prompts, teacher_prompts)])
    index = np.arange(length)[None, :] + shift[:, None]
    rows = {k: rows[k] for k in STUDENT_ARRAYS}
    rows.update(
        teacher_tokens=other["tokens"],
        teacher_positions=other["positions"],
        teacher_segments=other["segments"],
        teacher_index=np.where(rows["weights"] > 0, index, 0).astype(np.int32),
    )
    return rows


def same_rows(
    rows: dict[str, np.ndarray], length: int, teacher_length: int
) -> dict[str, np.ndarray]:
    """Dataset rows (packed, [R, T'] with T' <= length) that the teacher sees as they are:
    padded to `length` (student) and `teacher_length` (teacher), teacher_index the identity."""

    def pad(x, n):
        return np.pad(x, ((0, 0), (0, n - x.shape[1])))

    out = {k: pad(rows[k], length) for k in STUDENT_ARRAYS}
    out.update(
        teacher_tokens=pad(rows["tokens"], teacher_length),
        teacher_positions=pad(rows["positions"], teacher_length),
        teacher_segments=pad(rows["segments"], teacher_length),
        teacher_index=np.broadcast_to(
            np.arange(length, dtype=np.int32), out["tokens"].shape
        ).copy(),
    )
    return out


def reduction_weights(
    weights: np.ndarray, segments: np.ndarray, reduction: str
) -> tuple[np.ndarray, np.ndarray]:
    """(loss_weights [B, T], normaliser [B]) of rows under a reduction.

    token-mean: each counted position weighs 1, a row's normaliser is its counted positions.
    sequence-mean: each counted position of a sequence (a segment of a packed row) weighs
    1 / that sequence's counted positions, a row's normaliser is its sequences with any. Then
    sum(values * loss_weights) / sum(normaliser) over a step is losses.reduce_mean's value.
    """
    losses.check_reduction(reduction)
    weights = weights.astype(np.float32)
    if reduction == "token-mean":
        return weights, weights.sum(axis=1)
    loss_weights = np.zeros_like(weights)
    normaliser = np.zeros(weights.shape[0], np.float32)
    for r in range(weights.shape[0]):
        for seg in np.unique(segments[r][segments[r] > 0]):
            where = segments[r] == seg
            n = weights[r][where].sum()
            if n > 0:
                loss_weights[r][where] = weights[r][where] / n
                normaliser[r] += 1
    return loss_weights, normaliser


# ------------------------------------------------------------------------------------------
# The loss


def student_hidden(model, batch: dict) -> jax.Array:
    """The student's final hidden states [B, T, D] of a batch of rows."""
    mask = attention_mask(batch["positions"], batch["segments"])
    return model.hidden_states(batch["tokens"], batch["positions"], mask)


def teacher_hidden(teacher, batch: dict) -> jax.Array:
    """The teacher's final hidden states of its own rows, gathered at teacher_index: [B, T, D]
    aligned with the student's positions (no gradient)."""
    mask = attention_mask(batch["teacher_positions"], batch["teacher_segments"])
    hidden = teacher.hidden_states(batch["teacher_tokens"], batch["teacher_positions"], mask)
    hidden = jnp.take_along_axis(hidden, batch["teacher_index"][..., None], axis=1)
    return jax.lax.stop_gradient(hidden)


def draw_targets(
    teacher, hidden: jax.Array, keys: jax.Array, k: int, *, temperature: float, chunk: int
) -> tuple[jax.Array, jax.Array]:
    """Sampled top-K targets of each row: hidden [B, T, D], keys [B, 2] (uint32 key data) ->
    ids, probs [B, T, K]. Row b position t draws with fold_in(key_b, t): rows are independent
    of how they are batched (an offline file holds the same draws). One row at a time, its
    positions in chunks (logprobs.sample_teacher_topk): at most [chunk, V] logits at once."""

    def one(args):
        h, key = args
        ids, probs = logprobs.sample_teacher_topk(
            teacher, h[None], jax.random.wrap_key_data(key), k, temperature=temperature, chunk=chunk
        )
        return ids[0], probs[0]

    return jax.lax.map(one, (hidden, keys))


@dataclasses.dataclass(frozen=True)
class DistillLoss:
    """The distillation loss on aligned (student, teacher) rows: `(model, batch, frozen) ->
    (sum of per-position values x loss_weights, sum of normaliser, metrics)`.

    divergence: a losses.Divergence (forward / reverse KL, JSD(beta), alpha), or None with
      topk > 0: Gemma 3's sampled top-K cross-entropy, its targets drawn in the step from
      batch["topk_keys"], or read from batch["topk_ids"] / ["topk_probs"] when offline (then
      no teacher runs).
    teacher: the teacher's graphdef (its values: frozen["teacher"]), or None: the student's
      own network with frozen["teacher"] as the values of its trained variables (`kind`).
    metrics: completion_tokens (the counted positions, summed over micro-batches).
    """

    divergence: losses.Divergence | None = None
    topk: int = 0
    offline: bool = False
    temperature: float = 1.0  # of the top-K draws and the student's log-probs against them
    teacher: Any = None
    kind: Any = LoRAParam
    chunk: int = 1024

    def teacher_model(self, model, frozen):
        if self.teacher is None:
            return with_trained(model, frozen["teacher"], self.kind)
        return nnx.merge(self.teacher, frozen["teacher"])

    def compared_with(self, model, batch, frozen):
        """What the student is compared with: ((teacher, its aligned hidden states, the
        divergence), None) for a full-vocabulary divergence, or (None, (ids, probs)) sampled
        top-K targets, read from the batch (offline) or drawn from the teacher in the step."""
        if self.offline:
            return None, (batch["topk_ids"], batch["topk_probs"])
        teacher = self.teacher_model(model, frozen)
        aligned = teacher_hidden(teacher, batch)
        if not self.topk:
            assert self.divergence is not None  # a divergence, or topk: DistillConfig's choice
            return (teacher, aligned, self.divergence), None
        targets = draw_targets(
            teacher,
            aligned,
            batch["topk_keys"],
            self.topk,
            temperature=self.temperature,
            chunk=self.chunk,
        )
        return None, targets

    def per_position(self, model, batch, frozen) -> jax.Array:
        """The divergence at every position [B, T] (unweighted); __call__ is its weighted sum,
        value and gradient computed in one pass."""
        hidden = student_hidden(model, batch)
        full, topk = self.compared_with(model, batch, frozen)
        if topk is not None:
            ids, probs = topk
            return logprobs.sampled_topk_kd(
                model, hidden, ids, probs, temperature=self.temperature, chunk=self.chunk
            )
        teacher, aligned, divergence = full
        return logprobs.divergence(model, hidden, teacher, aligned, divergence, chunk=self.chunk)

    def __call__(self, model, batch, frozen=None):
        # Value and gradient from one pass over the chunks (logprobs.*_sum): each chunk's
        # logits are made once per model, not again in the backward pass.
        weights = batch["loss_weights"]
        hidden = student_hidden(model, batch)
        full, topk = self.compared_with(model, batch, frozen)
        if topk is not None:
            ids, probs = topk
            loss = logprobs.sampled_topk_kd_sum(
                model, hidden, ids, probs, weights, temperature=self.temperature, chunk=self.chunk
            )
        else:
            teacher, aligned, divergence = full
            loss = logprobs.divergence_sum(
                model, hidden, teacher, aligned, divergence, weights, chunk=self.chunk
            )
        return self._result(loss, batch)

    @staticmethod
    def _result(loss, batch):
        normaliser = jnp.sum(batch["normaliser"].astype(jnp.float32))
        return loss, normaliser, {"completion_tokens": jnp.sum(batch["weights"])}


def probe_sums(student, teacher, batch: dict, chunk: int) -> dict[str, jax.Array]:
    """Held-out sums over the weighted positions of aligned rows, from one pass over chunks of
    positions (each chunk's student and teacher logits made once): reverse_kl
    KL(student || teacher), forward_kl KL(teacher || student), nll -log p_student(target), and
    tokens (the weights' sum)."""
    hidden = student_hidden(student, batch)
    aligned = teacher_hidden(teacher, batch)
    B, T = batch["tokens"].shape

    def fn(hs, ht, target):
        s = student.logits(hs[None])[0].astype(jnp.float32)
        t = teacher.logits(ht[None])[0].astype(jnp.float32)
        return (
            losses.reverse_kl_per_position(s, t),
            losses.forward_kl_per_position(s, t),
            -losses.token_log_probs(s, target),
        )

    outs = logprobs.map_chunks(
        fn,
        (
            hidden.reshape(B * T, -1),
            aligned.reshape(B * T, -1),
            jnp.maximum(batch["targets"], 0).reshape(-1),
        ),
        chunk,
    )
    w = batch["weights"].astype(jnp.float32)
    sums = {
        name: jnp.sum(x.reshape(B, T) * w)
        for name, x in zip(("reverse_kl", "forward_kl", "nll"), outs)
    }
    return dict(sums, tokens=jnp.sum(w))


@functools.lru_cache(maxsize=8)
def compiled_probe(graphdef, teacher_graphdef, kind, chunk: int):
    """jit of probe_sums for the student's network `graphdef` (values: trainable, fixed)
    against a teacher: a separate network (teacher_graphdef, its values) or, when
    teacher_graphdef is None, the student's network with `values` as its `kind` variables.
    Cached: every run of the same networks in a process shares the compiled probe."""

    @jax.jit
    def probe(trainable, fixed, values, batch):
        student = nnx.merge(graphdef, trainable, fixed)
        teacher = (
            with_trained(student, values, kind)
            if teacher_graphdef is None
            else nnx.merge(teacher_graphdef, values)
        )
        return probe_sums(student, teacher, batch, chunk)

    return probe


@functools.lru_cache(maxsize=8)
def compiled_draw(graphdef, kind, k: int, temperature: float, chunk: int):
    """jit of the top-K draws of aligned teacher rows: frozen = {"values": the network's
    values, "teacher": None, or the values of its `kind` variables that make it the teacher
    (the student's base)} -> ids, probs [B, T, K]."""

    @jax.jit
    def draw(frozen, batch, keys):
        teacher = nnx.merge(graphdef, frozen["values"])
        if frozen["teacher"] is not None:
            teacher = with_trained(teacher, frozen["teacher"], kind)
        return draw_targets(
            teacher, teacher_hidden(teacher, batch), keys, k, temperature=temperature, chunk=chunk
        )

    return draw


# ------------------------------------------------------------------------------------------
# Models


def load_teacher(name: str, config: DistillConfig, student, given=None):
    """The teacher named `name` ("default", "base" or a folder) as a model, or None for "base"
    (the student's own network); `given`, a model passed in code, wins. Refuses a vocabulary
    other than the student's with one error naming both sizes."""
    if given is not None:
        teacher = given
    elif name == "base":
        return None
    else:
        dtype = jnp.dtype(config.resolved_compute_dtype())
        if name == "default":
            from gemma_kit.embedded import default_model

            teacher, _ = default_model(compute_dtype=dtype)
        else:
            from gemma_kit.loading import load_model

            teacher = load_model(name, compute_dtype=dtype, text_only=True)
    s, t = student.config, teacher.config
    if s.vocab_size != t.vocab_size:
        raise ConfigError(
            f"the teacher ({t.name}, a vocabulary of {t.vocab_size} ids) and the student "
            f"({s.name}, {s.vocab_size} ids) have different vocabularies; distillation compares "
            "their next-token distributions id by id, so both must share one vocabulary "
            "(e.g. two Gemma 3 models)"
        )
    return teacher


class ModelHandle:
    """A model to sample from and to score with: its Sampler, its graphdef and its values.

    model None: the student's own network under `values` (teacher = "base"), drawn from with
    the student's Sampler, those values swapped in for the draw (no second copy of the
    weights). values None: the Sampler's parameters are left as they are (the student, whose
    current values the caller swaps in).
    """

    def __init__(self, sampler, model=None, values=None):
        self.sampler = sampler
        self.model = model
        self.values = values
        if model is not None:
            self.graphdef, self.state = nnx.split(model)

    def frozen_values(self) -> dict:
        """The values the step and the probes get: a pure dict."""
        values = self.values if self.model is None else self.state
        return nnx.to_pure_dict(values) if isinstance(values, nnx.State) else values

    def draw(self, prompts, config: DistillConfig, k: int, seed: int, step: int) -> Rollout:
        if self.model is None and self.values is not None:
            self.sampler.update_params(nnx.State(self.values))
        return rollout(
            self.sampler,
            [list(p) for p in prompts],
            k,
            config.max_new_tokens,
            seed=seed,
            step=step,
            temperature=config.sample_temperature,
            behaviour_logprobs=False,
        )


# ------------------------------------------------------------------------------------------
# The objective


class Distillation(Objective):
    """Distillation of a teacher into the trained model (see the module docstring)."""

    name = "distillation"
    loss_label = "training divergence (nats / token)"
    loss: DistillLoss
    config: DistillConfig
    # Set by prepare(): None where the run has none (kept loose: mypy cannot see when).
    teacher: Any  # a ModelHandle; None when offline targets make it unneeded
    pool: Any  # the fixed off-policy rows, {name: [R, ...]}
    data: Any  # the train_file Dataset
    student_sampler: Any

    def __init__(self, *, teacher=None, golden=None, write_only: bool = False):
        """teacher / golden: models to use instead of loading config.teacher /
        golden_teacher; write_only: prepare() writes the offline top-K targets and stops."""
        self.given_teacher = teacher
        self.given_golden = golden
        self.write_only = write_only
        self.stats: dict[str, Any] = {}
        self.last: dict[str, float] = {}
        self.eval_key = "eval_reverse_kl"
        self.frozen_tree = None
        self.probes: dict[int, tuple] = {}

    # -- before the model ---------------------------------------------------------------
    def check_inputs(self, config) -> None:
        for path in (
            config.prompts_file,
            config.eval_prompts_file,
            config.train_file,
            config.eval_file,
        ):
            if path:
                read_jsonl(path)
        for name, given in (
            (config.teacher, self.given_teacher),
            (config.golden_teacher, self.given_golden),
        ):
            if name and name not in TEACHER_KEYWORDS and given is None:
                from gemma_kit.checkpoint.official import find_checkpoint

                find_checkpoint(name)

    # -- loading ------------------------------------------------------------------------
    def load_prompts(self, tokenizer, prefix: str) -> tuple[list[Prompt], list[Prompt]]:
        """(training prompts, held-out prompts), the teacher's ids with `prefix`: the held-out
        ones from eval_prompts_file, else a seeded split of eval_fraction of prompts_file."""
        c = self.config
        if not c.prompts_file:
            return [], []
        prompts = read_prompts(c.prompts_file, tokenizer, prefix)
        if c.eval_prompts_file:
            return prompts, read_prompts(c.eval_prompts_file, tokenizer, prefix)
        n_eval = int(round(c.eval_fraction * len(prompts)))
        if c.eval_fraction > 0 and len(prompts) >= 2:
            n_eval = min(max(n_eval, 1), len(prompts) - 1)
        order = np.random.default_rng([c.seed, 0xE7A1]).permutation(len(prompts))
        held = set(order[:n_eval].tolist())
        return (
            [p for i, p in enumerate(prompts) if i not in held],
            [p for i, p in enumerate(prompts) if i in held],
        )

    def prepare(self, context: RunContext) -> int:
        c: DistillConfig = context.config  # type: ignore[assignment]
        self.config, self.seed = c, c.seed
        model, tok, say = context.model, context.tokenizer, context.say
        self.kind = trainable_filter(c)

        # Prompts and data.
        self.prompts, self.eval_prompts = self.load_prompts(tok, c.teacher_prefix)
        self.golden_prompts = []
        if c.golden_teacher and self.eval_prompts:
            self.golden_prompts = self.load_prompts(tok, c.golden_prefix)[1]
        self.data = None
        if c.train_file:
            self.data = load_dataset(
                c.train_file,
                tok,
                max_length=c.max_length,
                eval_file=c.eval_file,
                eval_fraction=c.eval_fraction,
                packing=c.packing,
                skip_bad_rows=c.skip_bad_rows,
                seed=c.seed,
            )

        # Row lengths: one shape for every step (a second would compile the step again).
        every = self.prompts + self.eval_prompts + self.golden_prompts
        N = c.max_new_tokens
        lengths = [len(p.student) + N - 1 for p in every]
        if self.data is not None:
            lengths.append(c.max_length)
        self.T = bucket(max(lengths), 16)
        self.T_teacher = max(
            self.T, bucket(max([len(p.teacher) + N - 1 for p in every], default=0), 16)
        )
        if self.T_teacher > model.config.max_context:
            raise ConfigError(
                f"rows of {self.T_teacher} tokens (the longest prompt plus "
                f"max_new_tokens) exceed the model's context of "
                f"{model.config.max_context}"
            )

        # The student's Sampler (made once; each draw swaps the current values in), the
        # teacher and the golden teacher.
        from gemma_kit.sampler import Sampler

        self.student_model = model
        self.student_sampler = (
            Sampler(model, tok)
            if (
                c.uses_prompts
                or self.eval_prompts
                or c.teacher == "base"
                or c.golden_teacher == "base"
            )
            else None
        )
        self.reference = reference_values(nnx.state(model, self.kind), self.kind)
        # Offline top-K targets already written for the dataset rows, and nothing held out to
        # compare with the teacher: the run never needs the teacher, so it is not loaded.
        offline_ready = (
            c.offline_topk
            and c.uses_dataset
            and not self.write_only
            and pathlib.Path(str(c.topk_targets)).expanduser().is_file()
        )
        held_out = bool(self.eval_prompts) or (self.data is not None and self.data.eval is not None)
        self.teacher = (
            None
            if offline_ready and not held_out
            else self.handle(c.teacher, self.given_teacher, tok)
        )
        self.golden = (
            self.handle(c.golden_teacher, self.given_golden, tok) if c.golden_teacher else None
        )
        say(
            f"teacher: {self.describe(self.teacher, c.teacher)}"
            + (
                f"; golden teacher: {self.describe(self.golden, c.golden_teacher)}"
                if self.golden
                else ""
            )
        )

        # The loss.
        div = (
            None
            if c.divergence == "sampled_topk"
            else losses.Divergence(
                c.divergence, beta=c.beta, alpha=c.alpha, temperature=c.loss_temperature
            )
        )
        self.loss = DistillLoss(
            divergence=div,
            topk=c.topk if div is None else 0,
            offline=c.offline_topk,
            temperature=c.loss_temperature,
            teacher=None
            if self.teacher is None or self.teacher.model is None
            else self.teacher.graphdef,
            kind=self.kind,
            chunk=c.loss_chunk,
        )

        # The fixed pool of off-policy rows: the dataset's, or the teacher's samples.
        self.pool = None
        if c.uses_dataset:
            train = self.data.train
            self.pool = same_rows(train.take(np.arange(len(train))), self.T, self.T_teacher)
        elif c.seq_kd and c.teacher_samples == "fixed":
            say(
                f"drawing the teacher's samples once: {len(self.prompts)} prompts x {c.num_samples}"
            )
            self.pool = self.pair(
                self.draws(
                    self.teacher, self.prompts, c.num_samples, source=teacher_ids, stream=POOL
                ),
                teacher_ids,
            )
        self.targets = None
        if c.offline_topk:
            self.targets = self.offline_targets(context)
            if self.write_only:
                return 0

        # Held-out sets drawn once: the teacher's (and the golden teacher's) samples.
        self.eval_teacher_rows = self.eval_golden_rows = None
        if self.eval_prompts:
            self.eval_teacher_rows = self.pair(
                self.draws(
                    self.teacher,
                    self.eval_prompts,
                    c.eval_samples,
                    source=teacher_ids,
                    stream=EVAL_TEACHER,
                ),
                teacher_ids,
            )
            if self.golden is not None:
                self.eval_golden_rows = self.pair(
                    self.draws(
                        self.golden,
                        self.golden_prompts,
                        c.eval_samples,
                        source=teacher_ids,
                        stream=GOLDEN,
                    ),
                    teacher_ids,
                )
        self.eval_data_rows = None
        if self.data is not None and self.data.eval is not None:
            held = self.data.eval
            cap = len(held) if c.eval_max_rows is None else min(len(held), c.eval_max_rows)
            self.eval_data_rows = same_rows(held.take(np.arange(cap)), self.T, self.T_teacher)
        if not self.eval_prompts:
            self.eval_key = "eval_data_forward_kl"
        # A separate teacher's Sampler holds a copy of its weights in the decode layout: keep
        # it only while steps still draw from it (fresh teacher samples).
        fresh = c.seq_kd and c.teacher_samples == "fresh" and c.lmbda < 1
        for handle in (self.teacher, self.golden):
            if (
                handle is not None
                and handle.model is not None
                and not (fresh and handle is self.teacher)
            ):
                handle.sampler = None

        self.stats = dict(
            train_prompts=len(self.prompts),
            eval_prompts=len(self.eval_prompts),
            pool_rows=0 if self.pool is None else len(self.pool["tokens"]),
            row_length=self.T,
            teacher_row_length=self.T_teacher,
        )
        if self.data is not None:
            self.stats["data"] = self.data.stats
        off = "teacher samples" if c.seq_kd else "dataset outputs"
        say(
            f"data: {len(self.prompts)} training prompts, {len(self.eval_prompts)} held-out; "
            f"lmbda {c.lmbda} ({off} off policy); rows of {self.T} tokens (the teacher's "
            f"{self.T_teacher})"
        )
        self.steps = self.count_steps()
        return self.steps

    def handle(self, name: str, given, tok) -> ModelHandle:
        """The ModelHandle of teacher `name` (or of the model given in code)."""
        teacher = load_teacher(name, self.config, self.student_model, given)
        if teacher is None:
            return ModelHandle(self.student_sampler, values=self.reference)
        from gemma_kit.sampler import Sampler

        teacher = nnx.merge(*nnx.split(teacher))  # a shallow copy: the dtype is set on it
        teacher.dtype = jnp.dtype(self.config.resolved_compute_dtype())
        return ModelHandle(Sampler(teacher, tok), model=teacher)

    @staticmethod
    def describe(handle: ModelHandle | None, name: str | None) -> str:
        if handle is None:
            return f"{name}, not loaded: the steps read its written top-K targets"
        if handle.model is None:
            return "the student's base model (its trained variables at their base values)"
        return f"{handle.model.config.name} ({name})"

    def count_steps(self) -> int:
        c = self.config
        if c.steps is not None:
            return c.steps
        if self.pool is None:  # every step samples: epochs over the prompts
            items, per_step = len(self.prompts), c.batch_size // c.num_samples
        else:
            items, per_step = len(self.pool["tokens"]), c.batch_size
        return max(1, math.ceil(float(c.epochs or 0) * items / per_step))

    # -- rows ---------------------------------------------------------------------------
    def draws(
        self,
        handle: ModelHandle,
        prompts: list[Prompt],
        k: int,
        *,
        source,
        stream: int,
        step: int = 0,
    ) -> list[tuple[Rollout, list[Prompt]]]:
        """k samples of each prompt drawn by `handle` from source(prompt) (its ids), in groups
        of batch_size rows (the rollout's compiled shapes): [(rollout, the prompt of each of
        its rows)]."""
        group = max(1, self.config.batch_size // k)
        out = []
        for g, start in enumerate(range(0, len(prompts), group)):
            chunk = prompts[start : start + group]
            drawn = handle.draw(
                [source(p) for p in chunk],
                self.config,
                k,
                stream_seed(self.seed, stream),
                step * 1_000_003 + g,
            )
            out.append((drawn, [p for p in chunk for _ in range(k)]))
        return out

    def pair(self, draws, teacher_side) -> dict[str, np.ndarray]:
        """The draws as aligned rows: the student's prompt and teacher_side(prompt)."""
        parts = [
            paired_rows(
                out,
                [p.student for p in rows],
                [teacher_side(p) for p in rows],
                self.T,
                self.T_teacher,
            )
            for out, rows in draws
        ]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    def on_policy(self, step: int) -> bool:
        """Whether step `step` samples from the student (u < lmbda, u from (seed, step))."""
        lmbda = self.config.lmbda
        if lmbda >= 1 or lmbda <= 0:
            return lmbda >= 1
        return bool(np.random.default_rng([self.seed, step, MIX]).random() < lmbda)

    def host_batch(self, step: int, trainer) -> dict[str, np.ndarray]:
        c = self.config
        on = self.on_policy(step)
        if on or self.pool is None:  # samples of this step: the student's or the teacher's
            per_step = c.batch_size // c.num_samples
            chosen = [
                self.prompts[i] for i in batch_index(step, per_step, self.seed, len(self.prompts))
            ]
            if on:
                self.student_sampler.update_params(trainer.trainable)
                handle, source, stream = ModelHandle(self.student_sampler), student_ids, STUDENT
            else:
                handle, source, stream = self.teacher, teacher_ids, TEACHER
            out = handle.draw(
                [source(p) for p in chosen], c, c.num_samples, stream_seed(self.seed, stream), step
            )
            chosen = [p for p in chosen for _ in range(c.num_samples)]
            rows = paired_rows(
                out,
                [p.student for p in chosen],
                [p.teacher for p in chosen],
                self.T,
                self.T_teacher,
            )
            self.last = dict(on_policy=int(on), sample_length=float(out.lengths.mean()))
            if self.loss.topk:
                rows["topk_keys"] = self.row_keys(TOPK_FRESH, range(len(chosen)), step)
        else:
            index = batch_index(step, c.batch_size, self.seed, len(self.pool["tokens"]))
            rows = {k: v[index] for k, v in self.pool.items()}
            self.last = dict(on_policy=0)
            if self.targets is not None:
                rows.update(self.targets.gather(index, rows["weights"]))
            elif self.loss.topk:
                rows["topk_keys"] = self.row_keys(TOPK, index)
        rows["loss_weights"], rows["normaliser"] = reduction_weights(
            rows["weights"], rows["segments"], c.reduction
        )
        return micro_batches(rows, c.grad_accum)

    def row_keys(self, stream: int, rows, step: int | None = None) -> np.ndarray:
        """[len(rows), 2] uint32 key data of the top-K draws of each row: fold_in(stream key,
        pool row index), or fold_in(fold_in(stream key, step), row) for rows of one step."""
        base = jax.random.key(stream_seed(self.seed, stream))
        if step is not None:
            base = jax.random.fold_in(base, step)
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(
            jnp.asarray(np.asarray(list(rows)), jnp.uint32)
        )
        return np.asarray(jax.random.key_data(keys))

    def frozen(self, step: int, trainer):
        if self.loss.offline:
            return None
        if self.frozen_tree is None:  # placed once; the same arrays every step
            self.frozen_tree = trainer.place_frozen({"teacher": self.teacher.frozen_values()})
        return self.frozen_tree

    def step_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        return dict(completion_tokens=int(metrics["completion_tokens"]), **self.last)

    # -- held out -----------------------------------------------------------------------
    def probe(self, trainer, handle: ModelHandle):
        """(the compiled probe of the student against `handle`, handle's placed values)."""
        key = id(handle)
        if key not in self.probes:
            teacher = None if handle.model is None else handle.graphdef
            self.probes[key] = (
                compiled_probe(trainer.graphdef, teacher, self.kind, self.config.loss_chunk),
                trainer.place_frozen(handle.frozen_values()),
            )
        return self.probes[key]

    def probe_rows(self, trainer, handle: ModelHandle, rows) -> dict[str, float]:
        """probe_sums over all `rows`, micro_batch rows at a time (the last batch padded with
        rows that weigh nothing)."""
        probe, values = self.probe(trainer, handle)
        n, b = len(rows["tokens"]), self.config.micro_batch
        total: dict[str, float] = {}
        for start in range(0, n, b):
            index = np.arange(start, start + b)
            real = index < n
            batch = {k: rows[k][np.where(real, index, 0)] for k in STUDENT_ARRAYS + TEACHER_ARRAYS}
            batch["weights"] = batch["weights"] * real[:, None]
            sums = probe(
                trainer.trainable, trainer.fixed, values, trainer.place(batch, batch_axis=0)
            )
            for k, v in sums.items():
                total[k] = total.get(k, 0.0) + float(v)
        return total

    def evaluate(self, trainer) -> dict[str, float]:
        c = self.config
        out: dict[str, float] = {}

        def mean(sums, key):
            return sums[key] / max(sums["tokens"], 1.0)

        if self.eval_prompts:
            self.student_sampler.update_params(trainer.trainable)
            draws = self.draws(
                ModelHandle(self.student_sampler),
                self.eval_prompts,
                c.eval_samples,
                source=student_ids,
                stream=EVAL_STUDENT,
            )
            drawn = self.pair(draws, teacher_ids)
            s = self.probe_rows(trainer, self.teacher, drawn)
            t = self.probe_rows(trainer, self.teacher, self.eval_teacher_rows)
            out.update(
                eval_reverse_kl=mean(s, "reverse_kl"),
                eval_forward_kl=mean(t, "forward_kl"),
                eval_teacher_sample_nll=mean(t, "nll"),
                eval_sample_length=s["tokens"] / len(drawn["tokens"]),
            )
            if self.golden is not None:
                # The same student samples, the teacher rows rebuilt with the golden prompts.
                golden = dict(zip(map(id, self.eval_prompts), self.golden_prompts))
                g = self.probe_rows(
                    trainer, self.golden, self.pair(draws, lambda p: golden[id(p)].teacher)
                )
                gt = self.probe_rows(trainer, self.golden, self.eval_golden_rows)
                out.update(
                    eval_golden_reverse_kl=mean(g, "reverse_kl"),
                    eval_golden_forward_kl=mean(gt, "forward_kl"),
                )
        if self.eval_data_rows is not None:
            d = self.probe_rows(trainer, self.teacher, self.eval_data_rows)
            out.update(
                eval_data_forward_kl=mean(d, "forward_kl"),
                eval_data_loss=mean(d, "nll"),
                eval_data_ppl=math.exp(min(mean(d, "nll"), 50.0)),
            )
        return out

    # -- offline top-K targets ----------------------------------------------------------
    def targets_fingerprint(self) -> str:
        """The identity of the pool's rows, the teacher and the top-K settings."""
        c = self.config
        digest = hashlib.sha256()
        for key in ("tokens", "targets", "weights", "teacher_tokens", "teacher_index"):
            digest.update(np.ascontiguousarray(self.pool[key]).tobytes())
        teacher = c.teacher if self.given_teacher is None else self.given_teacher.config.name
        digest.update(
            json.dumps(
                dict(teacher=teacher, k=c.topk, seed=c.seed, temperature=c.loss_temperature)
            ).encode()
        )
        return digest.hexdigest()[:16]

    def offline_targets(self, context: RunContext) -> TopKTargets:
        """The pool's targets: read from config.topk_targets, or drawn and written there."""
        c = self.config
        path = pathlib.Path(str(c.topk_targets)).expanduser()
        expected = self.targets_fingerprint()
        if path.is_file() and not self.write_only:
            targets = TopKTargets.load(path)
            if targets.fingerprint != expected:
                raise DataError(
                    "was written for other rows, another teacher or other top-K settings; "
                    "write it again (gemma-kit distill --write-targets) or name a new file",
                    path=path,
                )
            return targets
        context.say(
            f"writing the sampled top-{c.topk} teacher targets of "
            f"{len(self.pool['tokens'])} rows to {path}"
        )
        targets = self.draw_pool_targets(expected)
        if context.lead:
            targets.save(path)
        return targets

    def draw_pool_targets(self, fingerprint_: str) -> TopKTargets:
        """The top-K draws of every pool row, by the same function and keys as the step's."""
        c = self.config
        frozen: dict[str, Any]
        if self.teacher.model is None:  # the student's base network
            graphdef, values = nnx.split(self.student_model)
            frozen = dict(values=nnx.to_pure_dict(values), teacher=self.reference)
            draw = compiled_draw(graphdef, self.kind, c.topk, c.loss_temperature, c.loss_chunk)
        else:
            frozen = dict(values=self.teacher.frozen_values(), teacher=None)
            draw = compiled_draw(
                self.teacher.graphdef, None, c.topk, c.loss_temperature, c.loss_chunk
            )
        rows = self.pool
        n, b = len(rows["tokens"]), c.micro_batch
        ids_out, probs_out, offsets = [], [], [0]
        for start in range(0, n, b):
            index = np.arange(start, start + b)
            real = index < n
            index = np.where(real, index, 0)
            batch = {k: rows[k][index] for k in TEACHER_ARRAYS}
            ids, probs = jax.device_get(draw(frozen, batch, self.row_keys(TOPK, index)))
            for r in range(int(real.sum())):
                where = rows["weights"][index[r]] > 0
                ids_out.append(ids[r][where])
                probs_out.append(probs[r][where])
                offsets.append(offsets[-1] + int(where.sum()))
        return TopKTargets(
            np.concatenate(ids_out).astype(np.int32),
            np.concatenate(probs_out).astype(np.float32),
            np.asarray(offsets, np.int64),
            c.topk,
            fingerprint_,
        )

    # -- bookkeeping ----------------------------------------------------------------------
    def checkpoint_state(self, step: int):
        return None, dict(steps=step)

    def fingerprint(self) -> str:
        c = self.config
        return fingerprint(
            c.prompts_file or None,
            c.eval_prompts_file,
            data=self.data.fingerprint if self.data else None,
        )

    def plots(self, metrics_path, out_dir) -> dict:
        from gemma_kit.training.metrics import plot_metrics

        series = {
            "loss": "training divergence",
            "eval_reverse_kl": "held-out KL(student || teacher), student samples",
            "eval_forward_kl": "held-out KL(teacher || student), teacher samples",
            "eval_golden_reverse_kl": "KL(student || golden), student samples",
            "eval_golden_forward_kl": "KL(golden || student), golden samples",
            "eval_data_forward_kl": "held-out KL(teacher || student), dataset rows",
        }
        png = plot_metrics(
            metrics_path,
            out_dir / "divergence.png",
            series,
            ylabel="nats / token",
            smooth=("loss",),
            markers=tuple(k for k in series if k != "loss"),
        )
        return {"divergence": png} if png else {}

    def summary(self) -> dict:
        c = self.config
        on = sum(self.on_policy(s) for s in range(self.steps))
        return dict(
            teacher=c.teacher,
            teacher_prefix=c.teacher_prefix,
            divergence=c.divergence,
            beta=c.beta,
            lmbda=c.lmbda,
            seq_kd=c.seq_kd,
            on_policy_steps=on,
            off_policy_steps=self.steps - on,
            stats=self.stats,
        )


def student_ids(prompt: Prompt) -> tuple[int, ...]:
    return prompt.student


def teacher_ids(prompt: Prompt) -> tuple[int, ...]:
    return prompt.teacher


# ------------------------------------------------------------------------------------------
# Offline targets file


@dataclasses.dataclass
class TopKTargets:
    """Sampled top-K teacher targets of a fixed pool of rows, per weighted position.

    ids [P, K] int32 and probs [P, K] float32 for the P weighted positions of all rows in
    order; offsets [R + 1]: row r's positions are ids[offsets[r]:offsets[r + 1]], in position
    order. Stored as an .npz (no pickle) with the format and a fingerprint of the rows, the
    teacher and the settings.
    """

    ids: np.ndarray
    probs: np.ndarray
    offsets: np.ndarray
    k: int
    fingerprint: str

    def save(self, path: pathlib.Path) -> pathlib.Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial.npz")
        np.savez(
            tmp,
            format=np.array(TARGETS_FORMAT),
            fingerprint=np.array(self.fingerprint),
            k=np.array(self.k),
            ids=self.ids,
            probs=self.probs,
            offsets=self.offsets,
        )
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: pathlib.Path) -> TopKTargets:
        try:
            with np.load(path, allow_pickle=False) as f:
                if str(f["format"]) != TARGETS_FORMAT:
                    raise ValueError(f"format {str(f['format'])!r}")
                return cls(f["ids"], f["probs"], f["offsets"], int(f["k"]), str(f["fingerprint"]))
        except (ValueError, KeyError, OSError) as err:
            raise DataError(
                f"is not a gemma_kit top-K targets file ({err}); write it with "
                "gemma-kit distill --write-targets",
                path=path,
            ) from None

    def gather(self, index: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
        """topk_ids, topk_probs [B, T, K] of pool rows `index` (weights [B, T]: where their
        weighted positions are); zeros elsewhere."""
        B, T = weights.shape
        ids = np.zeros((B, T, self.k), np.int32)
        probs = np.zeros((B, T, self.k), np.float32)
        for r, i in enumerate(index):
            where = np.nonzero(weights[r] > 0)[0]
            lo, hi = self.offsets[i], self.offsets[i + 1]
            if hi - lo != len(where):
                raise DataError("does not match the rows it is used with; write it again")
            ids[r, where], probs[r, where] = self.ids[lo:hi], self.probs[lo:hi]
        return dict(topk_ids=ids, topk_probs=probs)


# ------------------------------------------------------------------------------------------
# Entry points


def train_distill(
    config: DistillConfig,
    *,
    student=None,
    teacher=None,
    tokenizer=None,
    golden=None,
    resume: bool = False,
) -> TrainResult:
    """Runs (or resumes) a distillation run as `config` describes; see the module docstring.

    student / tokenizer: use these instead of loading config.base (tests, notebooks);
    teacher / golden: models to use instead of loading config.teacher / golden_teacher.
    """
    return run(
        config,
        Distillation(teacher=teacher, golden=golden),
        model=student,
        tokenizer=tokenizer,
        resume=resume,
    )


def write_topk_targets(
    config: DistillConfig, *, student=None, teacher=None, tokenizer=None
) -> pathlib.Path:
    """Writes the sampled top-K targets file config.topk_targets for the run `config`
    describes (its fixed pool of rows) and returns its path; training with the same config
    then reads it instead of running the teacher."""
    from gemma_kit.training.loop import initialize_distributed
    from gemma_kit.training.model import build_model

    config = config.validate()
    if not config.offline_topk:
        raise ConfigError(
            '--write-targets needs divergence = "sampled_topk" and topk_targets = FILE (lmbda = 0)'
        )
    initialize_distributed(config)
    objective = Distillation(teacher=teacher, write_only=True)
    objective.check_inputs(config)
    model, tokenizer, _ = build_model(config, student, tokenizer)
    out = pathlib.Path(config.out_dir).expanduser().absolute()
    objective.prepare(
        RunContext(config, model, tokenizer, out, jax.process_index() == 0, lambda message: None)
    )
    return pathlib.Path(str(config.topk_targets)).expanduser()
