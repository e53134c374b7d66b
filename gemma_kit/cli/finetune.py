"""`gemma-kit finetune`: supervised fine-tuning (LoRA, QLoRA, full) from JSONL data."""

from __future__ import annotations

from gemma_kit.cli.training import add_training_arguments, config_from_args, report


def cmd_finetune(args) -> int:
    config = config_from_args(args)

    from gemma_kit.finetune import train

    return report(train(config, resume=args.resume))


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune on JSONL data: LoRA, QLoRA or full "
        "(pip install 'gemma-kit[finetune]'; see docs/fine-tuning.md)",
    )
    add_training_arguments(p)
    p.set_defaults(run=cmd_finetune)
