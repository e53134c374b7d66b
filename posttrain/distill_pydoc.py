"""Worked example: a student with half the layers of the embedded Gemma 3 270M, trained on
CPython's reference text three ways with the same steps: (a) SFT on the text, (b) supervised KD
(forward KL to the teacher on the same rows), (c) on-policy GKD (JSD(0.5) on the student's own
continuations of openings of the text); and (d) arm (c) again, started from arm (a)'s student
(its adapter folded into the shrunk student, `gemma-kit merge`'s fold, bf16).

    python posttrain/distill_pydoc.py prepare        # shrink, data, baselines, decode speed
    python posttrain/distill_pydoc.py arm sft        # each arm <= ~15 min on 2 shared cores
    python posttrain/distill_pydoc.py arm kd
    python posttrain/distill_pydoc.py arm gkd
    python posttrain/distill_pydoc.py arm sft_gkd    # (d): (c) from (a)'s student; after sft
    python posttrain/distill_pydoc.py report         # the table, results/distill_pydoc.json,
                                                     # docs/images/distill_pydoc.png

The student is `gemma-kit shrink` of the teacher keeping layers KEEP, 9 of 18: the first eight
(six sliding-window layers and the global layer 5) and the last (global): of the 9-layer
choices tried on the held-out text (every other layer, the first six and the last three, ...)
the one the teacher's own computation survives best, though still far from the teacher (its
perplexity starts in the millions). LoRA rank 16 on every projection. The text is
`pydoc_data.topics` (79 topics; (c) PSF, see finetune/pydoc_example.py), one row per topic cut
into 64-token pieces; 8 whole topics are held out. Every arm is evaluated the same way before
and after on the first 48 held-out rows: KL(teacher || student) per token and the student's
perplexity (posttrain/distill_common.held_out), beside the teacher's own perplexity there.
Runs go to runs/distill_pydoc/ (override with --runs).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import distill_common as common  # noqa: E402

KEEP = "0-7,17"
CONFIGS = common.HERE / "configs"
ARMS = {
    "sft": "distill_pydoc_sft.toml",
    "kd": "distill_pydoc_kd.toml",
    "gkd": "distill_pydoc_gkd.toml",
    "sft_gkd": "distill_pydoc_sft_gkd.toml",
}
LABELS = {
    "sft": "(a) SFT on the text",
    "kd": "(b) supervised KD, forward KL",
    "gkd": "(c) on-policy GKD, JSD(0.5)",
    "sft_gkd": "(d) (a), then on-policy GKD",
}
# Where each arm's student starts: the shrunk student, or arm (a)'s with its adapter folded in.
START = {"sft_gkd": ("sft_student", "sft")}
HELD_OUT_TOPICS = 8
MAX_LENGTH = 64
EVAL_ROWS = 48


def write_data(folder: pathlib.Path) -> dict:
    """topics_train/eval.jsonl ({"text"} rows: whole topics, 8 held out by a seeded shuffle)
    and openings(_eval).jsonl ({"prompt"}: the first ~120 characters of every ~600-character
    stretch of the training topics, 12 from held-out topics)."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    names = sorted(topics)
    random.Random(0).shuffle(names)
    held, train = sorted(names[:HELD_OUT_TOPICS]), sorted(names[HELD_OUT_TOPICS:])

    def openings(names):
        out = []
        for name in names:
            text = topics[name]
            for start in range(0, max(len(text) - 300, 1), 600):
                piece = text[start : start + 160]
                cut = piece.rfind(" ", 0, 120)
                piece = piece[: cut if cut > 40 else 120].strip()
                if len(piece) > 40:
                    out.append(piece)
        return out

    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "topics.jsonl": [{"text": topics[n]} for n in train],
        "topics_eval.jsonl": [{"text": topics[n]} for n in held],
        "openings.jsonl": [{"prompt": p} for p in openings(train)],
        "openings_eval.jsonl": [{"prompt": p} for p in openings(held)[:12]],
    }
    for name, rows in files.items():
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {name: len(rows) for name, rows in files.items()} | dict(held_out_topics=held)


def held_out_rows(runs: pathlib.Path, tokenizer):
    """The first EVAL_ROWS packed held-out rows, as every run's evaluation reads them."""
    from gemma_kit.finetune.data import load_dataset

    data = load_dataset(
        runs / "data" / "topics.jsonl",
        tokenizer,
        max_length=MAX_LENGTH,
        eval_file=runs / "data" / "topics_eval.jsonl",
        seed=0,
    )
    return data.eval.take(range(min(EVAL_ROWS, len(data.eval)))), data


