"""`gemma-kit warp`: WARP, M RL runs with EMA anchors, SLERP of their task vectors, LITI towards
the initialisation as a reward-KL front, iterated.

    gemma-kit warp --config posttrain/configs/warp_lite.toml [--resume] [--set num_runs=3 ...]

The settings are gemma_kit.posttrain.warp.WARPConfig's (an RL config plus the WARP fields); see
docs/post-training-rl.md.
"""

from __future__ import annotations

from gemma_kit.cli.training import add_training_arguments, config_from_args


def cmd_warp(args) -> int:
    from gemma_kit.posttrain.warp import WARPConfig, run_warp

    config = config_from_args(args, WARPConfig, extra_flags=("prompts_file", "reward"))
    result = run_warp(config, resume=args.resume)
    for i, point in enumerate(result.chosen, start=1):
        print(
            f"iteration {i}: SLERP + LITI eta {point['eta']:g}: held-out reward "
            f"{point['reward']:.4f}, KL {point['kl']:.4f} nats"
        )
    print(
        f"wrote {result.adapter or result.model_dir} (front.json and front.png in {result.out_dir})"
    )
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "warp",
        help="WARP: several RL runs with EMA anchors, merged by SLERP, LITI towards "
        "the initialisation (pip install 'gemma-kit[finetune]'; see docs/post-training-rl.md)",
    )
    add_training_arguments(p, train_file_help="unused by warp (prompts come from --prompts-file)")
    p.add_argument(
        "--prompts-file",
        default=None,
        metavar="FILE",
        help="JSONL prompts of the RL runs (default: the config's)",
    )
    p.add_argument(
        "--reward",
        default=None,
        metavar="SPEC",
        help="'pkg.module:function' or 'rm:DIR' (default: the config's)",
    )
    p.set_defaults(run=cmd_warp)
