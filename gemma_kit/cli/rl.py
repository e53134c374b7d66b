"""`gemma-kit rl`: REINFORCE / RLOO with a KL penalty, BOND and J-BOND, from a config file.

    gemma-kit rl --config posttrain/configs/rl_rloo.toml [--resume] [--set algo=jbond ...]

The settings are gemma_kit.posttrain.rl_config.RLConfig's; see docs/post-training-rl.md.
"""

from __future__ import annotations

from gemma_kit.cli.training import add_training_arguments, config_from_args, report


def cmd_rl(args) -> int:
    from gemma_kit.posttrain.rl import train_rl
    from gemma_kit.posttrain.rl_config import RLConfig

    config = config_from_args(args, RLConfig, extra_flags=("prompts_file", "reward", "algo"))
    return report(train_rl(config, resume=args.resume), what="held-out reward")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "rl",
        help="policy optimisation against a reward: RLOO / REINFORCE with a KL penalty "
        "(fixed or EMA anchor), BOND, J-BOND (pip install 'gemma-kit[finetune]'; see "
        "docs/post-training-rl.md)",
    )
    add_training_arguments(p, train_file_help="unused by rl (prompts come from --prompts-file)")
    p.add_argument(
        "--prompts-file",
        default=None,
        metavar="FILE",
        help='JSONL prompts, {"prompt": ...} or {"messages": [...]} per line '
        "(default: the config's)",
    )
    p.add_argument(
        "--reward",
        default=None,
        metavar="SPEC",
        help="'pkg.module:function' or 'rm:DIR' (a reward model) (default: the config's)",
    )
    p.add_argument(
        "--algo",
        default=None,
        choices=["rloo", "reinforce", "bond", "jbond"],
        help="the objective (default: the config's, else rloo)",
    )
    p.set_defaults(run=cmd_rl)