def rows_of(taken: dict):
    from gemma_kit.finetune.data import Rows

    return Rows(**{k: taken[k] for k in Rows.ARRAYS})


def start_of(arm: str) -> str:
    """The folder (under runs) of the student an arm starts from."""
    return START[arm][0] if arm in START else "student"


def fold_start(arm: str, runs: pathlib.Path) -> None:
    """For an arm that starts from another arm's result: its adapter folded into the shrunk
    student, written once (needs that arm run first)."""
    if arm not in START:
        return
    folder, source = START[arm]
    if (runs / folder).is_dir():
        return
    adapter = runs / source / "adapter"
    if not adapter.is_dir():
        raise SystemExit(f"arm {arm} starts from arm {source}'s result: run `arm {source}` first")
    from gemma_kit.posttrain.merge_models import merge_models

    merge_models(str(runs / "student"), [str(adapter)], str(runs / folder), method="lora")


def config_for(arm: str, runs: pathlib.Path, steps: int | None):
    from gemma_kit.posttrain.distill_config import DistillConfig
    from gemma_kit.training.config import TrainConfig

    cls = TrainConfig if arm == "sft" else DistillConfig
    config = cls.from_file(CONFIGS / ARMS[arm])
    data = runs / "data"
    changes = dict(
        base=str(runs / start_of(arm)),
        train_file=str(data / "topics.jsonl"),
        eval_file=str(data / "topics_eval.jsonl"),
        out_dir=str(runs / arm),
        eval_max_rows=EVAL_ROWS,
        max_length=MAX_LENGTH,
    )
    if arm in ("gkd", "sft_gkd"):
        changes.update(
            prompts_file=str(data / "openings.jsonl"),
            eval_prompts_file=str(data / "openings_eval.jsonl"),
        )
    if steps is not None:
        changes.update(steps=steps)
    return config.replace(**changes)


def cmd_prepare(args) -> int:
    import gemma_kit
    from gemma_kit.checkpoint.shrink import shrink_checkpoint
    from gemma_kit.embedded import ensure_default_model

    runs = args.runs
    start = time.time()
    counts = write_data(runs / "data")
    print(f"data: {counts}", file=sys.stderr)
    student_dir = runs / "student"
    if not student_dir.exists():
        shrink_checkpoint(ensure_default_model(), KEEP, student_dir)
    teacher, tokenizer = gemma_kit.default_model()
    student = gemma_kit.load_model(student_dir)
    rows, _ = held_out_rows(runs, tokenizer)
    rows = rows_of(rows)
    report = dict(
        machine=common.machine(),
        keep_layers=KEEP,
        data=counts,
        student=student.config.name,
        teacher=teacher.config.name,
        student_layers=student.config.num_layers,
        parameters=dict(student=_count(student), teacher=_count(teacher)),
    )
    report["teacher_on_held_out"] = common.held_out(teacher, teacher, rows)
    report["student_before"] = common.held_out(student, teacher, rows)
    speeds = common.decode_speeds(
        dict(teacher=teacher, student=student), tokenizer, "The for statement is used to iterate"
    )
    report["decode_tokens_per_s"] = speeds
    report["seconds"] = round(time.time() - start, 1)
    common.write_json(runs / "prepare.json", report)
    print(json.dumps(report, indent=2))
    return 0


def _count(model) -> int:
    import jax
    from flax import nnx

    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def cmd_arm(args) -> int:
    import gemma_kit

    runs, arm = args.runs, args.arm
    fold_start(arm, runs)
    config = config_for(arm, runs, args.steps)
    start = time.time()
    if arm == "sft":
        from gemma_kit.finetune import train

        result = train(config, resume=args.resume)
    else:
        from gemma_kit.posttrain.distill import train_distill

        result = train_distill(config, resume=args.resume)
    if result.interrupted:
        return 130
    seconds = time.time() - start
    teacher, tokenizer = gemma_kit.default_model()
    student = gemma_kit.load_model(runs / start_of(arm), lora=result.adapter)
    rows, _ = held_out_rows(runs, tokenizer)
    after = common.held_out(student, teacher, rows_of(rows))
    report = dict(
        arm=arm,
        label=LABELS[arm],
        machine=common.machine(),
        steps=result.step,
        train_seconds=round(seconds, 1),
        held_out_after=after,
        evaluations=result.evaluations,
        last_loss=result.last_loss,
        tokens_seen=json.loads((runs / arm / "summary.json").read_text())["tokens_seen"],
    )
    common.write_json(runs / arm / "held_out.json", report)
    print(json.dumps(report, indent=2))
    return 0


