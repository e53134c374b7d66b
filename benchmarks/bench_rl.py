#!/usr/bin/env python
"""Where an RL step's time goes, against the SFT step on the same rows, same run (CPU).

    python benchmarks/bench_rl.py                      # 4 prompts x k=4, 24 new tokens, EMA
    python benchmarks/bench_rl.py --anchor reference --rounds 5 --new 32

The embedded Gemma 3 270M with LoRA rank 8 on every projection, the worked example's review
prompts and VADER reward (the [rewards] extra), RLOO with k1 in the reward. One RL step of
gemma_kit.posttrain.rl is split into its parts, each timed on its own (whole calls, results on
the host):

- rollout: the Sampler takes the current LoRA factors (update_params) and draws prompts x k
  completions (gemma_kit.posttrain.rollout);
- reward: VADER on every completion;
- scoring: the compiled pass without gradients that gives the policy's, the reference's (and
  the EMA anchor's) log-probs and exact full-vocabulary KLs: the reference / anchor forward;
- host: advantages and the step's rows;
- update: the compiled optimizer step (forward and backward of the policy-gradient loss);
- anchor: the EMA update of the anchor's factors;

and the SFT step: the fine-tuning loss (CrossEntropy) on exactly the step's rows (the rollouts,
completion tokens weighted 1), the same trainer settings. After one warm-up step (compiles),
`--rounds` steps; the table gives each part's median seconds and share of the RL step, and the
RL step against the SFT step. The machine was shared when the figures in the docs were taken:
absolute times move, ratios within one run hold better.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np
from _log import log  # noqa: E402  (benchmarks/ is on sys.path)

ROOT = pathlib.Path(__file__).resolve().parents[1]
p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--prompts", type=int, default=4, help="prompts per step (default 4)")
p.add_argument("--k", type=int, default=4, help="rollouts per prompt (default 4)")
p.add_argument("--new", type=int, default=24, help="new tokens per rollout (default 24)")
p.add_argument("--rounds", type=int, default=3, help="timed steps after the warm-up (default 3)")
p.add_argument(
    "--anchor",
    choices=["ema", "reference"],
    default="ema",
    help="the KL's anchor: ema (three networks scored) or reference (two) (default ema)",
)
ARGS = p.parse_args()


from gemma_kit.posttrain.rl import PolicyOptimisation  # noqa: E402
from gemma_kit.posttrain.rl_config import RLConfig  # noqa: E402
from gemma_kit.training import CrossEntropy, Trainer  # noqa: E402
from gemma_kit.training.model import build_model  # noqa: E402
from gemma_kit.training.objective import RunContext  # noqa: E402
from gemma_kit.training.trainer import micro_batches  # noqa: E402


def machine() -> str:
    model = "unknown CPU"
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{model}, {len(os.sched_getaffinity(0))} cores, load {os.getloadavg()[0]:.1f}"


def main() -> None:
    log(f"machine: {machine()}")
    data = ROOT / "posttrain" / "data"
    out = pathlib.Path(tempfile.mkdtemp(prefix="bench_rl_"))
    config = RLConfig(
        prompts_file=str(data / "prompts_train.jsonl"),
        out_dir=str(out),
        reward="gemma_kit.posttrain.rewards:vader_sentiment",
        steps=100,
        batch_size=ARGS.prompts,
        num_samples=ARGS.k,
        max_new_tokens=ARGS.new,
        kl_coef=0.1,
        anchor=ARGS.anchor,
        eval_fraction=0.0,
        learning_rate=1e-4,
        max_length=64,
    ).validate()
    objective = PolicyOptimisation()
    objective.check_inputs(config)
    model, tokenizer, _ = build_model(config)
    steps = objective.prepare(RunContext(config, model, tokenizer, out, True, log))
    trainer = Trainer(config, model, steps, objective.loss, keep_model=True)
    sft = Trainer(config, model, steps, CrossEntropy(config.loss_chunk), keep_model=True)
    times: dict[str, list[float]] = {}
    for step in range(ARGS.rounds + 1):
        tick = time.perf_counter()
        rows = objective.host_batch(step, trainer)
        host_total = time.perf_counter() - tick
        parts = {k[:-2]: objective.pending[k] for k in ("rollout_s", "reward_s", "score_s")}
        parts["host"] = host_total - sum(parts.values())
        tick = time.perf_counter()
        metrics = trainer.step(trainer.place(rows, batch_axis=1))
        parts["update"] = time.perf_counter() - tick
        tick = time.perf_counter()
        objective.after_step(step, trainer, metrics)
        parts["anchor"] = time.perf_counter() - tick
        flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in rows.items()}
        plain = {k: flat[k] for k in ("tokens", "targets", "positions", "segments")}
        # The RL rows carry their completion positions (index [R, N]) and the mask at them
        # (PolicyLoss's layout): the SFT rows weight those positions of [R, T].
        weights = np.zeros(flat["tokens"].shape, np.float32)
        np.put_along_axis(weights, np.asarray(flat["index"]), np.asarray(flat["mask"]), axis=1)
        plain["weights"] = weights
        tick = time.perf_counter()
        sft.step(sft.place(micro_batches(plain, config.grad_accum), batch_axis=1))
        parts["sft"] = time.perf_counter() - tick
        tokens = int((flat["segments"] > 0).sum())
        log(
            f"step {step}{' (warm-up: compiles)' if step == 0 else ''}: "
            + ", ".join(f"{k} {v:.2f}s" for k, v in parts.items())
        )
        if step:
            for k, v in parts.items():
                times.setdefault(k, []).append(v)
    median = {k: statistics.median(v) for k, v in times.items()}
    rl = sum(v for k, v in median.items() if k != "sft")
    print(f"machine: {machine()}")
    print(
        f"RL step: {ARGS.prompts} prompts x k={ARGS.k}, {ARGS.new} new tokens, anchor "
        f"{ARGS.anchor}; {tokens} tokens in the step's rows; median of {ARGS.rounds} steps"
    )
    print(f"{'part':<10} {'seconds':>8} {'share':>7}")
    for k in ("rollout", "reward", "score", "host", "update", "anchor"):
        print(f"{k:<10} {median[k]:>8.2f} {median[k] / rl:>7.1%}")
    print(f"{'RL step':<10} {rl:>8.2f} {1:>7.1%}")
    print(
        f"{'SFT step':<10} {median['sft']:>8.2f}   (same rows; RL step / SFT step = "
        f"{rl / median['sft']:.2f}, update / SFT = {median['update'] / median['sft']:.2f})"
    )
    print(
        json.dumps(
            dict(
                machine=machine(),
                prompts=ARGS.prompts,
                k=ARGS.k,
                new=ARGS.new,
                anchor=ARGS.anchor,
                tokens=tokens,
                median_seconds={k: round(v, 3) for k, v in median.items()},
                rl_step=round(rl, 3),
                rollout_share=round(median["rollout"] / rl, 3),
                rl_over_sft=round(rl / median["sft"], 3),
            )
        )
    )
    objective.close()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
