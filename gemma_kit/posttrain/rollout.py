"""On-policy rollouts: K completions per prompt from the current parameters, inside training.

    sampler = Sampler(model, tokenizer)                  # once: layout and compiled programs
    for step in range(steps):
        sampler.update_params(lora_state(model))         # the current LoRA factors (no copy)
        out = rollout(sampler, prompts, num_samples=4, max_new_tokens=64, seed=seed, step=step)
        batch = out.training_batch()                     # teacher-forced rows for the loss
        ...

One call decodes every prompt K times in one batch (row r completes prompt r // K) with the
Sampler's compiled prefill and while_loop (gemma_kit.decode): new parameters of the same shapes
reuse them, so a training loop compiles its rollout once.

On-policy losses need the behaviour log-probabilities of the distribution the tokens were drawn
from. Rollouts therefore sample at temperature 1 from the model's full distribution: no top-k /
top-p / min-p, and no forbidden tokens (Sampler.generate forbids Gemma 3's image markers; a
rollout does not, so its log-probs are exactly those of the distribution sampled). Other
settings are refused with one error rather than recomputing log-probs by a second forward pass.

The stop token is kept in the completion and in its mask: a policy that never sees its stop
token in the loss never learns to stop. Draws are a pure function of (seed, step) through
jax.random.fold_in, so a resumed run draws the same rollouts as the run it resumes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gemma_kit.decode import PAD_ID, bucket, decode_loop
from gemma_kit.sampling import SamplingError


def rollout_key(seed: int, step: int) -> jax.Array:
    """The PRNG key of the rollout of training step `step` of a run seeded `seed`."""
    return jax.random.fold_in(jax.random.key(seed), step)


@dataclasses.dataclass(frozen=True)
class Rollout:
    """R = len(prompts) * K completions; N = max_new_tokens.

    prompt_index: [R] int32, the prompt row r completes (r // K).
    prompt_ids: R lists, each row's prompt token ids (<bos> first).
    completion_ids: [R, N] int32, the drawn tokens, the stop token kept, PAD_ID after.
    completion_mask: [R, N] bool, True on the completion's tokens (the stop token included).
    logprobs: [R, N] float32, the behaviour log-probability of each completion token under the
      parameters that drew it (0 outside the mask).
    finish_reasons: R strings, "stop" (drew a stop token), "length" (N tokens) or "cache_full"
      (the Sampler's fixed cache_length was reached).
    texts: R strings, the completions decoded without their stop token.
    """

    prompt_index: np.ndarray
    prompt_ids: list[list[int]]
    completion_ids: np.ndarray
    completion_mask: np.ndarray
    logprobs: np.ndarray
    finish_reasons: list[str]
    texts: list[str]

    @property
    def lengths(self) -> np.ndarray:
        """[R] completion lengths in tokens (the stop token included)."""
        return self.completion_mask.sum(axis=1)

    def training_batch(self, length: int | None = None) -> dict[str, np.ndarray]:
        """The rollout as teacher-forced rows for a training step, all [R, T], right-padded.

        Row r is its prompt then its completion, shifted by one: `tokens` are the inputs,
        `targets` the next tokens, `positions` 0, 1, ..., `segments` 1 on the real tokens,
        `weights` (float32) 1 where the target is a completion token (the stop token included),
        `behaviour_logprobs` (float32) the rollout's log-prob of each weighted target. Padding
        after a row's end is 0 in every array (segment 0: attends to nothing, weighs nothing),
        the layout gemma_kit.finetune's packed rows have, so its loss functions take it as is.

        length: T; default the longest row rounded up to a bucket (16, 24, 32, 48, ...), so a
        training loop sees few shapes. A length too short for some row is refused.
        """
        lengths = self.lengths
        needed = max(len(p) + int(n) for p, n in zip(self.prompt_ids, lengths)) - 1
        T = bucket(needed, 16) if length is None else length
        if T < needed:
            raise SamplingError(
                f"training_batch(length={length}) is too short: the longest prompt plus its "
                f"completion needs {needed} positions"
            )
        R = len(self.prompt_ids)
        out = {
            name: np.zeros((R, T), dtype)
            for name, dtype in (
                ("tokens", np.int32),
                ("targets", np.int32),
                ("positions", np.int32),
                ("segments", np.int32),
                ("weights", np.float32),
                ("behaviour_logprobs", np.float32),
            )
        }
        for r, (prompt, n) in enumerate(zip(self.prompt_ids, lengths)):
            seq = np.concatenate([np.asarray(prompt, np.int32), self.completion_ids[r, :n]])
            m = len(seq) - 1
            out["tokens"][r, :m] = seq[:-1]
            out["targets"][r, :m] = seq[1:]
            out["positions"][r, :m] = np.arange(m)
            out["segments"][r, :m] = 1
            first = len(prompt) - 1  # the input whose target is the first completion token
            out["weights"][r, first:m] = 1.0
            out["behaviour_logprobs"][r, first:m] = self.logprobs[r, :n]
        return out


def rollout(
    sampler,
    prompts: Sequence[str | Sequence[int]],
    num_samples: int,
    max_new_tokens: int,
    *,
    seed: int,
    step: int,
    stop_token_ids: Sequence[int] | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    behaviour_logprobs: bool = True,
) -> Rollout:
    """Draws `num_samples` completions of each prompt with the Sampler's current parameters.

    prompts: strings (encoded with <bos>) or token-id lists (used as given, e.g. chat-formatted
      and already tokenised). stop_token_ids: ids that end a completion (kept in it); default
      <eos> and <end_of_turn>. seed, step: the draws are a pure function of these (and of the
      prompts, K and the parameters). temperature, top_k, top_p, min_p: accepted only at their
      on-policy values (1 and no filters); anything else is refused (see the module doc),
      unless behaviour_logprobs=False: for callers that never use Rollout.logprobs as the
      sampling distribution's (distillation scores completions by forward passes), which then
      hold the untempered, unfiltered model's log-probs, as Sampler.generate reports them.
    """
    filtered = temperature != 1.0 or top_k is not None or top_p is not None or min_p is not None
    if filtered and behaviour_logprobs:
        raise SamplingError(
            "rollouts for on-policy losses sample at temperature 1 without top_k / top_p / "
            f"min_p (got temperature={temperature}, top_k={top_k}, top_p={top_p}, "
            f"min_p={min_p}): other settings would make the behaviour log-probs those of "
            "another distribution; use Sampler.generate for such sampling"
        )
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise SamplingError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if isinstance(prompts, str) or not len(prompts):
        raise SamplingError("rollout() takes a non-empty list of prompts")
    encoded = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            encoded.extend(sampler.encode([p]))
        elif len(p) and all(isinstance(t, (int, np.integer)) for t in p):
            encoded.append([int(t) for t in p])
        else:
            raise SamplingError(f"prompt {i} is neither a string nor a non-empty list of token ids")
    settings = sampler.settings(
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        min_p,
        stop_token_ids=stop_token_ids,
        forbidden_token_ids=(),
    )
    ids = [p for p in encoded for _ in range(num_samples)]
    state = sampler.start(ids, settings, rollout_key(seed, step))
    state = decode_loop(sampler.arrays, state, jnp.int32(max_new_tokens), settings=settings)
    tokens, logprobs, steps, stopped_at = jax.device_get(
        (state.tokens, state.logprobs, state.step, state.stopped_at)
    )
    N, steps = max_new_tokens, int(steps)
    ends = np.where(stopped_at >= 0, stopped_at + 1, steps)  # the stop token kept
    mask = np.arange(N)[None, :] < ends[:, None]
    reasons = ["stop" if s >= 0 else "length" if steps >= N else "cache_full" for s in stopped_at]
    completion = np.where(mask, tokens[:, :N], PAD_ID).astype(np.int32)
    texts = [
        sampler.tokenizer.decode(row[: e - (s >= 0)].tolist())
        for row, e, s in zip(completion, ends, stopped_at)
    ]
    return Rollout(
        prompt_index=np.repeat(np.arange(len(encoded), dtype=np.int32), num_samples),
        prompt_ids=[list(p) for p in ids],
        completion_ids=completion,
        completion_mask=mask,
        logprobs=np.where(mask, logprobs[:, :N], 0.0).astype(np.float32),
        finish_reasons=reasons,
        texts=texts,
    )
