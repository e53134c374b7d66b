"""`gemma-kit reward` (reward models: train, WARM, average, score), and `gemma-kit sample
--best-of N --reward SPEC`.

    gemma-kit reward train --config FILE [--resume] [--set key=value ...]
    gemma-kit reward warm --config FILE --members 4 [--resume] [--set key=value ...]
    gemma-kit reward average --rm runs/a runs/b runs/c --out runs/warm
    gemma-kit reward score --rm DIR [DIR ...] --file completions.jsonl [--json]
    gemma-kit sample --prompt "The movie was" --best-of 8 \\
        --reward gemma_kit.posttrain.rewards:vader_sentiment

`reward train` trains one reward model (gemma_kit.posttrain.reward_train; the folder is
OUT_DIR/reward_model); `reward warm` trains M of them from one initialisation, in data orders
data_seed + i, and averages them (gemma_kit.posttrain.warm; OUT_DIR/member-i, OUT_DIR/average);
`reward average` weight-averages reward model folders (LoRA deltas exactly). `reward score`
reads {"prompt", "completion"} rows (a prompt may be a message list, as in the preference
format), or preference rows {"prompt", "chosen", "rejected"} (TRL's format, see
gemma_kit.posttrain.preferences), whose pairwise accuracy it reports; with several --rm folders
it scores with their prediction ensemble (the mean of their rewards; --json also lists each).
"""

from __future__ import annotations

import json
import sys
from typing import cast

from gemma_kit.cli.options import positive_int
from gemma_kit.cli.training import add_training_arguments, config_from_args, report


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "reward",
        help="reward models: train, WARM-average, score "
        "(pip install 'gemma-kit[finetune]'; see "
        "docs/post-training-preferences.md)",
    )
    sub = p.add_subparsers(dest="reward_command", required=True)
    t = sub.add_parser("train", help="train a reward model on preference pairs (Bradley-Terry)")
    add_training_arguments(
        t, train_file_help='JSONL preference pairs {"prompt", "chosen", "rejected"}'
    )
    t.set_defaults(run=cmd_train)
    w = sub.add_parser(
        "warm",
        help="train M reward models from one initialisation (data "
        "orders data_seed + i) and weight-average them (WARM)",
    )
    add_training_arguments(
        w, train_file_help='JSONL preference pairs {"prompt", "chosen", "rejected"}'
    )
    w.add_argument(
        "--members",
        type=positive_int,
        default=4,
        metavar="M",
        help="reward models to train and average (default: 4)",
    )
    w.set_defaults(run=cmd_warm)
    a = sub.add_parser(
        "average",
        help="weight-average reward models trained from one "
        "initialisation (WARM; LoRA deltas exactly)",
    )
    a.add_argument(
        "--rm",
        required=True,
        nargs="+",
        metavar="DIR",
        help="reward model folders (RewardModel.save, OUT_DIR/reward_model of `reward train`)",
    )
    a.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="the folder to write the averaged reward model to",
    )
    a.add_argument(
        "--weights",
        type=float,
        nargs="+",
        default=None,
        metavar="W",
        help="one weight per --rm folder, >= 0 (default: equal weights)",
    )
    a.add_argument(
        "--overwrite", action="store_true", help="replace an earlier reward model folder at --out"
    )
    a.set_defaults(run=cmd_average)
    s = sub.add_parser(
        "score", help="score a JSONL file with a reward model (or the ensemble of several)"
    )
    s.add_argument(
        "--rm",
        required=True,
        nargs="+",
        metavar="DIR",
        help="a reward model folder (RewardModel.save); several: their prediction "
        "ensemble, the mean of their rewards",
    )
    s.add_argument(
        "--file",
        required=True,
        help='JSONL of {"prompt", "completion"} rows, or of preference rows '
        '{"prompt", "chosen", "rejected"}',
    )
    s.add_argument(
        "--json", action="store_true", help="print each row back as JSON with its reward(s) added"
    )
    s.add_argument(
        "--batch-size", type=positive_int, default=16, help="sequences scored at once (default: 16)"
    )
    s.set_defaults(run=cmd_score)


def cmd_train(args) -> int:
    from gemma_kit.posttrain.reward_train import RewardConfig, train_reward_model

    config = config_from_args(args, RewardConfig)
    return report(train_reward_model(config, resume=args.resume), what="held-out pairwise accuracy")


def cmd_warm(args) -> int:
    from gemma_kit.posttrain.reward_train import RewardConfig
    from gemma_kit.posttrain.warm import train_warm

    config = config_from_args(args, RewardConfig)
    result = train_warm(config, args.members, resume=args.resume)
    for i, (folder, run) in enumerate(zip(result.members, result.results)):
        accuracy = (
            "kept (trained before)"
            if run is None
            else (
                f"held-out pairwise accuracy {run.eval_after:.4f}"
                if run.eval_after is not None
                else "no held-out pairs"
            )
        )
        print(f"member {i}: {folder}: {accuracy}")
    print(f"wrote the weight average to {result.average}")
    return 0


def cmd_average(args) -> int:
    from gemma_kit.posttrain.warm import average_reward_models

    average_reward_models(args.rm, args.out, weights=args.weights, overwrite=args.overwrite)
    return 0


