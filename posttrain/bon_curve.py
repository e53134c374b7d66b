"""The Best-of-N curve of the worked example: gold reward against n in {1, 2, 4, 8} on the
held-out review openers, beside the bound on KL(Best-of-n || base), log n - (n - 1) / n.

    python posttrain/bon_curve.py                          # ~2-3 min on a shared 2-core CPU
    python posttrain/bon_curve.py --select rm:runs/rm      # pick with a reward model instead

gemma_kit.posttrain.bon.best_of_n draws K candidates per prompt in one batched generate (K = 32
by default, scored by the selecting reward). The expected result of Best-of-n for each n <= K is
then computed from those K samples exactly, instead of drawing again for every n: the candidate
picked from a uniformly random n-subset is the i-th best of the K (by the selecting reward) with
probability C(i - 1, n - 1) / C(K, n) counting from the worst, so

    E[gold of the pick] = sum_i gold(i) C(i - 1, n - 1) / C(K, n)     (i = 1 .. K, ascending)

an unbiased estimate of Best-of-n's expected gold reward (Best-of-1 is the plain mean). With the
gold reward itself selecting (the default, VADER), this is the ideal curve; with a learned
reward model selecting, the gap to it is what the reward model gets wrong.

Writes --out/bon_curve.json and bon_curve.png (with matplotlib).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import review_prompts  # noqa: E402  (this folder's prompt list)


def expected_best_of(select: list[float], gold: list[float], n: int) -> float:
    """The expected gold reward of the best-by-`select` of a random n-subset of the samples."""
    K = len(select)
    order = sorted(range(K), key=lambda i: (select[i], -i))  # ties: the earlier sample wins
    return sum(gold[j] * math.comb(rank, n - 1) for rank, j in enumerate(order)) / math.comb(K, n)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    parser.add_argument("--candidates", type=int, default=32, help="K samples per prompt")
    parser.add_argument("--ns", default="1,2,4,8")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument(
        "--select", default=None, help="the selecting reward spec (default: the gold reward, VADER)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    ns = [int(n) for n in args.ns.split(",")]
    if max(ns) > args.candidates:
        parser.error("every n must be at most --candidates")

    import gemma_kit
    from gemma_kit.posttrain.bon import best_of_n, kl_bound
    from gemma_kit.posttrain.rewards import call_reward, vader_sentiment

    start = time.time()
    model, tokenizer = gemma_kit.default_model()
    sampler = gemma_kit.Sampler(model, tokenizer)
    _, prompts = review_prompts.split(seed=args.seed)
    selector = args.select or vader_sentiment
    results = best_of_n(
        sampler,
        prompts,
        args.candidates,
        selector,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    sampled = time.time() - start
    curve = {n: 0.0 for n in ns}
    for candidates in results:
        candidates = sorted(candidates, key=lambda c: c.index)  # generation order
        gold = call_reward(
            vader_sentiment, [c.prompt for c in candidates], [c.text for c in candidates]
        ).tolist()
        select = [c.reward for c in candidates]
        for n in ns:
            curve[n] += expected_best_of(select, gold, n) / len(results)
    report = dict(
        prompts=len(prompts),
        candidates_per_prompt=args.candidates,
        max_new_tokens=args.max_new_tokens,
        selected_by=args.select or "gold (VADER)",
        rows=[
            dict(n=n, gold_reward=round(curve[n], 4), kl_bound_nats=round(kl_bound(n), 4))
            for n in ns
        ],
        seconds=dict(sampling_and_scoring=round(sampled, 1), total=round(time.time() - start, 1)),
    )
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bon_curve.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'n':>3}  {'gold reward':>11}  {'KL bound (nats)':>15}")
    for row in report["rows"]:
        print(f"{row['n']:>3}  {row['gold_reward']:>11.4f}  {row['kl_bound_nats']:>15.4f}")
    print(
        f"({len(prompts)} held-out prompts x {args.candidates} candidates, "
        f"{report['seconds']['total']} s)"
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return 0
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([kl_bound(n) for n in ns], [curve[n] for n in ns], "o-")
    for n in ns:
        ax.annotate(f"n={n}", (kl_bound(n), curve[n]), textcoords="offset points", xytext=(4, -10))
    ax.set_xlabel("KL bound log n - (n-1)/n (nats)")
    ax.set_ylabel("gold reward (VADER)")
    ax.set_title(f"Best-of-n, selected by {report['selected_by']}")
    fig.tight_layout()
    fig.savefig(out / "bon_curve.png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
