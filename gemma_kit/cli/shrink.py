"""`gemma-kit shrink`: a smaller student that keeps a subset of a model's layers."""

from __future__ import annotations


def cmd_shrink(args) -> int:
    from gemma_kit.checkpoint.shrink import shrink_checkpoint

    ckpt = args.ckpt
    if ckpt is None:
        from gemma_kit.embedded import ensure_default_model

        ckpt = ensure_default_model()
    out, student, teacher = shrink_checkpoint(
        ckpt, args.keep_layers, args.out, tokenizer=args.tokenizer, overwrite=args.overwrite
    )
    print(
        f"wrote {out}: {student.num_layers} of {teacher.num_layers} layers of {teacher.name} "
        f"({student.name}; config stored with the checkpoint, so load_model, sample, "
        "finetune, distill and export read it)"
    )
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "shrink",
        help="make a smaller student: keep a subset of a "
        "model's layers (each keeps its attention kind)",
    )
    p.add_argument(
        "--ckpt",
        default=None,
        metavar="DIR",
        help="the teacher's checkpoint or model folder (default: the embedded Gemma 3 270M)",
    )
    p.add_argument(
        "--keep-layers",
        required=True,
        metavar="LIST",
        help="layers to keep, in increasing order: numbers and ranges, e.g. 0,2,4-8",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="folder to create (checkpoint/ with the stored config + tokenizer.model)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="FILE",
        help="tokenizer.model to copy (default: the one in or beside --ckpt)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier model folder at --out (never other files)",
    )
    p.set_defaults(run=cmd_shrink)