def _read_rows(path) -> tuple[str, list[tuple[int, dict, tuple]]]:
    """("completions" | "pairs", [(line, row, parsed)]); DataError naming file:line."""
    from gemma_kit.errors import DataError
    from gemma_kit.finetune.data import read_jsonl
    from gemma_kit.posttrain.preferences import parse_pair

    kind, rows = None, []
    for line_no, line in read_jsonl(path):
        try:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"a row must be a JSON object, got {type(row).__name__}")
            this = "completions" if "completion" in row else "pairs"
            if kind is not None and this != kind:
                raise ValueError("rows mix completions and preference pairs; use one kind per file")
            kind = this
            if this == "pairs":
                parsed: tuple = parse_pair(row)  # (prompt, chosen, rejected, margin)
            else:  # the pair parser checks the prompt and the reply the same way
                if "prompt" not in row and "messages" not in row:
                    raise ValueError(
                        'a completion row needs "prompt" (or "messages") and "completion"'
                    )
                prompt_keys = {k: v for k, v in row.items() if k in ("prompt", "messages")}
                parsed = parse_pair({**prompt_keys, "chosen": row["completion"], "rejected": ""})[
                    :2
                ]
        except ValueError as err:
            raise DataError(str(err), path=path, line=line_no) from None
        rows.append((line_no, row, parsed))
    return kind or "completions", rows


def _scorer(folders: list[str]):
    """score(prompts, completions, batch_size) -> (rewards [N], each member's [M, N] or None)."""
    from gemma_kit.posttrain.reward_model import load_reward_model

    models = [load_reward_model(f) for f in folders]
    if len(models) == 1:
        return lambda p, c, b: (models[0].score(p, c, batch_size=b), None)
    from gemma_kit.posttrain.warm import RewardEnsemble

    ensemble = RewardEnsemble(models)

    def score(prompts, completions, batch_size):
        members = ensemble.member_scores(prompts, completions, batch_size=batch_size, progress=True)
        return members.mean(axis=0), members

    return score


def cmd_score(args) -> int:
    kind, rows = _read_rows(args.file)  # bad data is reported before the model loads
    score = _scorer(args.rm)
    if kind == "completions":
        rewards, members = score(
            [p for _, _, (p, _) in rows], [c for _, _, (_, c) in rows], args.batch_size
        )
        for i, ((line, row, _), reward) in enumerate(zip(rows, rewards)):
            each = {} if members is None else {"rewards": members[:, i].tolist()}
            print(
                json.dumps({**row, "reward": float(reward), **each})
                if args.json
                else f"line {line}\t{reward:.6f}"
            )
        if not args.json:
            print(
                f"{len(rows)} completions, mean reward {float(rewards.mean()):.6f}", file=sys.stderr
            )
        return 0
    prompts = [p for _, _, (p, _, _, _) in rows]
    both, members = score(
        prompts * 2,
        [c for _, _, (_, c, _, _) in rows] + [r for _, _, (_, _, r, _) in rows],
        args.batch_size,
    )
    n = len(rows)
    chosen, rejected = both[:n], both[n:]
    for i, ((line, row, _), c, r) in enumerate(zip(rows, chosen, rejected)):
        each = (
            {}
            if members is None
            else {
                "chosen_rewards": members[:, i].tolist(),
                "rejected_rewards": members[:, n + i].tolist(),
            }
        )
        print(
            json.dumps({**row, "chosen_reward": float(c), "rejected_reward": float(r), **each})
            if args.json
            else f"line {line}\t{c:.6f}\t{r:.6f}"
        )
    wins = int((chosen > rejected).sum())
    if not args.json:
        print(
            f"{len(rows)} pairs, pairwise accuracy {wins / len(rows):.4f} ({wins} of "
            f"{len(rows)} chosen scored above rejected)",
            file=sys.stderr,
        )
    return 0


# --------------------------------------------------------------------------------------------
# sample --best-of N --reward SPEC (called from gemma_kit.cli's sample command)


def best_of_reward(args):
    """The --reward of `sample --best-of`, loaded before the model (a bad spec fails fast)."""
    from gemma_kit.errors import RewardError
    from gemma_kit.posttrain.rewards import load_reward

    if args.best_of is None or args.reward is None:
        raise RewardError(
            "--best-of N and --reward SPEC go together: Best-of-N draws N "
            "candidates and keeps the one the reward scores highest"
        )
    return load_reward(args.reward)


def print_best_of(sampler, reward, args, sampling: dict) -> int:
    """Prints the best candidate's text (with --json: every candidate, best first)."""
    from gemma_kit.posttrain.bon import Candidate, best_of_n

    if not sampling.get("temperature"):
        sampling["temperature"] = 1.0
        print(
            "note: --best-of samples at temperature 1.0 (greedy decoding would give N equal "
            "candidates); pass --temperature to choose another",
            file=sys.stderr,
        )
    try:
        # One prompt string: one list of candidates.
        candidates = cast(
            "list[Candidate]", best_of_n(sampler, args.prompt, args.best_of, reward, **sampling)
        )
    finally:
        if hasattr(reward, "close"):
            reward.close()
    if args.json:
        print(
            json.dumps(
                {
                    "prompt": args.prompt,
                    "best_of": args.best_of,
                    "candidates": [
                        {
                            "text": c.text,
                            "reward": c.reward,
                            "index": c.index,
                            "tokens": c.tokens,
                            "logprobs": c.logprobs,
                            "finish_reason": c.finish_reason,
                        }
                        for c in candidates
                    ],
                }
            )
        )
    else:
        print(candidates[0].text)
        print(
            f"[best of {args.best_of}: reward {candidates[0].reward:.4f}; the others "
            f"{', '.join(f'{c.reward:.3f}' for c in candidates[1:])}]",
            file=sys.stderr,
        )
    return 0
