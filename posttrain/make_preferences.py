"""Synthetic preference pairs for the reward-model, WARM and DPO examples.

No preference data set ships on PyPI, so this makes one: the embedded Gemma 3 270M's own
samples on review openers (review_prompts.py), labelled by VADER sentiment (the gold reward:
the more positive completion is chosen), with a fraction of the training labels flipped
(WARM's noisy-label setting, 2401.12187: 25% by default). Held-out pairs, on held-out prompts,
keep clean labels, so accuracy on them measures the gold preference.

    python posttrain/make_preferences.py                  # ~5 min on a shared 2-core CPU
    python posttrain/make_preferences.py --flip 0 --out posttrain/data/clean

Writes, under --out (default posttrain/data/):
    train.jsonl, eval.jsonl      TRL's {"prompt", "chosen", "rejected"} rows, plus
                                 "gold_chosen", "gold_rejected" (VADER compound of each) and
                                 "flipped" (whether the label was swapped)
    prompts_train.jsonl, prompts_eval.jsonl    {"prompt": ...} rows
    summary.json                 settings, counts and timings

Each prompt's samples are shuffled and paired two by two (so every sample is in one pair);
a pair whose gold rewards differ by less than --min-gap is dropped (VADER gives many neutral
completions exactly 0, and a tie carries no preference). Everything is seeded: the same
arguments give the same files.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import review_prompts  # noqa: E402  (this folder's prompt list)


def write_jsonl(path: pathlib.Path, rows) -> None:
    """Written beside the target and renamed, so a file never looks complete when it is not."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(partial, path)


def sample(sampler, prompts: list[str], k: int, args, seed: int) -> dict[str, list[str]]:
    """k completions of each prompt, generated args.batch rows at a time."""
    rows = [p for p in prompts for _ in range(k)]
    texts = []
    for i, start in enumerate(range(0, len(rows), args.batch)):
        chunk = rows[start : start + args.batch]
        texts += [
            r.text
            for r in sampler.generate(
                chunk,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                seed=seed + i,
            )
        ]
        print(f"  sampled {len(texts)}/{len(rows)}", file=sys.stderr, flush=True)
    out: dict[str, list[str]] = {p: [] for p in prompts}
    for prompt, text in zip(rows, texts):
        out[prompt].append(text)
    return out


def make_pairs(
    samples: dict[str, list[str]], gold, *, flip: float, min_gap: float, rng: random.Random
) -> tuple[list[dict], int]:
    """(pair rows, pairs dropped as ties)."""
    rows, dropped = [], 0
    for prompt, texts in samples.items():
        texts = list(texts)
        rng.shuffle(texts)
        scores = gold([prompt] * len(texts), texts)
        for a in range(0, len(texts) - 1, 2):
            (ta, ga), (tb, gb) = (texts[a], scores[a]), (texts[a + 1], scores[a + 1])
            if abs(ga - gb) < min_gap:
                dropped += 1
                continue
            if gb > ga:
                (ta, ga), (tb, gb) = (tb, gb), (ta, ga)
            flipped = rng.random() < flip
            if flipped:
                (ta, ga), (tb, gb) = (tb, gb), (ta, ga)
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": ta,
                    "rejected": tb,
                    "gold_chosen": ga,
                    "gold_rejected": gb,
                    "flipped": flipped,
                }
            )
    return rows, dropped


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "data"))
    parser.add_argument(
        "--samples-per-prompt",
        type=int,
        default=24,
        help="training samples per prompt (paired two by two)",
    )
    parser.add_argument("--eval-samples-per-prompt", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument(
        "--flip",
        type=float,
        default=0.25,
        help="fraction of training labels swapped (WARM's noisy labels)",
    )
    parser.add_argument(
        "--min-gap", type=float, default=0.05, help="drop pairs whose gold rewards differ by less"
    )
    parser.add_argument("--batch", type=int, default=96, help="rows per generate call")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0.0 <= args.flip <= 1.0:
        parser.error(f"--flip must be in [0, 1], got {args.flip}")

    import gemma_kit
    from gemma_kit.posttrain.rewards import vader_sentiment

    start = time.time()
    model, tokenizer = gemma_kit.default_model()
    sampler = gemma_kit.Sampler(model, tokenizer)
    train_prompts, eval_prompts = review_prompts.split(seed=args.seed)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    print(
        f"sampling {len(train_prompts)} x {args.samples_per_prompt} training and "
        f"{len(eval_prompts)} x {args.eval_samples_per_prompt} held-out completions",
        file=sys.stderr,
    )
    train_samples = sample(sampler, train_prompts, args.samples_per_prompt, args, args.seed)
    eval_samples = sample(
        sampler, eval_prompts, args.eval_samples_per_prompt, args, args.seed + 10_000
    )
    sampled = time.time()
    train, train_ties = make_pairs(
        train_samples, vader_sentiment, flip=args.flip, min_gap=args.min_gap, rng=rng
    )
    held, eval_ties = make_pairs(
        eval_samples, vader_sentiment, flip=0.0, min_gap=args.min_gap, rng=rng
    )
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", held)
    write_jsonl(out / "prompts_train.jsonl", [{"prompt": p} for p in train_prompts])
    write_jsonl(out / "prompts_eval.jsonl", [{"prompt": p} for p in eval_prompts])
    gold = [
        s for texts in train_samples.values() for s in vader_sentiment([""] * len(texts), texts)
    ]
    summary = dict(
        # The output folder is where the file lies: recorded without the machine's path.
        settings={k: v for k, v in vars(args).items() if k != "out"},
        train_pairs=len(train),
        eval_pairs=len(held),
        dropped_ties=dict(train=train_ties, eval=eval_ties),
        flipped=sum(r["flipped"] for r in train),
        mean_gold_of_samples=sum(gold) / len(gold),
        sampling_seconds=round(sampled - start, 1),
        total_seconds=round(time.time() - start, 1),
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "settings"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
