"""How loopy are the embedded 270M's replies and continuations, with and without the DRY penalty?

The embedded Gemma 3 270M is pretrained: asked in the chat format, it used to answer with loops
("mendatang" over and over, the question echoed). This script samples replies to chat questions
and continuations of text beginnings under the old and the new defaults and measures, per reply
(token ids, the stop token excluded):

  repeated_4grams   the share of the reply's 4-grams that already occurred earlier in it
                    (0: no 4-gram twice; a loop of one line tends to 1)
  top_token_share   the share of the reply taken by its most frequent token (a loop of one
                    token tends to 1; ordinary English stays under ~0.15)
  loop              repeated_4grams > 0.5: the reply is mostly repeats of itself

and prints the mean of each over prompts and seeds for every setting, then writes them to
demos/results/repetition.json.

    python demos/repetition.py [--seeds 3] [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import platform
import time
from collections.abc import Mapping

import gemma_kit
from gemma_kit.chat import CHAT_SAMPLING
from gemma_kit.sampling import DryPenalty

ROOT = pathlib.Path(__file__).resolve().parent
QUESTIONS = (
    "What is the capital of France?",
    "Tell me a joke.",
    "How do I boil an egg?",
    "Write a haiku about the sea.",
    "Why is the sky blue?",
    "Give me three tips for learning Python.",
)
BEGINNINGS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "The three most important inventions of the 20th century are",
    "To boil an egg, first",
    "def fibonacci(n):",
    "My favourite season is autumn because",
)
RECOMMENDED = dict(temperature=1.0, top_k=64, top_p=0.95)
SETTINGS = {  # name -> sampling keyword arguments (the old defaults first)
    "greedy (old chat default)": dict(temperature=0.0),
    "temperature 0.8": dict(temperature=0.8),
    "T 1.0, top-k 64, top-p 0.95": RECOMMENDED,
    "T 1.0, top-k 64, top-p 0.95 + DRY 0.8 (new default)": CHAT_SAMPLING,
    "greedy + DRY 0.8": dict(temperature=0.0, dry=DryPenalty()),
}


def repeated_ngrams(tokens: list[int], n: int = 4) -> float:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    seen, repeats = set(), 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams)


def top_token_share(tokens: list[int]) -> float:
    return max(collections.Counter(tokens).values()) / len(tokens) if tokens else 0.0


def measure(sampler, prompts: list[str], sampling: Mapping, seeds: int, max_new: int) -> dict:
    rows = []
    greedy = sampling.get("temperature", 0.0) == 0.0
    for seed in range(1 if greedy else seeds):
        for result in sampler.generate(prompts, max_new_tokens=max_new, seed=seed, **sampling):
            rep = repeated_ngrams(result.tokens)
            rows.append(
                dict(
                    repeated_4grams=rep,
                    top_token_share=top_token_share(result.tokens),
                    loop=rep > 0.5,
                    tokens=len(result.tokens),
                    text=result.text,
                )
            )
    mean = {
        k: sum(r[k] for r in rows) / len(rows)
        for k in ("repeated_4grams", "top_token_share", "tokens")
    }
    return dict(
        replies=len(rows),
        loops=sum(r["loop"] for r in rows),
        **mean,
        worst=max(rows, key=lambda r: r["repeated_4grams"])["text"][:160],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per sampled setting (3)")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="tokens per reply (96)")
    parser.add_argument("--out", default=str(ROOT / "results" / "repetition.json"))
    args = parser.parse_args()

    start = time.perf_counter()
    model, tokenizer = gemma_kit.default_model()
    sampler = gemma_kit.Sampler(model, tokenizer)
    chat_prompts = [tokenizer.format_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    results: dict = {"chat (questions in the chat format)": {}, "completion (text beginnings)": {}}
    for mode, prompts in zip(results, (chat_prompts, list(BEGINNINGS))):
        print(f"\n{mode}: {len(prompts)} prompts, {args.max_new_tokens} new tokens at most")
        print(f"  {'setting':<52} {'loops':>9} {'rep. 4-grams':>12} {'top token':>9}")
        for name, sampling in SETTINGS.items():
            got = measure(sampler, prompts, sampling, args.seeds, args.max_new_tokens)
            results[mode][name] = got
            print(
                f"  {name:<52} {got['loops']:>4}/{got['replies']:<4} "
                f"{got['repeated_4grams']:>12.3f} {got['top_token_share']:>9.3f}",
                flush=True,
            )
    elapsed = time.perf_counter() - start
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    print(f"\n{cpu}; {elapsed:.0f} s")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            dict(
                machine=cpu,
                seconds=round(elapsed),
                seeds=args.seeds,
                max_new_tokens=args.max_new_tokens,
                results=results,
            ),
            indent=2,
            ensure_ascii=False,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
