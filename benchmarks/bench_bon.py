#!/usr/bin/env python
"""Best-of-N throughput on the embedded Gemma 3 270M (CPU), and reward-model scoring throughput.

    python benchmarks/bench_bon.py                 # ~5 min on 2 busy cores
    python benchmarks/bench_bon.py --rounds 1 --new-tokens 16      # quicker

Best-of-N candidates per second at n = 8: gemma_kit.posttrain.bon.best_of_n (the 8 candidates
in ONE batched generate, then one reward call) against the same 8 candidates from 8 separate
batch-1 generate calls and the same reward call. Every row generates exactly --new-tokens
tokens (stop_token_ids=(), so <eos> cannot end a row early), at temperature 1. The reward is
VADER (gold reward of the worked example; milliseconds). Reward-model scoring: RewardModel.score
of --rm-pairs (prompt, completion) pairs in batches of --rm-batch, in sequences and tokens per
second (a LoRA reward model on the 270M, as trained and with the adapter merged; the head's
values do not change the cost).

All configurations are warmed up (compiled) first, then timed in rounds, each round visiting
every configuration once; each figure is the best round. On a shared machine quote the ratios,
which come from one run. The CPU model, usable cores and load average are printed.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

from _log import log  # noqa: E402  (benchmarks/ is on sys.path)

PROMPT = "The movie was"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rm-pairs", type=int, default=64)
    p.add_argument("--rm-batch", type=int, default=16)
    args = p.parse_args(argv)

    import gemma_kit
    from gemma_kit.posttrain.bon import best_of_n
    from gemma_kit.posttrain.reward_model import RewardModel
    from gemma_kit.posttrain.rewards import call_reward, vader_sentiment

    print(
        f"machine: {cpu_model()}, {len(os.sched_getaffinity(0))} usable cores, load average "
        f"{os.getloadavg()[0]:.1f} at start (shared: other processes slow every figure)"
    )
    log("loading the 270M")
    model, tokenizer = gemma_kit.default_model()
    sampler = gemma_kit.Sampler(model, tokenizer)
    sampling = dict(max_new_tokens=args.new_tokens, temperature=1.0, stop_token_ids=())

    def batched(seed):
        return best_of_n(sampler, PROMPT, args.n, vader_sentiment, seed=seed, **sampling)

    def separate(seed):
        texts = [
            sampler.generate(PROMPT, seed=seed * args.n + i, **sampling).text for i in range(args.n)
        ]
        return call_reward(vader_sentiment, [PROMPT] * args.n, texts)

    log("reward model: the 270M with LoRA and a head")
    rm = RewardModel.from_base("default", method="lora")
    generated = sampler.generate([PROMPT] * args.rm_pairs, seed=99, **sampling)
    assert isinstance(generated, list)  # a batch of prompts
    completions = [r.text for r in generated]
    prompts = [PROMPT] * args.rm_pairs

    merged = rm.merged()

    def scoring(seed):
        return rm.score(prompts, completions, batch_size=args.rm_batch, progress=False)

    def scoring_merged(seed):
        return merged.score(prompts, completions, batch_size=args.rm_batch, progress=False)

    configs = {
        "best_of_n (one batched generate)": batched,
        f"{args.n} separate generate calls": separate,
        "reward model scoring": scoring,
        "reward model scoring, LoRA merged": scoring_merged,
    }
    for name, run in configs.items():
        log(f"warm-up (compiling): {name}")
        run(0)
    best = {name: float("inf") for name in configs}
    for r in range(args.rounds):
        for name, run in configs.items():
            start = time.perf_counter()
            run(r + 1)
            best[name] = min(best[name], time.perf_counter() - start)
            log(f"round {r + 1}: {name} {best[name]:.2f} s (best so far)")

    bon, sep, score, score_merged = best.values()
    tokens = sum(len(tokenizer.encode(PROMPT + c)) + 1 for c in completions)
    print(
        f"\nBest-of-{args.n}, {args.new_tokens} new tokens per candidate, best of "
        f"{args.rounds} rounds"
    )
    print(f"{'':36} {'seconds':>8} {'candidates/s':>13}")
    print(f"{'best_of_n (one batched generate)':36} {bon:8.2f} {args.n / bon:13.2f}")
    print(f"{f'{args.n} separate generate calls':36} {sep:8.2f} {args.n / sep:13.2f}")
    print(f"speed-up of one batched generate: {sep / bon:.2f}x")
    print(
        f"\nreward-model scoring (270M + LoRA rank 8), {args.rm_pairs} pairs of {tokens} "
        f"tokens in all, batches of {args.rm_batch}"
    )
    for name, seconds in (
        ("LoRA unmerged (training form)", score),
        ("LoRA merged (RewardModel.merged)", score_merged),
    ):
        print(
            f"{name:36} {seconds:8.2f} s {args.rm_pairs / seconds:8.1f} sequences/s "
            f"{tokens / seconds:8.0f} tokens/s"
        )
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
