"""`gemma-kit distill`: knowledge distillation (GKD) from a teacher into a student, from a
TOML/JSON config, with the outputs of `gemma-kit finetune` (see docs/post-training-distill.md).
"""

from __future__ import annotations

from gemma_kit.cli.training import add_training_arguments, config_from_args, report


def cmd_distill(args) -> int:
    from gemma_kit.posttrain.distill_config import DistillConfig

    config = config_from_args(
        args, DistillConfig, extra_flags=("teacher", "teacher_prefix", "prompts_file")
    )
    if args.write_targets:
        from gemma_kit.posttrain.distill import write_topk_targets

        path = write_topk_targets(config)
        print(
            f"wrote the sampled top-{config.topk} teacher targets to {path}; train from them "
            "with the same config (topk_targets names that file)"
        )
        return 0
    from gemma_kit.posttrain.distill import train_distill

    result = train_distill(config, resume=args.resume)
    return report(result, what=_what(result.evaluations))


def _what(evaluations: dict) -> str:
    """The name of the held-out metric the run reported (its objective's eval_key)."""
    measured = evaluations.get("before") or evaluations.get("after") or {}
    if "eval_reverse_kl" in measured:
        return "held-out KL(student || teacher) on student samples"
    if "eval_data_forward_kl" in measured:
        return "held-out KL(teacher || student) on dataset rows"
    return "held-out divergence (none measured: no held-out prompts or rows)"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "distill",
        help="distil a teacher into a student (GKD: forward/"
        "reverse KL, JSD, sampled top-K, on-policy; pip install "
        "'gemma-kit[finetune]'; see docs/post-training-distill.md)",
    )
    add_training_arguments(
        p, train_file_help="JSONL examples whose outputs the off-policy steps distil on"
    )
    p.add_argument(
        "--teacher",
        default=None,
        metavar="DIR",
        help="the teacher: a checkpoint folder, 'default' (the embedded 270M) or "
        "'base' (the student's own base model) (default: the config's)",
    )
    p.add_argument(
        "--teacher-prefix",
        default=None,
        metavar="TEXT",
        help="text the teacher sees before every prompt and the student does not "
        "(context distillation) (default: the config's, else none)",
    )
    p.add_argument(
        "--prompts-file",
        default=None,
        metavar="FILE",
        help='JSONL prompts ({"prompt"} or {"messages"}) for on-policy and '
        "teacher samples (default: the config's)",
    )
    p.add_argument(
        "--write-targets",
        action="store_true",
        help="only write the offline sampled top-K teacher targets (the file "
        "topk_targets names) and stop (default: train)",
    )
    p.set_defaults(run=cmd_distill)
