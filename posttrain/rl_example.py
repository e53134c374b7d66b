"""The RL worked example: the embedded Gemma 3 270M (LoRA) trained against VADER sentiment on
the review prompts, three ways, as reward-against-KL curves beside the Best-of-N curve.

    python posttrain/rl_example.py --arm rloo_nokl     # RLOO, no KL penalty   (~15 min, 2 cores)
    python posttrain/rl_example.py --arm rloo_ema      # RLOO, KL to an EMA anchor
    python posttrain/rl_example.py --arm jbond         # J-BOND
    python posttrain/rl_example.py --plot              # the plot of the arms run so far

Each arm runs posttrain/configs/rl_ARM.toml (gemma_kit.posttrain.rl.train_rl; its run folder is
the config's out_dir, runs/rl_ARM) and writes posttrain/results/rl_ARM.json: the held-out
reward and exact KL to the base (nats per completion: the per-token KL over the whole vocabulary
at the visited states, summed) at each evaluation, a few held-out completions from the first
and the last one, the machine and the time taken. Every arm then redraws
docs/images/rl_reward_kl.png with the arms that have results and the Best-of-N curve of
posttrain/results/bon_curve.json (whose KL is the bound log n - (n - 1) / n: Best-of-n's true
KL lies at or below it).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
ARMS = {"rloo_nokl": "RLOO, no KL", "rloo_ema": "RLOO, KL to an EMA anchor", "jbond": "J-BOND"}


def machine() -> str:
    """The CPU model and the number of cores this process may use."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores"


def run_arm(arm: str, resume: bool, train: bool = True) -> dict:
    """Trains the arm (unless train is False: only the report, from its run folder)."""
    from gemma_kit.posttrain.rl import train_rl
    from gemma_kit.posttrain.rl_config import RLConfig

    config = RLConfig.from_file(HERE / "configs" / f"rl_{arm}.toml")
    out = pathlib.Path(config.out_dir)
    seconds = None
    if train:
        start = time.time()
        train_rl(config, resume=resume)
        seconds = time.time() - start
    return report(arm, out, seconds)


def report(arm: str, out: pathlib.Path, seconds: float | None) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = max(r["step"] for r in rows)
    evals = [
        dict(
            step=r["step"],
            reward=r["eval_reward"],
            kl=r["eval_kl"],
            kl_anchor=r["eval_kl_anchor"],
            length=r["eval_length"],
            entropy=r["eval_entropy"],
        )
        for r in rows
        if "eval_reward" in r
    ]
    train = [r for r in rows if "reward_mean" in r]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    first, last = samples[0]["step"], samples[-1]["step"]
    result = dict(
        arm=arm,
        label=ARMS[arm],
        config=str((HERE / "configs" / f"rl_{arm}.toml").relative_to(ROOT)),
        machine=machine(),
        seconds=None if seconds is None else round(seconds, 1),
        steps=steps,
        held_out=evals,
        training=dict(
            first_reward=train[0]["reward_mean"],
            last_reward=train[-1]["reward_mean"],
            last_kl=train[-1]["kl"],
            mean_rollout_s=sum(r["rollout_s"] for r in train) / len(train),
        ),
        samples=dict(
            first=[s for s in samples if s["step"] == first][:4],
            last=[s for s in samples if s["step"] == last][:4],
        ),
    )
    path = HERE / "results" / f"rl_{arm}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{ARMS[arm]} on {result['machine']}: {result['seconds']} s for {steps} steps")
    print(f"{'step':>5}  {'held-out reward':>15}  {'KL (nats)':>9}  {'length':>6}")
    for e in evals:
        print(f"{e['step']:>5}  {e['reward']:>15.4f}  {e['kl']:>9.4f}  {e['length']:>6.1f}")
    for s in result["samples"]["last"][:3]:
        print(f"  {s['prompt']!r} -> {s['completion']!r} (reward {s['reward']:.3f})")
    return result


def plot() -> pathlib.Path | None:
    """docs/images/rl_reward_kl.png from the results present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    bon = json.loads((HERE / "results" / "bon_curve.json").read_text())
    rows = bon["rows"]
    ax.plot(
        [r["kl_bound_nats"] for r in rows],
        [r["gold_reward"] for r in rows],
        "k--o",
        label="Best-of-n of the base (KL: the bound)",
    )
    for r in rows:
        ax.annotate(
            f"n={r['n']}",
            (r["kl_bound_nats"], r["gold_reward"]),
            textcoords="offset points",
            xytext=(4, -11),
            fontsize=8,
        )
    drawn = False
    earlier = {"jbond_first_try": "J-BOND, first try (4 prompts a step, lr 5e-4)"}
    for arm, label in {**ARMS, **earlier}.items():
        path = HERE / "results" / f"rl_{arm}.json"
        if not path.exists():
            continue
        evals = json.loads(path.read_text())["held_out"]
        ax.plot(
            [e["kl"] for e in evals],
            [e["reward"] for e in evals],
            "o:" if arm in earlier else "o-",
            label=label,
            alpha=0.6 if arm in earlier else 1,
        )
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("KL to the base (nats per completion; symlog)")
    ax.set_ylabel("held-out VADER reward")
    ax.set_title("Gemma 3 270M + LoRA, review prompts (points: evaluations)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = ROOT / "docs" / "images" / "rl_reward_kl.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arm", choices=sorted(ARMS), help="the arm to run")
    parser.add_argument("--resume", action="store_true", help="resume the arm's run")
    parser.add_argument("--plot", action="store_true", help="only redraw the plot")
    parser.add_argument(
        "--report", action="store_true", help="only rewrite the arm's results from its run folder"
    )
    args = parser.parse_args(argv)
    if args.arm is None and not args.plot:
        parser.error("give --arm ARM or --plot")
    sys.path.insert(0, str(ROOT))
    if args.arm:
        run_arm(args.arm, args.resume, train=not args.report)
    png = plot()
    if png:
        print(f"wrote {png.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
