"""Best-of-N sampling: draw n candidates per prompt, score them, return them best first.

    best = best_of_n(sampler, "The movie was", 8, "gemma_kit.posttrain.rewards:vader_sentiment")
    best[0].text, best[0].reward         # the highest-reward candidate
    best_of_n(sampler, prompts, 8, rm)    # a list of prompts: one sorted list per prompt

The n candidates of every prompt are drawn in ONE batched generate (each prompt repeated n times;
rows draw independently), then scored in one call of the reward (prompts repeated per
candidate, the reward protocol of gemma_kit.posttrain.rewards), and sorted by reward, best first;
ties keep generation order. Taking the first is Best-of-N sampling (BOND 2407.14622, section 3):
its distribution's KL to the sampler's is at most log n - (n - 1) / n nats (`kl_bound`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from gemma_kit.posttrain.rewards import as_reward, call_reward
from gemma_kit.sampling import SamplingError


@dataclasses.dataclass
class Candidate:
    """One scored completion. index: its place in generation order (0 .. n-1)."""

    text: str
    tokens: list[int]
    logprobs: list[float]
    reward: float
    finish_reason: str
    index: int
    prompt: str


def kl_bound(n: int) -> float:
    """log n - (n - 1) / n: the bound on KL(Best-of-n || sampler), in nats (Beirami et al. 2024,
    cited by BOND section 3). 0 for n = 1; 0.19, 0.64, 1.20 for n = 2, 4, 8."""
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    return math.log(n) - (n - 1) / n


def best_of_n(
    sampler, prompts: str | Sequence[str], n: int, reward, *, temperature: float = 1.0, **sampling
) -> list[Candidate] | list[list[Candidate]]:
    """The n candidates of each prompt, sorted by reward, best first (module docstring).

    sampler: a gemma_kit Sampler (its generate is called once, with len(prompts) * n rows).
    reward: a callable (prompts, completions) -> floats, a "pkg.module:function" spec, or a
      reward model (gemma_kit.posttrain.reward_model.RewardModel).
    temperature: sampling temperature (1.0 by default: greedy decoding would give n equal
      candidates, so temperature 0 is refused for n > 1); other keyword arguments go to
      Sampler.generate (max_new_tokens, top_k, top_p, min_p, seed, stop, ...).
    Returns one list of n Candidates for one prompt string, a list of such lists for a list.
    """
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
        raise SamplingError(f"n must be an integer >= 1, got {n!r}")
    if n > 1 and temperature == 0:
        raise SamplingError(
            "Best-of-N with greedy decoding (temperature 0) would draw n equal "
            "candidates; sample with a temperature > 0"
        )
    single = isinstance(prompts, str)
    batch = [prompts] if isinstance(prompts, str) else list(prompts)
    if not batch:
        raise SamplingError("no prompts given")
    function = as_reward(reward)  # a bad spec fails here, before the slow part
    repeated = [p for p in batch for _ in range(n)]
    try:
        results = sampler.generate(repeated, temperature=temperature, **sampling)
        rewards = call_reward(function, repeated, [r.text for r in results])
    finally:
        if isinstance(reward, str) and hasattr(function, "close"):
            function.close()  # the worker process a spec started here
    out = []
    for k, prompt in enumerate(batch):
        rows = range(k * n, (k + 1) * n)
        candidates = [
            Candidate(
                results[i].text,
                results[i].tokens,
                results[i].logprobs,
                float(rewards[i]),
                results[i].finish_reason,
                i - k * n,
                prompt,
            )
            for i in rows
        ]
        # A stable sort on -reward: ties keep generation order.
        order = np.argsort(-np.asarray([c.reward for c in candidates]), kind="stable")
        out.append([candidates[i] for i in order])
    return out[0] if single else out
