#!/usr/bin/env python
"""On-policy rollouts against Sampler.generate on the embedded Gemma 3 270M (CPU), same run.

    python benchmarks/bench_rollout.py                 # 4 prompts x K=4 (batch 16), 32 tokens
    python benchmarks/bench_rollout.py --prompts 1 --k 1 --new 32 --rounds 5

Everything is timed in one process, in interleaved rounds (every other one in reverse order;
best of each), so the ratios hold on a shared machine:

- rollout: gemma_kit.posttrain.rollout.rollout (temperature 1, no filters, no forbidden ids),
  whole calls (prefill, decode loop, host work), tokens/s = rows x new tokens / seconds;
- generate: Sampler.generate on the same batch (each prompt repeated K times), at temperature 1
  (the same sampling work) and greedy, also whole calls;
- update_params: swapping the LoRA factors (rank 8 on every projection), and the whole base
  (full fine-tuning), which the matvec layout (the CPU default) must transpose;
- rollout tokens/s of a Sampler without the matvec layout, the other choice for full
  fine-tuning (swaps the weights without a copy, decodes from the official layout).

stop_token_ids=() everywhere, so every row runs to the end and the token counts are equal.
"""

from __future__ import annotations

import argparse
import math
import os
import time

from _log import log  # noqa: E402  (benchmarks/ is on sys.path)

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--prompts", type=int, default=4, help="distinct prompts (default 4)")
p.add_argument("--k", type=int, default=4, help="samples per prompt (default 4)")
p.add_argument("--new", type=int, default=32, help="new tokens per row (default 32)")
p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
p.add_argument(
    "--no-plain-layout", action="store_true", help="skip the Sampler without the matvec layout"
)
ARGS = p.parse_args()

import jax  # noqa: E402
from flax import nnx  # noqa: E402

import gemma_kit  # noqa: E402
from gemma_kit import lora  # noqa: E402
from gemma_kit.posttrain.rollout import rollout  # noqa: E402

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain why the sky is blue in two sentences.",
    "def fibonacci(n):",
    "The three most important inventions of the last century are",
    "Once upon a time, in a small village by the mountains,",
    "Translate to French: The cat sleeps on the warm windowsill.",
    "A good recipe for tomato soup starts with",
    "The main difference between a list and a tuple in Python is",
]


def best_of(fn, rounds_box, name):
    t = time.perf_counter()
    fn()
    dt = time.perf_counter() - t
    rounds_box[name] = min(rounds_box.get(name, math.inf), dt)


def main():
    args = ARGS
    load = os.getloadavg()[0]
    model, tok = gemma_kit.default_model()
    lora.apply_lora(model, rank=8, alpha=16.0, targets="all")
    prompts = (PROMPTS * (args.prompts // len(PROMPTS) + 1))[: args.prompts]
    rows = args.prompts * args.k
    batch = [p for p in prompts for _ in range(args.k)]
    sampler = gemma_kit.Sampler(model, tok)
    plain = None if args.no_plain_layout else gemma_kit.Sampler(model, tok, matvec_layout=False)
    kw = dict(max_new_tokens=args.new, stop_token_ids=())

    def do_rollout(s=sampler, step=0):
        out = rollout(s, prompts, args.k, args.new, seed=0, step=step, stop_token_ids=())
        assert out.completion_mask.all()

    def do_generate(temperature):
        out = sampler.generate(batch, temperature=temperature, **kw)
        assert all(len(r.tokens) == args.new for r in out)

    lora_state = lora.lora_state(model)
    full_state = nnx.state(model, nnx.Param)

    def update_lora():
        sampler.update_params(lora_state)
        jax.block_until_ready(sampler.params)

    def update_full():
        sampler.update_params(full_state)
        jax.block_until_ready(sampler.params)

    pieces = {
        "rollout (temperature 1)": do_rollout,
        "generate, temperature 1": lambda: do_generate(1.0),
        "generate, greedy": lambda: do_generate(0.0),
        "update_params, LoRA factors": update_lora,
        "update_params, all base weights (re-layout)": update_full,
    }
    if plain is not None:
        pieces["rollout, no matvec layout"] = lambda: do_rollout(plain)
    for name, fn in pieces.items():
        t = time.perf_counter()
        fn()
        log(f"warm-up {name}: {time.perf_counter() - t:.1f} s")
    best: dict[str, float] = {}
    for r in range(args.rounds):
        # Every other round in reverse order: nothing always runs right after the same thing.
        for name, fn in list(pieces.items()) if r % 2 == 0 else list(pieces.items())[::-1]:
            best_of(fn, best, name)
        log(f"round {r + 1} done")

    tokens = rows * args.new
    print(
        f"\nRollouts vs Sampler.generate, Gemma 3 270M bf16 + LoRA r8 (all projections), "
        f"{jax.default_backend()}, {os.cpu_count()} cores; load {load:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end; {args.rounds} interleaved rounds, best of each"
    )
    print(
        f"batch {rows} = {args.prompts} prompts x K={args.k}, {args.new} new tokens per row, "
        "whole calls (prefill + decode + host work)\n"
    )
    ref = best["generate, temperature 1"]
    print(f"{'':46} {'seconds':>8} {'tokens/s':>9} {'vs generate T=1':>16}")
    for name, t in best.items():
        if name.startswith("update_params"):
            continue
        print(f"{name:46} {t:8.3f} {tokens / t:9.1f} {ref / t:15.2f}x")
    print()
    for name, t in best.items():
        if name.startswith("update_params"):
            print(f"{name:46} {t * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