def cmd_report(args) -> int:
    runs = args.runs
    prepared = json.loads((runs / "prepare.json").read_text())
    arms = {
        arm: json.loads((runs / arm / "held_out.json").read_text())
        for arm in ARMS
        if (runs / arm / "held_out.json").is_file()
    }
    before = prepared["student_before"]
    teacher = prepared["teacher_on_held_out"]
    lines = [
        "| arm | steps | train time | held-out KL(teacher \\|\\| student) | held-out perplexity |",
        "|---|---|---|---|---|",
        f"| shrunk student, before | - | - | {before['forward_kl']:.3f} | {before['ppl']:.1f} |",
    ]
    for arm, r in arms.items():
        a = r["held_out_after"]
        lines.append(
            f"| {LABELS[arm]} | {r['steps']} | {r['train_seconds'] / 60:.1f} min | "
            f"{a['forward_kl']:.3f} | {a['ppl']:.1f} |"
        )
    lines.append(f"| teacher (Gemma 3 270M) | - | - | 0 | {teacher['ppl']:.1f} |")
    table = "\n".join(lines)
    speeds = prepared["decode_tokens_per_s"]
    results = dict(
        machine=prepared["machine"],
        keep_layers=prepared["keep_layers"],
        parameters=prepared["parameters"],
        student_before=before,
        teacher_on_held_out=teacher,
        decode_tokens_per_s=speeds,
        decode_speedup=round(speeds["student"] / speeds["teacher"], 3),
        arms={
            arm: dict(
                steps=r["steps"],
                train_seconds=r["train_seconds"],
                tokens_seen=r["tokens_seen"],
                held_out_after=r["held_out_after"],
                evaluations=r["evaluations"],
            )
            for arm, r in arms.items()
        },
        table=table,
    )
    common.write_json(common.RESULTS / "distill_pydoc.json", results)
    plot(runs, arms, before, teacher, common.IMAGES / "distill_pydoc.png")
    print(table)
    print(
        f"decode tokens/s (batch 1, greedy): student {speeds['student']:.1f}, teacher "
        f"{speeds['teacher']:.1f} ({speeds['student'] / speeds['teacher']:.2f}x)"
    )
    return 0


def plot(runs: pathlib.Path, arms: dict, before: dict, teacher: dict, png: pathlib.Path):
    """Held-out KL(teacher || student) and perplexity against the step, per arm: the runs'
    own held-out rows (metrics.jsonl) between the common evaluation's end points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gemma_kit.training.metrics import read_metrics

    fig, (kl_ax, ppl_ax) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for arm, r in arms.items():
        rows = read_metrics(runs / arm / "metrics.jsonl")
        if arm == "sft":
            ppl = [(m["step"], m["eval_ppl"]) for m in rows if "eval_ppl" in m]
            kl = [(0, before["forward_kl"]), (r["steps"], r["held_out_after"]["forward_kl"])]
        else:
            # An arm that starts from another's result is drawn after that arm's steps.
            first = arms[START[arm][1]]["steps"] if arm in START and START[arm][1] in arms else 0
            ppl = [(first + m["step"], m["eval_data_ppl"]) for m in rows if "eval_data_ppl" in m]
            kl = [
                (first + m["step"], m["eval_data_forward_kl"])
                for m in rows
                if "eval_data_forward_kl" in m
            ]
        kl_ax.plot(*zip(*kl), "o-", label=LABELS[arm])
        ppl_ax.plot(*zip(*ppl), "o-", label=LABELS[arm])
    ppl_ax.axhline(teacher["ppl"], color="gray", linestyle="--", label="teacher")
    kl_ax.set_ylabel("held-out KL(teacher || student), nats / token")
    ppl_ax.set_ylabel("held-out perplexity")
    ppl_ax.set_yscale("log")
    for ax in (kl_ax, ppl_ax):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    kl_ax.legend(fontsize=8)
    fig.suptitle(f"Gemma 3 270M -> 9 of its 18 layers ({KEEP}), pydoc text")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs",
        type=pathlib.Path,
        default=pathlib.Path("runs/distill_pydoc"),
        help="folder of the runs (default runs/distill_pydoc)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="shrink the teacher, write the data, measure baselines")
    arm = sub.add_parser("arm", help="train and evaluate one arm")
    arm.add_argument("arm", choices=sorted(ARMS))
    arm.add_argument("--steps", type=int, default=None, help="override the config's steps")
    arm.add_argument("--resume", action="store_true", help="continue a stopped run")
    sub.add_parser("report", help="the table, the results JSON and the plot")
    args = parser.parse_args(argv)
    args.runs = args.runs.absolute()
    return {"prepare": cmd_prepare, "arm": cmd_arm, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
