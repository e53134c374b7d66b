"""Worked example: context distillation of a hidden instruction into LoRA, on-policy against
off-policy.

    python posttrain/distill_context.py arm on       # lambda 1: the student's own samples
    python posttrain/distill_context.py arm off      # lambda 0: teacher samples drawn once
    python posttrain/distill_context.py report       # results/distill_context.json,
                                                     # docs/images/distill_context.png

The teacher is the embedded Gemma 3 270M reading "Here is an enthusiastic five-star review.\\n\\n"
before each review opener of posttrain/data (36 training, 12 held-out); the student is the same
network with LoRA (rank 8), which never sees the instruction; teacher = "base", so the teacher
is the student's own base weights, not a second copy. Both arms take the same 30 steps of 8
rows (4 openers x 2 samples of 24 tokens) with JSD(0.5) (configs/distill_context.toml).
Held out every 10 steps: the reverse KL(student || teacher) on fresh student samples, the
forward KL(teacher || student) on teacher samples, and both against a "golden" teacher reading
a paraphrased instruction (the teacher-hacking probe). The report also samples the held-out
openers 8 times each with the base model, the teacher (base + instruction) and each student,
and scores them with VADER (the gold reward of the reward examples): how far the students'
sentiment moved toward the teacher's.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import distill_common as common  # noqa: E402

CONFIG = common.HERE / "configs" / "distill_context.toml"
ARMS = {"on": dict(lmbda=1.0), "off": dict(lmbda=0.0)}
LABELS = {"on": "on-policy (lambda 1)", "off": "off-policy (lambda 0, fixed teacher samples)"}


def config_for(arm: str, runs: pathlib.Path, steps: int | None):
    from gemma_kit.posttrain.distill_config import DistillConfig

    config = DistillConfig.from_file(CONFIG).replace(out_dir=str(runs / arm), **ARMS[arm])
    return config.replace(steps=steps) if steps is not None else config


def cmd_arm(args) -> int:
    from gemma_kit.posttrain.distill import train_distill

    start = time.time()
    result = train_distill(config_for(args.arm, args.runs, args.steps), resume=args.resume)
    if result.interrupted:
        return 130
    report = dict(
        arm=args.arm,
        label=LABELS[args.arm],
        machine=common.machine(),
        steps=result.step,
        seconds=round(time.time() - start, 1),
        evaluations=result.evaluations,
        adapter=str(result.adapter),
    )
    common.write_json(args.runs / args.arm / "result.json", report)
    print(json.dumps(report, indent=2))
    return 0


def vader_of(sampler, prompts: list[str], *, n: int, seed: int) -> float:
    """The mean VADER compound of n samples (24 tokens, temperature 1) of each prompt."""
    from gemma_kit.posttrain.rewards import call_reward, vader_sentiment

    batch = [p for p in prompts for _ in range(n)]
    results = sampler.generate(batch, max_new_tokens=24, temperature=1.0, seed=seed)
    scores = call_reward(
        vader_sentiment, [p for p in prompts for _ in range(n)], [r.text for r in results]
    )
    return float(scores.mean())


def cmd_report(args) -> int:
    import gemma_kit
    from gemma_kit.lora import load_adapter

    runs = args.runs
    config = config_for("on", runs, None)
    arms = {
        arm: json.loads((runs / arm / "result.json").read_text())
        for arm in ARMS
        if (runs / arm / "result.json").is_file()
    }
    start = time.time()
    model, tokenizer = gemma_kit.default_model()
    prompts = [
        json.loads(line)["prompt"]
        for line in pathlib.Path(config.eval_prompts_file).read_text().splitlines()
        if line.strip()
    ]
    sampler = gemma_kit.Sampler(model, tokenizer)
    vader = dict(
        base=vader_of(sampler, prompts, n=args.samples, seed=1),
        teacher=vader_of(
            sampler, [config.teacher_prefix + p for p in prompts], n=args.samples, seed=1
        ),
    )
    for arm, r in arms.items():
        student, _ = gemma_kit.default_model()
        load_adapter(student, r["adapter"])
        vader[arm] = vader_of(
            gemma_kit.Sampler(student, tokenizer), prompts, n=args.samples, seed=1
        )
    rows = []
    for arm, r in arms.items():
        before, after = r["evaluations"]["before"], r["evaluations"]["after"]
        moved = (vader[arm] - vader["base"]) / (vader["teacher"] - vader["base"])
        rows.append(
            dict(
                arm=arm,
                label=LABELS[arm],
                steps=r["steps"],
                minutes=round(r["seconds"] / 60, 1),
                reverse_kl=[before["eval_reverse_kl"], after["eval_reverse_kl"]],
                forward_kl=[before["eval_forward_kl"], after["eval_forward_kl"]],
                golden_reverse_kl=[
                    before["eval_golden_reverse_kl"],
                    after["eval_golden_reverse_kl"],
                ],
                vader=vader[arm],
                vader_moved_fraction=moved,
            )
        )
    lines = [
        "| arm | steps | time | held-out KL(student \\|\\| teacher), student samples | "
        "KL(teacher \\|\\| student), teacher samples | KL(student \\|\\| golden) | "
        "VADER (moved toward the teacher) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['steps']} | {r['minutes']} min | "
            f"{r['reverse_kl'][0]:.3f} -> {r['reverse_kl'][1]:.3f} | "
            f"{r['forward_kl'][0]:.3f} -> {r['forward_kl'][1]:.3f} | "
            f"{r['golden_reverse_kl'][0]:.3f} -> {r['golden_reverse_kl'][1]:.3f} | "
            f"{r['vader']:.3f} ({r['vader_moved_fraction']:.0%}) |"
        )
    table = "\n".join(lines)
    results = dict(
        machine=common.machine(),
        teacher_prefix=config.teacher_prefix,
        golden_prefix=config.golden_prefix,
        vader=dict(vader, samples_per_prompt=args.samples, prompts=len(prompts)),
        arms=rows,
        table=table,
        report_seconds=round(time.time() - start, 1),
    )
    common.write_json(common.RESULTS / "distill_context.json", results)
    plot(runs, list(arms), common.IMAGES / "distill_context.png")
    print(table)
    print(f"VADER: base {vader['base']:.3f}, teacher (base + instruction) {vader['teacher']:.3f}")
    return 0


def plot(runs: pathlib.Path, arms: list[str], png: pathlib.Path) -> None:
    """The training divergence and the held-out KLs against the step, one panel per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gemma_kit.training.metrics import read_metrics

    series = {
        "eval_reverse_kl": "KL(student || teacher), student samples",
        "eval_forward_kl": "KL(teacher || student), teacher samples",
        "eval_golden_reverse_kl": "KL(student || golden), student samples",
    }
    fig, axes = plt.subplots(
        1, len(arms), figsize=(5 * len(arms), 4), dpi=110, sharey=True, squeeze=False
    )
    for ax, arm in zip(axes[0], arms):
        rows = read_metrics(runs / arm / "metrics.jsonl")
        train = [(m["step"], m["loss"]) for m in rows if "loss" in m]
        ax.plot(*zip(*train), alpha=0.5, linewidth=0.8, label="training JSD(0.5)")
        for key, label in series.items():
            points = [(m["step"], m[key]) for m in rows if key in m]
            if points:
                ax.plot(*zip(*points), "o-", label=label)
        ax.set_title(LABELS[arm], fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("nats / token")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs",
        type=pathlib.Path,
        default=pathlib.Path("runs/distill_context"),
        help="folder of the runs (default runs/distill_context)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    arm = sub.add_parser("arm", help="train one arm")
    arm.add_argument("arm", choices=sorted(ARMS))
    arm.add_argument("--steps", type=int, default=None, help="override the config's steps")
    arm.add_argument("--resume", action="store_true", help="continue a stopped run")
    report = sub.add_parser("report", help="VADER of the students, the table and the plot")
    report.add_argument("--samples", type=int, default=8, help="samples per held-out opener")
    args = parser.parse_args(argv)
    args.runs = args.runs.absolute()
    return {"arm": cmd_arm, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
