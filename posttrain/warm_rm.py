"""WARM on the worked example: M LoRA reward models from one initialisation, their weight
average and their prediction ensemble, judged by clean held-out accuracy and by the gold
(VADER) reward of the Best-of-n completions each one picks.

    python posttrain/warm_rm.py                  # ~20 min on a shared 2-core CPU
    python posttrain/warm_rm.py --members 2 --steps 10          # a quicker look

1. Trains the members (gemma_kit.posttrain.warm.train_warm, the settings of
   posttrain/configs/rm_270m.toml): LoRA rank 8 on the embedded Gemma 3 270M, a zero head,
   the same `seed` (so the same initialisation), data orders data_seed = 0 .. M-1, on
   posttrain/data/train.jsonl (393 pairs, 25% of their labels flipped). A rerun keeps the
   members already trained (runs/warm/member-i) and resumes a stopped one.
2. Averages them (WA: LoRA deltas exactly, a rank 8M adapter; heads averaged).
3. Scores with each member, WA, and ENS (the mean of the members' rewards), adapters merged:
   the 44 clean held-out pairs (posttrain/data/eval.jsonl), and --candidates completions of
   each of the 12 held-out prompts drawn once from the base (the candidates of bon_curve.py:
   same seed). For each selector, the expected gold reward of Best-of-n (n = 1, 2, 4, 8) is
   computed exactly from the candidates (bon_curve.expected_best_of).

Writes posttrain/results/warm.json and docs/images/warm_bon.png.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bon_curve  # noqa: E402  (this folder's Best-of-n estimator)
import review_prompts  # noqa: E402  (this folder's prompt list)


def cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_pairs(path: pathlib.Path) -> tuple[list[str], list[str], list[str]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(HERE / "configs" / "rm_270m.toml"))
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None, help="default: the config's")
    parser.add_argument("--runs", default=str(HERE.parent / "runs" / "warm"))
    parser.add_argument("--candidates", type=int, default=32)
    parser.add_argument("--ns", default="1,2,4,8")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0, help="the candidates' draw")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--plot", default=str(HERE.parent / "docs" / "images" / "warm_bon.png"))
    args = parser.parse_args(argv)
    ns = [int(n) for n in args.ns.split(",")]
    if max(ns) > args.candidates:
        parser.error("every n must be at most --candidates")

    import numpy as np

    import gemma_kit
    from gemma_kit.posttrain.bon import best_of_n
    from gemma_kit.posttrain.reward_model import load_reward_model
    from gemma_kit.posttrain.reward_train import RewardConfig
    from gemma_kit.posttrain.rewards import vader_sentiment
    from gemma_kit.posttrain.warm import train_warm

    start = time.time()
    config = RewardConfig.from_file(args.config)
    held_out = pathlib.Path(config.eval_file)
    train_pairs = sum(
        1 for line in pathlib.Path(config.train_file).read_text().splitlines() if line.strip()
    )
    # Held-out pairs are scored below, once per selector, with merged adapters: the members'
    # runs skip their own (identical, zero-head) before/after evaluations.
    config = config.replace(
        out_dir=args.runs,
        eval_file=None,
        eval_fraction=0.0,
        **({"steps": args.steps} if args.steps else {}),
    )
    warm = train_warm(config, args.members, resume=True)
    trained = time.time() - start
    member_seconds = [
        None
        if r is None
        else round(
            json.loads((r.out_dir / "metrics.jsonl").read_text().splitlines()[-1])["elapsed"], 1
        )
        for r in warm.results
    ]

    # Candidates: drawn once from the base, scored by the gold reward (VADER).
    t = time.time()
    model, tokenizer = gemma_kit.default_model()
    sampler = gemma_kit.Sampler(model, tokenizer)
    _, prompts = review_prompts.split(seed=args.seed)
    drawn = best_of_n(
        sampler,
        prompts,
        args.candidates,
        vader_sentiment,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    groups = [sorted(c, key=lambda c: c.index) for c in drawn]
    cand_prompts = [c.prompt for g in groups for c in g]
    cand_texts = [c.text for g in groups for c in g]
    gold = np.asarray([c.reward for g in groups for c in g])
    del sampler, model
    sampled = time.time() - t

    # Every selector scores the held-out pairs and the candidates.
    t = time.time()
    pair_prompts, chosen, rejected = read_pairs(held_out)
    selectors = [(f"member {i}", f) for i, f in enumerate(warm.members)]
    selectors.append(("WA (weight average)", warm.average))
    scores = {}
    for name, folder in selectors:
        rm = load_reward_model(folder, merge=True)
        both = rm.score(pair_prompts * 2, chosen + rejected, progress=False)
        scores[name] = (
            both[: len(chosen)],
            both[len(chosen) :],
            rm.score(cand_prompts, cand_texts, progress=False),
        )
        print(f"  scored with {name}", file=sys.stderr, flush=True)
        del rm
    members = [scores[f"member {i}"] for i in range(len(warm.members))]
    scores["ENS (ensemble)"] = tuple(np.mean([m[k] for m in members], axis=0) for k in range(3))
    scored = time.time() - t

    K = args.candidates

    def best_of(select: np.ndarray) -> dict[int, float]:
        curve = {}
        for n in ns:
            per_prompt = [
                bon_curve.expected_best_of(
                    select[p * K : (p + 1) * K].tolist(), gold[p * K : (p + 1) * K].tolist(), n
                )
                for p in range(len(groups))
            ]
            curve[n] = float(np.mean(per_prompt))
        return curve

    rows = []
    for name, (c, r, cand) in scores.items():
        rows.append(
            dict(
                selector=name,
                held_out_accuracy=round(float(np.mean(c > r)), 4),
                best_of_gold={n: round(v, 4) for n, v in best_of(cand).items()},
            )
        )
    rows.append(
        dict(
            selector="gold (VADER itself)",
            held_out_accuracy=1.0,
            best_of_gold={n: round(v, 4) for n, v in best_of(gold).items()},
        )
    )
    report = dict(
        machine=f"{cpu_name()}, {platform.system()} (shared with other jobs)",
        members=len(warm.members),
        steps=config.steps,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        lora_rank=config.lora_rank,
        train_pairs=train_pairs,
        flipped_fraction=0.25,
        held_out_pairs=len(chosen),
        prompts=len(groups),
        candidates_per_prompt=K,
        rows=rows,
        seconds=dict(
            training=round(trained, 1),
            per_member=member_seconds,
            sampling=round(sampled, 1),
            scoring=round(scored, 1),
            total=round(time.time() - start, 1),
        ),
    )
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "warm.json").write_text(json.dumps(report, indent=2) + "\n")
    header = "".join(f"{f'BoN-{n} gold':>12}" for n in ns)
    print(f"{'selector':<22}{'held-out acc':>13}{header}")
    for row in rows:
        cells = "".join(f"{row['best_of_gold'][n]:>12.4f}" for n in ns)
        print(f"{row['selector']:<22}{row['held_out_accuracy']:>13.4f}{cells}")
    print(f"({report['machine']}; {report['seconds']})")
    plot(rows, ns, pathlib.Path(args.plot))
    return 0


def plot(rows, ns, path: pathlib.Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for row in rows:
        name = row["selector"]
        style = dict(color="0.6", linewidth=0.8) if name.startswith("member") else {}
        label = "members" if name == "member 0" else None if name.startswith("member") else name
        ax.plot(ns, [row["best_of_gold"][n] for n in ns], "o-", label=label, **style)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("n (Best-of-n)")
    ax.set_ylabel("gold reward of the pick (VADER)")
    ax.set_title("Best-of-n picked by each reward model")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
