"""The command-line plumbing every training command shares (finetune, distill, dpo, rl, ...).

A training command reads its settings from a config file (--config FILE, TOML or JSON), then
applies the common flags and any `--set key=value`, validates them, runs, and reports:

    def add_parser(subparsers):
        p = subparsers.add_parser("distill", help="...")
        add_training_arguments(p)
        p.add_argument("--teacher", default=None, help="...")     # a flag of its own
        p.set_defaults(run=cmd_distill)

    def cmd_distill(args) -> int:
        from gemma_kit.posttrain.config import DistillConfig     # inside: --help stays fast

        config = config_from_args(args, DistillConfig, extra_flags=("teacher",))
        ...
        return report(result)
"""

from __future__ import annotations

import argparse

from gemma_kit.cli.options import positive_int, positive_number

# Flags every training command has, by the TrainConfig field they set.
COMMON_FLAGS = ("train_file", "eval_file", "out_dir", "base", "method", "steps", "epochs")


def add_training_arguments(
    parser: argparse.ArgumentParser, *, train_file_help: str = "JSONL training examples"
) -> None:
    """--config, --resume, the common setting flags and --set KEY=VALUE."""
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="a .toml or .json file of settings (default: the built-in defaults)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out-dir from its latest checkpoint",
    )
    parser.add_argument(
        "--train-file",
        default=None,
        metavar="FILE",
        help=f"{train_file_help} (default: the config's)",
    )
    parser.add_argument(
        "--eval-file",
        default=None,
        metavar="FILE",
        help="held-out JSONL examples (default: a split of the training file)",
    )
    parser.add_argument(
        "--out-dir",
        default=None,
        metavar="DIR",
        help="folder for checkpoints, metrics and the result (default: the config's)",
    )
    parser.add_argument(
        "--base",
        default=None,
        metavar="DIR",
        help="checkpoint folder to train, or 'default' for the embedded 270M "
        "(default: the config's)",
    )
    parser.add_argument(
        "--method",
        default=None,
        choices=["lora", "qlora", "full"],
        help="what is trained (default: the config's, else lora)",
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        metavar="N",
        help="optimizer steps to run, replacing the config's steps or epochs "
        "(default: the config's)",
    )
    parser.add_argument(
        "--epochs",
        type=positive_number,
        default=None,
        metavar="E",
        help="passes over the training data, replacing the config's steps or "
        "epochs (default: the config's)",
    )
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="any other setting, e.g. --set learning_rate=1e-4 (repeatable; "
        "default: the config's settings)",
    )


def config_from_args(
    args: argparse.Namespace, config_class=None, *, extra_flags: tuple[str, ...] = ()
):
    """The validated config: config_class (TrainConfig or a subclass) from --config (or its
    defaults), then the flags that were given (COMMON_FLAGS and the command's extra_flags, each
    the name of a field), then --set. Unknown names and bad values raise ConfigError."""
    if config_class is None:
        from gemma_kit.training.config import TrainConfig as config_class
    from gemma_kit.training.config import parse_overrides

    config = config_class.from_file(args.config) if args.config else config_class()
    flags = {name: getattr(args, name, None) for name in COMMON_FLAGS + tuple(extra_flags)}
    changes = {k: v for k, v in flags.items() if v is not None}
    changes.update(parse_overrides(args.set or []))
    # A length given on the command line replaces the config file's, whichever kind it was.
    if "steps" in changes and "epochs" not in changes:
        changes["epochs"] = None
    if "epochs" in changes and "steps" not in changes:
        changes["steps"] = None
    return config.with_overrides(changes).validate()


def report(result, *, what: str = "held-out loss") -> int:
    """Prints one line about a finished run; the exit status (130 when it was interrupted)."""
    if result.interrupted:
        return 130
    before = "-" if result.eval_before is None else f"{result.eval_before:.4f}"
    after = "-" if result.eval_after is None else f"{result.eval_after:.4f}"
    print(
        f"trained {result.step} steps; {what} {before} -> {after}; wrote "
        f"{result.adapter or result.model_dir} (metrics and loss.png in {result.out_dir})"
    )
    return 0
