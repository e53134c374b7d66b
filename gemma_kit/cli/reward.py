"""`gemma-kit reward score` (reward models), and `gemma-kit sample --best-of N --reward SPEC`.

    gemma-kit reward score --rm runs/rm --file completions.jsonl [--json]
    gemma-kit sample --prompt "The movie was" --best-of 8 \\
        --reward gemma_kit.posttrain.rewards:vader_sentiment

`reward score` reads {"prompt", "completion"} rows (a prompt may be a message list, as in the
preference format), or preference rows {"prompt", "chosen", "rejected"} (TRL's format, see
gemma_kit.posttrain.preferences), whose pairwise accuracy it reports. Training and WARM
averaging of reward models come with the training core.
"""

from __future__ import annotations

import json
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("reward", help="reward models: score completions or preference "
                              "pairs (pip install 'gemma-kit[finetune]')")
    sub = p.add_subparsers(dest="reward_command", required=True)
    s = sub.add_parser("score", help="score a JSONL file with a reward model")
    s.add_argument("--rm", required=True, help="a reward model folder (RewardModel.save)")
    s.add_argument("--file", required=True,
                   help='JSONL of {"prompt", "completion"} rows, or of preference rows '
                        '{"prompt", "chosen", "rejected"}')
    s.add_argument("--json", action="store_true",
                   help="print each row back as JSON with its reward(s) added")
    s.add_argument("--batch-size", type=int, default=16, help="sequences scored at once")
    s.set_defaults(run=cmd_score)


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
                raise ValueError("rows mix completions and preference pairs; use one kind per "
                                 "file")
            kind = this
            if this == "pairs":
                parsed = parse_pair(row)
            else:  # the pair parser checks the prompt and the reply the same way
                if "prompt" not in row and "messages" not in row:
                    raise ValueError("a completion row needs \"prompt\" (or \"messages\") and "
                                     "\"completion\"")
                prompt_keys = {k: v for k, v in row.items() if k in ("prompt", "messages")}
                parsed = parse_pair({**prompt_keys, "chosen": row["completion"],
                                     "rejected": ""})[:2]
        except ValueError as err:
            raise DataError(str(err), path=path, line=line_no) from None
        rows.append((line_no, row, parsed))
    return kind or "completions", rows


def cmd_score(args) -> int:
    from gemma_kit.posttrain.reward_model import load_reward_model

    kind, rows = _read_rows(args.file)  # bad data is reported before the model loads
    rm = load_reward_model(args.rm)
    if kind == "completions":
        rewards = rm.score([p for _, _, (p, _) in rows], [c for _, _, (_, c) in rows],
                           batch_size=args.batch_size)
        for (line, row, _), reward in zip(rows, rewards):
            print(json.dumps({**row, "reward": float(reward)}) if args.json
                  else f"line {line}\t{reward:.6f}")
        if not args.json:
            print(f"{len(rows)} completions, mean reward {float(rewards.mean()):.6f}",
                  file=sys.stderr)
        return 0
    prompts = [p for _, _, (p, _, _, _) in rows]
    both = rm.score(prompts * 2, [c for _, _, (_, c, _, _) in rows] +
                    [r for _, _, (_, _, r, _) in rows], batch_size=args.batch_size)
    chosen, rejected = both[: len(rows)], both[len(rows):]
    for (line, row, _), c, r in zip(rows, chosen, rejected):
        print(json.dumps({**row, "chosen_reward": float(c), "rejected_reward": float(r)})
              if args.json else f"line {line}\t{c:.6f}\t{r:.6f}")
    wins = int((chosen > rejected).sum())
    if not args.json:
        print(f"{len(rows)} pairs, pairwise accuracy {wins / len(rows):.4f} ({wins} of "
              f"{len(rows)} chosen scored above rejected)", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------
# sample --best-of N --reward SPEC (called from gemma_kit.cli's sample command)


def best_of_reward(args):
    """The --reward of `sample --best-of`, loaded before the model (a bad spec fails fast)."""
    from gemma_kit.errors import RewardError
    from gemma_kit.posttrain.rewards import load_reward

    if args.best_of is None or args.reward is None:
        raise RewardError("--best-of N and --reward SPEC go together: Best-of-N draws N "
                          "candidates and keeps the one the reward scores highest")
    return load_reward(args.reward)


def print_best_of(sampler, reward, args, sampling: dict) -> int:
    """Prints the best candidate's text (with --json: every candidate, best first)."""
    from gemma_kit.posttrain.bon import best_of_n

    if not sampling.get("temperature"):
        sampling["temperature"] = 1.0
        print("note: --best-of samples at temperature 1.0 (greedy decoding would give N equal "
              "candidates); pass --temperature to choose another", file=sys.stderr)
    try:
        candidates = best_of_n(sampler, args.prompt, args.best_of, reward, **sampling)
    finally:
        if hasattr(reward, "close"):
            reward.close()
    if args.json:
        print(json.dumps({"prompt": args.prompt, "best_of": args.best_of, "candidates": [
            {"text": c.text, "reward": c.reward, "index": c.index, "tokens": c.tokens,
             "logprobs": c.logprobs, "finish_reason": c.finish_reason} for c in candidates]}))
    else:
        print(candidates[0].text)
        print(f"[best of {args.best_of}: reward {candidates[0].reward:.4f}; the others "
              f"{', '.join(f'{c.reward:.3f}' for c in candidates[1:])}]", file=sys.stderr)
    return 0
