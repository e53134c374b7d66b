"""`gemma-kit dpo`: DPO / IPO on preference pairs (gemma_kit.posttrain.dpo).

gemma-kit dpo --config FILE [--resume] [--set beta=0.1] [--set loss_type=ipo]
"""

from __future__ import annotations

from gemma_kit.cli.training import add_training_arguments, config_from_args, report


def cmd_dpo(args) -> int:
    from gemma_kit.posttrain.dpo import DPOConfig, train_dpo

    config = config_from_args(args, DPOConfig)
    return report(train_dpo(config, resume=args.resume), what="held-out DPO loss")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "dpo",
        help="DPO / IPO on preference pairs: LoRA or full "
        "(pip install 'gemma-kit[finetune]'; see "
        "docs/post-training-preferences.md)",
    )
    add_training_arguments(
        p, train_file_help='JSONL preference pairs {"prompt", "chosen", "rejected"}'
    )
    p.set_defaults(run=cmd_dpo)
