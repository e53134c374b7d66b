"""KL-regularised policy optimisation (REINFORCE, RLOO) and Best-of-N distillation (BOND,
J-BOND) as ONE objective on the training core.

    from gemma_kit.posttrain.rl import RLConfig, train_rl
    result = train_rl(RLConfig(prompts_file="prompts.jsonl", out_dir="runs/rl", steps=50,
                               reward="gemma_kit.posttrain.rewards:vader_sentiment",
                               algo="rloo", num_samples=4, kl_coef=0.05, anchor="ema"))

Each optimizer step (host_batch, then the core's compiled step):
  1. rollouts: `batch_size` prompts (a seeded shuffle of the prompts file, a pure function of
     (seed, step)), each completed `num_samples` (k) times by the CURRENT policy: the Sampler is
     built once and takes the trained values with Sampler.update_params (no copy of LoRA
     factors, no recompile); temperature 1, no filters (gemma_kit.posttrain.rollout). BOND also
     draws `anchor_samples` completions of each prompt from the anchor (the same Sampler with
     the anchor's values swapped in);
  2. rewards: the reward function (a callable, a "pkg.module:function" spec run in a worker
     process, or a reward model "rm:DIR"; gemma_kit.posttrain.rewards) scores every completion;
     a result of the wrong length or type is one RewardError;
  3. the scoring pass (one compiled program, no gradient): the policy's, the reference's and
     the anchor's log-probs of the sampled tokens, and the EXACT per-token KL over the whole
     vocabulary from the policy to the reference (the initial policy: LoRA factors with B = 0,
     i.e. the base, or the initial weights) and to the anchor, and the policy's entropy. The
     reference's and anchor's values are arguments of that program (frozen pytrees): a new
     anchor every step compiles nothing;
  4. advantages, per sequence y_i of prompt x (beta = kl_coef):
       rloo       R_i = r_i - beta sum_t k1_t,  A_i = R_i - mean_{j != i} R_j   (k >= 2)
       reinforce  the same R_i, A_i = R_i - mean of the batch
       bond       R_i = (N - 1) log p<=(y_i) - beta sum_t k1_t, p<= estimated from the anchor
                  samples (BOND section 4.1, Laplace-smoothed), beta = 1 by default (then the
                  policy gradient is that of KL(pi || pi_BoN), section 4.2); leave-one-out
                  baseline for k >= 2, the batch mean for k = 1
       jbond      R_i = jbond_reward(r_i, the two anchor rewards) - beta sum_t k1_t
     with k1_t = log pi(y_t) - log pi_anchor(y_t) (kl_penalty = "reward"); with
     kl_penalty = "loss" the reward stays r_i and beta * k3_t is added to the loss per token
     (GRPO's form; k3 = exp(-k1) + k1 - 1 >= 0);
  5. the step: the loss is gemma_kit.posttrain.losses.policy_gradient_loss over the rollout's
     rows, -A_i log pi(y_i) summed over completion tokens (a weighted cross-entropy with signed
     weights), over the number of sequences (loss_normaliser "sequences", the gradient of the
     sequence-level objective) or of completion tokens ("tokens"). With ppo_epochs > 1 a batch
     of rollouts serves several optimizer steps and the ratio pi / pi_behaviour enters,
     clipped to [1 - eps, 1 + eps] with clip_epsilon (the behaviour log-probs are the scoring
     pass's teacher-forced log-probs of the policy that drew the rollout, so the ratio is
     exactly 1 at the first epoch). BOND adds anchor_samples / best_of rows per prompt, the
     best (by reward, ties to the first) of each group of `best_of` anchor samples: Best-of-N
     samples, trained by maximum likelihood (the forward part, KL(pi_BoN || pi)), and mixes
     the two by the Jeffreys weight:
     loss = (1 - jeffreys_beta) * forward + jeffreys_beta * backward, each a mean per prompt;
  6. after the step: with anchor = "ema", anchor <- (1 - ema_rate) anchor + ema_rate policy every
     anchor_every steps (gemma_kit.posttrain.merging.ema). On LoRA factors this averages A and B
     separately: a valid moving anchor that starts at the base, but not the EMA of the merged
     weights (B A is bilinear). ema_rate = 1 with anchor_every = M copies the policy every M
     steps: iterated BOND's moving anchor (section 4.3).

Metrics (metrics.jsonl, one row per optimizer step, rollout metrics on the first step of each
batch of rollouts): reward_mean / reward_std, kl (the exact KL to the initial policy summed over
each completion, mean over completions: nats per sequence), kl_anchor (the same to the anchor),
kl_k1 (the sampled sum_t k1 to the anchor), entropy (nats per completion token), length (tokens,
the stop token included), stop_rate, advantage_std, logprob_gap (mean |sampler log-prob -
teacher-forced log-prob|, a numerics check), the seconds of rollout / reward / scoring; BOND:
anchor_reward, best_of_reward, bond_reward. Held-out rows (before training, every eval_every
steps, after): eval_reward, eval_reward_std, eval_kl, eval_kl_anchor, eval_entropy,
eval_length, eval_stop_rate, from `eval_samples` rollouts of each held-out prompt drawn with the
same key every time. OUT_DIR also gets reward.png and kl.png, and samples.jsonl (completions of
the held-out prompts at each evaluation).

Determinism: rollouts are drawn from jax.random.fold_in(seed stream, step); the anchor, the
batch of rollouts being reused (ppo_epochs > 1) and the anchor's update count are saved with
every checkpoint, so a resumed run (after Ctrl-C or SIGKILL) is bit-identical to one that was
never stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_kit.errors import ConfigError, DataError
from gemma_kit.posttrain import losses
from gemma_kit.posttrain.logprobs import map_chunks, token_logprobs
from gemma_kit.posttrain.merging import ema
from gemma_kit.posttrain.policy import reference_values, snapshot, with_trained
from gemma_kit.posttrain.prompts import Prompts, read_prompts
from gemma_kit.posttrain.rewards import as_reward, call_reward, load_reward, reward_name
from gemma_kit.posttrain.rl_config import RLConfig
from gemma_kit.posttrain.rollout import Rollout, rollout
from gemma_kit.training.config import TrainConfig
from gemma_kit.training.loop import TrainResult, run
from gemma_kit.training.losses import attention_mask
from gemma_kit.training.model import trainable_filter
from gemma_kit.training.objective import Objective, RunContext
from gemma_kit.training.trainer import micro_batches

__all__ = ["PolicyLoss", "PolicyOptimisation", "RLConfig", "RolloutScorer", "train_rl"]

# Seed streams of the rollouts: the policy's, the anchor's (BOND) and the held-out ones are
# drawn from different keys (seed * STREAMS + stream, then fold_in(step)).
STREAMS = 8
POLICY_STREAM, ANCHOR_STREAM, EVAL_STREAM = 0, 1, 2
SEQUENCE_FIELDS = ("tokens", "targets", "positions", "segments")


def stream_seed(seed: int, stream: int) -> int:
    return seed * STREAMS + stream


# ------------------------------------------------------------------------------------------
# The loss


@dataclasses.dataclass(frozen=True)
class PolicyLoss:
    """The policy-gradient loss on rollout rows (losses.policy_gradient_loss), with an explicit
    normaliser.

    batch: tokens, targets, positions, segments [B, T] (the rows of Rollout.training_batch);
    index [B, N], the positions whose targets are completion tokens (gather_completions), and
    at those positions [B, N]: mask (1 where the position is real), weights (the signed weight
    of each token: its sequence's advantage, or BOND's forward weight), with `importance`
    old_logprobs (the log-probs of the policy that drew the rows), with kl_coef > 0
    anchor_logprobs (k3 in the loss); normaliser [B] (each row's share of the count the loss
    is a mean over). Logits are made at the N completion positions only.

    chunk: tokens per logits chunk. importance: weight by pi / pi_old (ppo_epochs > 1), clipped
    with clip_epsilon. kl_coef: beta of the per-token k3 term (0: none).
    metrics (sums over the step's micro-batches): loss_tokens (completion tokens), and with
    importance clipped_tokens and ratio_sum, with kl_coef kl_k3_sum.
    """

    chunk: int = 1024
    importance: bool = False
    clip_epsilon: float | None = None
    kl_coef: float = 0.0

    def __call__(self, model, batch, frozen=None):
        attend = attention_mask(batch["positions"], batch["segments"])
        hidden = model.hidden_states(batch["tokens"], batch["positions"], attend)
        index = batch["index"]
        hidden = jnp.take_along_axis(hidden, index[..., None], axis=1)
        targets = jnp.maximum(jnp.take_along_axis(batch["targets"], index, axis=1), 0)
        logps = token_logprobs(model, hidden, targets, chunk=self.chunk)
        mask = batch["mask"]
        loss_sum, _, m = losses.policy_gradient_loss(
            logps,
            batch["weights"],
            mask,
            behaviour_logps=batch["old_logprobs"] if self.importance else None,
            clip_epsilon=self.clip_epsilon,
            ref_logps=batch["anchor_logprobs"] if self.kl_coef else None,
            kl_coef=self.kl_coef,
            kl_estimator="k3",
        )
        tokens = jnp.sum(mask)
        metrics = {"loss_tokens": tokens}
        if self.importance:  # the loss reports means of this micro-batch: back to sums
            metrics["clipped_tokens"] = m["clip_fraction"] * tokens
            metrics["ratio_sum"] = m["ratio_mean"] * tokens
        if self.kl_coef:
            metrics["kl_k3_sum"] = m["kl"] * tokens
        return loss_sum, jnp.sum(batch["normaliser"].astype(jnp.float32)), metrics


# ------------------------------------------------------------------------------------------
# The scoring pass: log-probs, exact KLs and entropy of rollout rows, no gradient


def _scores(graphdef, chunk, kinds, trainable, fixed, reference, anchor, batch):
    """Per completion position [B, N]: logp, entropy, kl_ref, logp_ref (and kl_anchor,
    logp_anchor). batch: the rows' tokens, positions, segments, targets [B, T] and index
    [B, N], the positions whose targets are completion tokens (padded with any position)."""
    policy = nnx.merge(graphdef, trainable, fixed)
    models = [policy, with_trained(policy, reference, kinds[0])]
    if anchor is not None:
        models.append(with_trained(policy, anchor, kinds[1]))
    mask = attention_mask(batch["positions"], batch["segments"])
    index = batch["index"]
    B, N = index.shape
    # Logits only where a completion token is predicted: they are most of the cost (the
    # [*, V] projection of every network), and prompt positions do not count.
    hidden = [
        jnp.take_along_axis(
            m.hidden_states(batch["tokens"], batch["positions"], mask), index[..., None], axis=1
        ).reshape(B * N, -1)
        for m in models
    ]
    targets = jnp.maximum(jnp.take_along_axis(batch["targets"], index, axis=1), 0).reshape(-1)

    def logits(model, h):
        return model.logits(h[None])[0].astype(jnp.float32)

    def per_chunk(*args):
        *hs, t = args
        lp = logits(models[0], hs[0])
        out = [losses.token_log_probs(lp, t), losses.entropy(lp)]
        for model, h in zip(models[1:], hs[1:]):
            other = logits(model, h)
            out += [losses.reverse_kl_per_position(lp, other), losses.token_log_probs(other, t)]
        return tuple(out)

    values = map_chunks(per_chunk, (*hidden, targets), chunk)
    names = ["logp", "entropy", "kl_ref", "logp_ref", "kl_anchor", "logp_anchor"]
    return {name: v.reshape(B, N) for name, v in zip(names, values)}


PER_POSITION = ("mask", "weights", "old_logprobs", "anchor_logprobs")


def gather_completions(batch: dict[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
    """Rows [R, T] whose "mask" marks the completion targets -> the same rows with "index"
    [R, count] (those positions, completion_index) and the per-position arrays (mask, weights,
    old_logprobs, anchor_logprobs) taken at them, [R, count], 0 where not valid: PolicyLoss's
    layout."""
    index, valid = completion_index(batch["mask"], count)
    out = dict(batch, index=index)
    for name in PER_POSITION:
        if name in batch:
            out[name] = (np.take_along_axis(batch[name], index, axis=1) * valid).astype(np.float32)
    return out


def completion_index(weights: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(index [B, count] int32, valid [B, count] bool): each row's positions with weight > 0
    in order, padded with position 0 (not valid)."""
    B = weights.shape[0]
    index = np.zeros((B, count), np.int32)
    valid = np.zeros((B, count), bool)
    for r in range(B):
        where = np.flatnonzero(weights[r] > 0)[:count]
        index[r, : len(where)] = where
        valid[r, : len(where)] = True
    return index, valid


_score_program = jax.jit(_scores, static_argnums=(0, 1, 2))


class RolloutScorer:
    """Draws rollouts of a policy and scores them: the Sampler (built once) and the compiled
    scoring pass of one network, shared by the RL objective and WARP's evaluation.

    model: the network (with LoRA, if trained so) in the layout the trainer splits: graphdef,
    kind (the filter of the trained variables). length: T of every scored row (fixed: one
    compiled shape). place: host batch -> device batch (the trainer's placement, rows split
    over the mesh); rows are padded to a multiple of `multiple`.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        kind,
        length: int,
        chunk: int,
        max_new_tokens: int,
        stop_token_ids=None,
        full: bool = False,
        place: Callable | None = None,
        multiple: int = 1,
    ):
        from gemma_kit.sampler import Sampler

        # Full fine-tuning swaps every weight each step: without the matvec layout a swap is
        # no copy (Sampler.update_params).
        self.sampler = Sampler(model, tokenizer, matvec_layout=False if full else None)
        self.tokenizer = tokenizer
        self.kind = kind
        self.length = length
        self.chunk = chunk
        self.max_new_tokens = max_new_tokens
        self.stop_token_ids = stop_token_ids
        self.place = place or (lambda batch: jax.device_put(batch, jax.local_devices()[0]))
        self.multiple = multiple

    def draw(self, values, prompts: Prompts, k: int, *, seed: int, step: int) -> Rollout:
        """k completions of every prompt under the trained-variable values `values` (an nnx
        State, e.g. trainer.trainable, or a pure dict)."""
        state = values if isinstance(values, nnx.State) else nnx.State(values)
        self.sampler.update_params(state)
        return rollout(
            self.sampler,
            prompts.ids,
            k,
            self.max_new_tokens,
            seed=seed,
            step=step,
            stop_token_ids=self.stop_token_ids,
        )

    def rows(self, roll: Rollout) -> dict[str, np.ndarray]:
        """The rollout as rows of the fixed length, padded to a multiple of `multiple` rows
        with empty rows (segment 0: they attend to and weigh nothing)."""
        batch = roll.training_batch(self.length)
        extra = -len(roll.prompt_ids) % self.multiple
        if extra:
            batch = {
                k: np.concatenate([v, np.zeros((extra, *v.shape[1:]), v.dtype)])
                for k, v in batch.items()
            }
        return batch

    def score(
        self, graphdef, trainable, fixed, reference, anchor, batch: dict, kinds: tuple | None = None
    ) -> dict[str, np.ndarray]:
        """The scoring pass (module docstring, step 3) on host rows; numpy [B, T] each, at the
        completion positions (batch["weights"] > 0; 0 elsewhere). reference / anchor: values
        of the variables `kinds` selects (default: self.kind); anchor None: no anchor
        outputs."""
        kinds = kinds or (self.kind, self.kind)
        rows = {k: batch[k] for k in SEQUENCE_FIELDS}
        index, valid = completion_index(batch["weights"], self.max_new_tokens)
        rows["index"] = index
        out = _score_program(
            graphdef, self.chunk, kinds, trainable, fixed, reference, anchor, self.place(rows)
        )
        # Back to the rows' [B, T] layout, 0 at every other position.
        r, j = np.nonzero(valid)
        full = {}
        for name, value in jax.device_get(out).items():
            full[name] = np.zeros(batch["weights"].shape, np.float32)
            full[name][r, index[r, j]] = np.asarray(value)[r, j]
        return full


def sequence_sums(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[R, T] per-position values -> [R] sums over each row's masked positions (float64)."""
    return (values.astype(np.float64) * mask).sum(axis=1)


def rollout_metrics(
    roll: Rollout, rewards: np.ndarray, scores: dict, mask: np.ndarray, prefix: str = ""
) -> dict[str, float]:
    """reward, exact KL (to the reference and the anchor), entropy, length and stop rate of
    scored rollouts (R real rows; scores and mask may carry padding rows after them)."""
    R = len(roll.prompt_ids)
    mask = mask[:R]
    kl = sequence_sums(scores["kl_ref"][:R], mask)
    out = {
        "reward": float(np.mean(rewards)),
        "reward_std": float(np.std(rewards)),
        "kl": float(np.mean(kl)),
    }
    if "kl_anchor" in scores:
        out["kl_anchor"] = float(np.mean(sequence_sums(scores["kl_anchor"][:R], mask)))
    out.update(
        entropy=float(sequence_sums(scores["entropy"][:R], mask).sum() / max(mask.sum(), 1)),
        length=float(np.mean(roll.lengths)),
        stop_rate=float(np.mean([r == "stop" for r in roll.finish_reasons])),
    )
    return {prefix + k: v for k, v in out.items()}


# ------------------------------------------------------------------------------------------
# The objective


def _subset(roll: Rollout, index) -> Rollout:
    """The rows `index` of a rollout (e.g. the best anchor sample of each prompt)."""
    index = [int(i) for i in index]
    return dataclasses.replace(
        roll,
        prompt_index=roll.prompt_index[index],
        prompt_ids=[roll.prompt_ids[i] for i in index],
        completion_ids=roll.completion_ids[index],
        completion_mask=roll.completion_mask[index],
        logprobs=roll.logprobs[index],
        finish_reasons=[roll.finish_reasons[i] for i in index],
        texts=[roll.texts[i] for i in index],
    )


class PolicyOptimisation(Objective):
    """REINFORCE / RLOO / BOND / J-BOND on config.prompts_file (see the module docstring).

    reward: a callable (prompts, completions) -> floats, a spec, or a reward model; default:
    config.reward (a spec).
    """

    name = "rl"
    eval_key = "eval_reward"
    loss_label = "policy-gradient loss"
    loss: PolicyLoss

    def __init__(self, reward=None):
        self.given_reward = reward
        self.reward_fn: Callable | None = None
        self.owns_reward = False
        self.stats: dict[str, Any] = {}
        self.anchor = None
        self.anchor_updates = 0
        self.done = 0
        self.cached: dict[str, np.ndarray] | None = None
        self.cached_group = -1
        self.pending: dict[str, float] = {}
        self.placed: dict[str, Any] = {}

    # -- before the model -----------------------------------------------------------------
    def check_inputs(self, config: TrainConfig) -> None:
        from gemma_kit.finetune.data import read_jsonl

        if not isinstance(config, RLConfig):
            raise ConfigError(f"the RL objective needs an RLConfig, got {type(config).__name__}")
        for path in (config.prompts_file, config.eval_prompts_file):
            if path is not None:
                read_jsonl(path)
        if self.reward_fn is None:
            if self.given_reward is not None:
                self.reward_fn = as_reward(self.given_reward)
                self.owns_reward = isinstance(self.given_reward, str)
            elif config.reward:
                self.reward_fn = load_reward(config.reward, timeout=config.reward_timeout)
                self.owns_reward = True
            else:
                raise ConfigError(
                    "reward is required: a 'pkg.module:function' spec or "
                    "'rm:DIR' (or pass a callable to train_rl)"
                )
        self.name = config.algo

    def close(self) -> None:
        """Stops the reward's worker process, if this objective started one."""
        if self.owns_reward and self.reward_fn is not None and hasattr(self.reward_fn, "close"):
            self.reward_fn.close()

    # -- prepare --------------------------------------------------------------------------
    def prepare(self, context: RunContext) -> int:
        c = context.config
        assert isinstance(c, RLConfig)  # check_inputs refused any other config
        self.config, self.out_dir, self.lead = c, context.out_dir, context.lead
        tok = context.tokenizer
        prompts = read_prompts(c.prompts_file, tok, skip_bad_rows=c.skip_bad_rows)
        held: Prompts | None
        if c.eval_prompts_file is not None:
            train, held = (
                prompts,
                read_prompts(c.eval_prompts_file, tok, skip_bad_rows=c.skip_bad_rows),
            )
        else:
            train, held = prompts.split(c.eval_fraction, c.seed)
        if held is not None and c.eval_max_rows is not None:
            held = held.subset(range(min(len(held), c.eval_max_rows)))
        for group in (train, held):
            if group is None:
                continue
            longest = int(np.argmax([len(i) for i in group.ids]))
            if group.longest + c.max_new_tokens > c.max_length:
                raise DataError(
                    f"this prompt has {group.longest} tokens, and with max_new_tokens = "
                    f"{c.max_new_tokens} a row would exceed max_length = {c.max_length}; raise "
                    "max_length or shorten the prompt",
                    path=group.sources[longest],
                )
        if len(train) < c.batch_size:
            context.say(
                f"note: {len(train)} training prompts for batch_size {c.batch_size}: "
                "prompts repeat within a step"
            )
        self.train, self.held = train, held
        longest = max(train.longest, held.longest if held else 0)
        length = -(-(longest + c.max_new_tokens - 1) // 8) * 8
        self.kind = trainable_filter(c)
        initial = snapshot(nnx.state(context.model, self.kind))
        self.reference = reference_values(initial, self.kind)
        self.anchor = initial if c.anchor == "ema" else None
        devices = c.mesh_data * c.mesh_fsdp
        self.scorer = RolloutScorer(
            context.model,
            tok,
            kind=self.kind,
            length=length,
            chunk=c.loss_chunk,
            max_new_tokens=c.max_new_tokens,
            stop_token_ids=c.stop_token_ids,
            full=not c.trains_lora,
            multiple=devices,
        )
        self.kl_coef = c.resolved_kl_coef
        importance = c.ppo_epochs > 1 or c.clip_epsilon is not None
        self.loss = PolicyLoss(
            c.loss_chunk,
            importance,
            c.clip_epsilon,
            self.kl_coef if c.kl_penalty == "loss" else 0.0,
        )
        rows = c.batch_size * c.rows_per_prompt
        self.cached = {name: np.zeros((rows, length), np.int32) for name in SEQUENCE_FIELDS}
        self.cached["index"] = np.zeros((rows, c.max_new_tokens), np.int32)
        for name in self.batch_floats():
            self.cached[name] = np.zeros((rows, c.max_new_tokens), np.float32)
        self.cached["normaliser"] = np.zeros((rows,), np.float32)
        self.stats = dict(
            algo=c.algo,
            reward=reward_name(self.reward_fn),
            train_prompts=len(train),
            held_out_prompts=len(held) if held else 0,
            skipped_prompts=prompts.skipped,
            row_length=length,
            rows_per_step=rows,
            kl_coef=self.kl_coef,
        )
        context.say(
            f"{c.algo}: {len(train)} training prompts, "
            f"{len(held) if held else 0} held out; {c.batch_size} prompts x "
            f"{c.rows_per_prompt} rows of {length} tokens per step; reward "
            f"{self.stats['reward']}"
        )
        if c.steps is not None:
            return c.steps
        assert c.epochs is not None  # validate: exactly one of steps and epochs
        return max(1, math.ceil(c.epochs * len(train) / c.batch_size)) * c.ppo_epochs

    def batch_floats(self) -> tuple[str, ...]:
        """The float [rows, N] arrays of a step's batch (fixed by the settings)."""
        names = ["mask", "weights"]
        if self.loss.importance:
            names.append("old_logprobs")
        if self.loss.kl_coef:
            names.append("anchor_logprobs")
        return tuple(names)

    # -- frozen values on the trainer's devices ---------------------------------------------
    def _place(self, trainer) -> None:
        if "reference" not in self.placed:
            self.placed["reference"] = trainer.place_frozen(self.reference)
            self.scorer.place = lambda batch: trainer.place(batch, batch_axis=0)
        if self.anchor is not None:
            self.anchor = trainer.place_frozen(self.anchor)

    def score_rows(self, trainer, batch) -> dict[str, np.ndarray]:
        """The scoring pass on host rows under the trainer's current values, the reference
        and the anchor (RolloutScorer.score)."""
        self._place(trainer)
        return self.scorer.score(
            trainer.graphdef,
            trainer.trainable,
            trainer.fixed,
            self.placed["reference"],
            self.anchor,
            batch,
        )

    # -- each step ------------------------------------------------------------------------
    def host_batch(self, step: int, trainer) -> dict[str, np.ndarray]:
        c = self.config
        self._place(trainer)
        group = step // c.ppo_epochs
        if group != self.cached_group:
            self.cached = self._draw(group, trainer)
            self.cached_group = group
        else:
            self.pending = {}
        assert self.cached is not None  # made by prepare, redrawn above
        return micro_batches(self.cached, c.grad_accum)

    def _draw(self, group: int, trainer) -> dict[str, np.ndarray]:
        """Rollouts, rewards, scores and advantages of rollout batch `group` (module doc)."""
        c = self.config
        P, k = c.batch_size, c.num_samples
        prompts = self.train.batch(group, P, c.seed)
        tick = time.perf_counter()
        roll = self.scorer.draw(
            trainer.trainable, prompts, k, seed=stream_seed(c.seed, POLICY_STREAM), step=group
        )
        anchor_roll = None
        if c.is_bond:
            values = self.anchor if self.anchor is not None else self.reference
            anchor_roll = self.scorer.draw(
                values,
                prompts,
                c.resolved_anchor_samples,
                seed=stream_seed(c.seed, ANCHOR_STREAM),
                step=group,
            )
        timings = {"rollout_s": time.perf_counter() - tick}

        tick = time.perf_counter()
        texts = [prompts.texts[i] for i in roll.prompt_index]
        completions = list(roll.texts)
        if anchor_roll is not None:
            texts += [prompts.texts[i] for i in anchor_roll.prompt_index]
            completions += anchor_roll.texts
        assert self.reward_fn is not None  # set by check_inputs
        scored = call_reward(self.reward_fn, texts, completions)
        rewards, anchor_rewards = scored[: P * k], scored[P * k :]
        timings["reward_s"] = time.perf_counter() - tick

        tick = time.perf_counter()
        rows = self.scorer.rows(roll)
        scores = self.score_rows(trainer, rows)
        timings["score_s"] = time.perf_counter() - tick
        mask = rows["weights"]  # 1 on completion tokens
        logp_anchor = scores["logp_anchor" if self.anchor is not None else "logp_ref"]
        k1 = sequence_sums(scores["logp"] - logp_anchor, mask)[: P * k]
        metrics = rollout_metrics(roll, rewards, scores, mask)
        metrics["reward_mean"] = metrics.pop("reward")
        if "kl_anchor" not in metrics:
            metrics["kl_anchor"] = metrics["kl"]  # the anchor is the reference
        metrics["kl_k1"] = float(np.mean(k1))
        real = mask[: P * k] > 0
        metrics["logprob_gap"] = float(
            np.abs(rows["behaviour_logprobs"][: P * k] - scores["logp"][: P * k])[real].mean()
        )

        penalty = self.kl_coef * k1 if c.kl_penalty == "reward" else 0.0
        if c.is_bond:
            M = c.resolved_anchor_samples
            grid = anchor_rewards.reshape(P, M)
            per_sample = np.repeat(grid, k, axis=0)  # [P * k, M], row i: its prompt's anchors
            if c.algo == "bond":
                bond_reward = losses.quantile_reward(
                    jnp.asarray(rewards),
                    jnp.asarray(per_sample),
                    c.best_of,
                    smoothing=c.quantile_smoothing,
                )
            else:
                bond_reward = losses.jbond_reward(
                    jnp.asarray(rewards), jnp.asarray(per_sample), kind=c.jbond_reward
                )
            base = np.asarray(bond_reward, np.float64)
            metrics.update(anchor_reward=float(grid.mean()), bond_reward=float(base.mean()))
            shaped = base - penalty
        else:
            shaped = rewards - penalty
        if c.algo == "rloo" or (c.is_bond and k >= 2):
            estimate = losses.rloo_advantages(jnp.asarray(shaped.reshape(P, k))).reshape(-1)
        else:
            estimate = losses.reinforce_advantages(jnp.asarray(shaped), baseline="batch")
        advantages = np.asarray(estimate, np.float32)
        metrics["advantage_std"] = float(advantages.std())

        batch = {name: rows[name][: P * k] for name in SEQUENCE_FIELDS}
        lengths = mask[: P * k].sum(axis=1)
        if c.is_bond:
            weight: np.ndarray = c.jeffreys_beta * advantages / k
            share = np.full(P * k, 1.0 / k, np.float32)  # sum over a prompt's samples: 1
        else:
            weight = advantages
            share = np.ones(P * k, np.float32) if c.loss_normaliser == "sequences" else lengths
        batch["mask"] = mask[: P * k]
        batch["weights"] = mask[: P * k] * weight[:, None]
        batch["normaliser"] = share.astype(np.float32)
        if self.loss.importance:
            batch["old_logprobs"] = scores["logp"][: P * k] * mask[: P * k]
        if self.loss.kl_coef:
            batch["anchor_logprobs"] = logp_anchor[: P * k] * mask[: P * k]
        if c.forward_rows:
            # The anchor samples of a prompt in groups of best_of: the best of each group (ties
            # to the first) is a Best-of-N sample; their mean log-likelihood is the forward part.
            G = c.best_of_groups
            groups = anchor_rewards.reshape(P * G, c.best_of)
            chosen = np.arange(P * G) * c.best_of + np.argmax(groups, axis=1)
            metrics["best_of_reward"] = float(anchor_rewards[chosen].mean())
            assert anchor_roll is not None  # forward_rows: BOND, which drew anchor samples
            forward = self.scorer.rows(_subset(anchor_roll, chosen))
            extra = {name: forward[name][: P * G] for name in SEQUENCE_FIELDS}
            extra["mask"] = forward["weights"][: P * G]
            extra["weights"] = (1.0 - c.jeffreys_beta) / G * forward["weights"][: P * G]
            extra["normaliser"] = np.zeros(P * G, np.float32)
            batch = {name: np.concatenate([batch[name], extra[name]]) for name in batch}
        batch = gather_completions(batch, c.max_new_tokens)
        metrics.update(timings)
        self.pending = metrics
        return {name: np.ascontiguousarray(v) for name, v in batch.items()}

    def step_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        out = dict(self.pending)
        self.pending = {}
        tokens = max(metrics.get("loss_tokens", 0.0), 1.0)
        if "clipped_tokens" in metrics:
            out["clip_fraction"] = metrics["clipped_tokens"] / tokens
            out["ratio"] = metrics["ratio_sum"] / tokens
        if "kl_k3_sum" in metrics:
            out["kl_k3"] = metrics["kl_k3_sum"] / tokens
        out["loss_tokens"] = int(metrics.get("loss_tokens", 0))
        return out

    def after_step(self, step: int, trainer, metrics: dict[str, float]) -> None:
        self.done = step + 1
        c = self.config
        if self.anchor is not None and self.done % c.anchor_every == 0:
            self.anchor = ema(self.anchor, snapshot(trainer.trainable), c.ema_rate)
            self.anchor_updates += 1

    # -- held-out evaluation ----------------------------------------------------------------
    def evaluate(self, trainer) -> dict[str, float]:
        if self.held is None:
            return {}
        c = self.config
        self._place(trainer)
        roll = self.scorer.draw(
            trainer.trainable,
            self.held,
            c.eval_samples,
            seed=stream_seed(c.seed, EVAL_STREAM),
            step=0,
        )
        texts = [self.held.texts[i] for i in roll.prompt_index]
        assert self.reward_fn is not None  # set by check_inputs
        rewards = call_reward(self.reward_fn, texts, roll.texts)
        rows = self.scorer.rows(roll)
        scores = self.score_rows(trainer, rows)
        metrics = rollout_metrics(roll, rewards, scores, rows["weights"], prefix="eval_")
        metrics.setdefault("eval_kl_anchor", metrics["eval_kl"])
        if self.lead and c.log_samples:
            picked = np.linspace(0, len(texts) - 1, min(c.log_samples, len(texts))).astype(int)
            with (self.out_dir / "samples.jsonl").open("a") as f:
                for i in dict.fromkeys(picked.tolist()):
                    f.write(
                        json.dumps(
                            dict(
                                step=self.done,
                                prompt=texts[i],
                                completion=roll.texts[i],
                                reward=float(rewards[i]),
                                finish=roll.finish_reasons[i],
                            )
                        )
                        + "\n"
                    )
        return metrics

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoint_state(self, step: int):
        arrays = {}
        if self.anchor is not None:
            arrays["anchor"] = self.anchor
        if self.config.ppo_epochs > 1:
            arrays["batch"] = self.cached
        info = dict(
            step=step,
            anchor_updates=self.anchor_updates,
            group=self.cached_group,
            rollout_seed=stream_seed(self.config.seed, POLICY_STREAM),
        )
        return (arrays or None), info

    def restore_state(self, arrays, info) -> None:
        self.done = int(info["step"])
        self.anchor_updates = int(info["anchor_updates"])
        if arrays is not None and "anchor" in arrays:
            self.anchor = arrays["anchor"]
        if arrays is not None and "batch" in arrays:
            self.cached = {k: np.asarray(v) for k, v in arrays["batch"].items()}
            self.cached_group = int(info["group"])
        samples = self.out_dir / "samples.jsonl"
        if self.lead and samples.exists():  # evaluations after the checkpoint come again
            kept = [
                line
                for line in samples.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= self.done
            ]
            samples.write_text("".join(line + "\n" for line in kept))

    def fingerprint(self) -> str:
        held = self.held.fingerprint if self.held is not None else "-"
        return f"{self.train.fingerprint}-{held}"

    # -- the end --------------------------------------------------------------------------
    def plots(self, metrics_path, out_dir) -> dict[str, Any]:
        from gemma_kit.training.metrics import plot_metrics

        reward = plot_metrics(
            metrics_path,
            out_dir / "reward.png",
            {"reward_mean": "reward (training rollouts)", "eval_reward": "held-out reward"},
            ylabel="reward",
            smooth=("reward_mean",),
            markers=("eval_reward",),
        )
        kl = plot_metrics(
            metrics_path,
            out_dir / "kl.png",
            {
                "kl": "KL to the initial policy (training rollouts)",
                "kl_anchor": "KL to the anchor",
                "eval_kl": "held-out KL",
            },
            ylabel="KL (nats per completion)",
            smooth=("kl",),
            markers=("eval_kl",),
        )
        return {name: str(p) for name, p in (("reward", reward), ("kl", kl)) if p is not None}

    def summary(self) -> dict[str, Any]:
        return dict(rl=dict(self.stats, anchor_updates=self.anchor_updates))


def train_rl(
    config: RLConfig, *, reward=None, model=None, tokenizer=None, resume: bool = False
) -> TrainResult:
    """Runs (or resumes) an RL run as `config` describes (see the module docstring).

    reward: a callable (prompts, completions) -> floats, a spec, or a reward model, instead of
      config.reward. model / tokenizer: use these instead of loading config.base.
    resume: continue from the latest checkpoint in out_dir, bit-identically.
    """
    objective = PolicyOptimisation(reward)
    try:
        return run(config, objective, model=model, tokenizer=tokenizer, resume=resume)
    finally:
        objective.close()
