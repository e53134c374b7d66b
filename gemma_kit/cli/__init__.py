"""`gemma-kit` command line: thin subcommands over the library.

Errors that gemma_kit raises on purpose are printed as one line (no traceback) with exit
status 2; anything else is a bug and keeps its traceback.

The commands of a larger family (post-training: distill, reward, dpo, rl, ...) live in their own
modules of this package, each with `add_parser(subparsers)`; `COMMAND_MODULES` lists them. Such a
module imports what its command needs inside the command, so `gemma-kit --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

# Modules of gemma_kit.cli that add subcommands (see the module docstring), in --help order.
COMMAND_MODULES: tuple[str, ...] = ()


def _dtype(name: str | None):
    if name is None:
        return None
    import jax.numpy as jnp

    choices = {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float32": jnp.float32,
               "f32": jnp.float32}
    if name not in choices:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; use bfloat16 or float32")
    return choices[name]


def _load(args):
    """(model, tokenizer) from --ckpt/--tokenizer/--preset, or the embedded default model."""
    from gemma_kit.embedded import default_model
    from gemma_kit.checkpoint.official import find_checkpoint, find_tokenizer
    from gemma_kit.errors import TokenizerError
    from gemma_kit.loading import load_model
    from gemma_kit.tokenizer import Tokenizer

    if args.ckpt is None:
        if args.tokenizer or args.preset:
            raise SystemExit("error: --tokenizer and --preset need --ckpt")
        return default_model(_dtype(args.dtype))
    find_checkpoint(args.ckpt)  # a missing checkpoint is the error to report, not its tokenizer
    tokenizer_path = args.tokenizer or find_tokenizer(args.ckpt)
    if tokenizer_path is None:
        raise TokenizerError(
            f"no tokenizer.model in or beside {args.ckpt!r}; pass --tokenizer FILE"
        )
    model = load_model(args.ckpt, args.preset, _dtype(args.dtype))
    return model, Tokenizer(tokenizer_path)


def cmd_convert(args) -> int:
    from gemma_kit.checkpoint.convert import convert_gguf

    if args.hf is not None:
        from gemma_kit.checkpoint.hf_import import convert_hf
        from gemma_kit.config import PRESETS

        out, config, info = convert_hf(args.hf, args.out, dtype=_dtype(args.dtype),
                                       overwrite=args.overwrite)
        if info["skipped_vision"]:
            print(f"note: skipped the {info['skipped_vision']} tensors of the vision tower; "
                  "gemma_kit converts the text model", file=sys.stderr)
        if info["tokenizer"] is None:
            print(f"note: no tokenizer.model in {args.hf}; pass --tokenizer when sampling",
                  file=sys.stderr)
        size = (f"preset {config.name}" if PRESETS.get(config.name) == config else
                "a custom size, not an official preset: load it with preset=Config(...)")
        print(f"wrote {out} (checkpoint/ in the official Orbax layout, {size})")
        return 0
    out = convert_gguf(args.gguf, args.out, dtype=_dtype(args.dtype), overwrite=args.overwrite)
    print(f"wrote {out} (checkpoint/ in the official Orbax layout, tokenizer.model)")
    return 0


def _bytes(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a plain number of bytes."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]I?)?B?\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a size; e.g. 5GB, 500MB")
    factor = {None: 1, "K": 10**3, "M": 10**6, "G": 10**9, "KI": 2**10, "MI": 2**20,
              "GI": 2**30}[match.group(2)]
    return int(float(match.group(1)) * factor)


def cmd_export(args) -> int:
    from gemma_kit.checkpoint.hf_export import export_hf
    from gemma_kit.errors import AdapterError

    if args.to == "peft":
        from gemma_kit.checkpoint.hf_peft import export_peft

        if args.lora is None or args.ckpt is not None:
            raise AdapterError(
                "--to peft converts a LoRA adapter alone: pass --lora ADAPTER (and --preset if "
                "the adapter does not name its base), not --ckpt; export the base separately "
                "with --to hf")
        out = export_peft(args.lora, args.out, preset=args.preset, dtype=_dtype(args.dtype),
                          overwrite=args.overwrite)
        print(f"wrote {out} (PEFT adapter_config.json + adapter_model.safetensors: apply it "
              "with peft's PeftModel.from_pretrained to the base exported with --to hf)")
        return 0
    if args.ckpt is None:
        from gemma_kit.embedded import ensure_default_model

        args.ckpt = ensure_default_model()
    source, tokenizer = args.ckpt, args.tokenizer
    if args.lora is not None:  # the adapter folded into the weights: a plain model
        from gemma_kit.checkpoint.official import find_tokenizer
        from gemma_kit.lora import merge
        from gemma_kit.loading import load_model

        source = merge(load_model(args.ckpt, args.preset, text_only=True, lora=args.lora))
        tokenizer = tokenizer or find_tokenizer(args.ckpt)
    out = export_hf(source, args.out, preset=args.preset, tokenizer=tokenizer,
                    dtype=_dtype(args.dtype), overwrite=args.overwrite,
                    max_shard_size=args.max_shard_size)
    print(f"wrote {out} (Hugging Face safetensors, config.json and tokenizer files: load it "
          "with transformers' from_pretrained)")
    return 0


def cmd_info(args) -> int:
    import numpy as np

    from gemma_kit.checkpoint import official

    folder = official.find_checkpoint(args.checkpoint)
    layout, shapes, vision = official.split_layout(official.read_metadata(folder))
    config = official.infer_preset(shapes) if args.preset is None else args.preset
    if isinstance(config, str):
        from gemma_kit.config import get_preset

        config = get_preset(config)
        official.check_shapes(config, shapes)
    leaves = official.flatten(shapes).values()
    info = {
        "checkpoint": str(folder),
        "layout": layout,
        "preset": config.name,
        "parameters": int(sum(int(np.prod(leaf.shape)) for leaf in leaves)),
        "dtypes": sorted({str(leaf.dtype) for leaf in leaves}),
        "vision_encoder": "present (loaded unless text_only=True)" if vision else "absent",
        "tokenizer": str(official.find_tokenizer(args.checkpoint) or "not found"),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            if key == "parameters":
                value = f"{value:,}"
            print(f"{key:<{width}}  {value}")
    return 0


def _sampling_args(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed,
                stop=args.stop or None)


def cmd_sample(args) -> int:
    from gemma_kit.sampler import Sampler
    from gemma_kit.sampling import SamplingParams

    # Check the settings before spending seconds on loading the model.
    SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p)
    _check_lora(args)
    _check_speculative(args)
    model, tokenizer = _load(args)
    sampler = Sampler(_with_lora(args, model), tokenizer)
    speculative = _speculative(args)
    if args.json:
        result = sampler.generate(args.prompt, **_sampling_args(args), speculative=speculative)
        print(json.dumps({"prompt": args.prompt, "text": result.text, "tokens": result.tokens,
                          "logprobs": result.logprobs, "finish_reason": result.finish_reason}))
        return 0
    for piece in sampler.stream(args.prompt, **_sampling_args(args), speculative=speculative):
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_chat(args) -> int:
    from gemma_kit.chat import ChatSession
    from gemma_kit.sampling import SamplingParams

    SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p)
    _check_lora(args)
    _check_speculative(args)
    model, tokenizer = _load(args)
    chat = ChatSession(_with_lora(args, model), tokenizer, system=args.system,
                       cache_length=args.cache_length, speculative=_speculative(args))
    sampling = _sampling_args(args)
    print(f"Chatting with {model.config.name} (/reset forgets the conversation, /exit or "
          "Ctrl-D leaves). The embedded 270M is a pretrained model, not a chat model: expect "
          "continuations rather than answers.", file=sys.stderr)
    while True:
        try:
            message = input("> ")
        except EOFError:
            print()
            return 0
        if message.strip() in ("/exit", "/quit"):
            return 0
        if message.strip() == "/reset":
            chat.reset()
            continue
        if not message.strip():
            continue
        try:
            for piece in chat.stream(message, **sampling):
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print(" [interrupted]", end="")
        print()
        if chat.dropped_turns:
            print(f"[{chat.dropped_turns} oldest exchange(s) dropped to fit the cache]",
                  file=sys.stderr)


def cmd_demo(args) -> int:
    from gemma_kit import demo

    demo.preflight(args.host, args.port, args.lora)  # before seconds of loading the model
    model, tokenizer = _load(args)
    lora = None
    if args.lora:
        model, lora = demo.load_lora(model, args.lora)
    demo.serve(model, tokenizer, args.host, args.port, lora=lora,
               cache_length=args.cache_length, concurrency=args.concurrency)
    return 0


def _check_lora(args) -> None:
    """A bad --lora folder is reported before seconds of loading the model."""
    if args.lora is not None:
        from gemma_kit.lora import read_adapter_config

        read_adapter_config(args.lora)


def _with_lora(args, model):
    """The model with the --lora adapter added (unmerged), if one was given, then with int8
    weights if --int8 asked for them."""
    if args.lora is not None:
        from gemma_kit.lora import load_adapter

        load_adapter(model, args.lora)
    if getattr(args, "int8", False):
        from gemma_kit.quant import quantize_model

        model = quantize_model(model, embedding=True)
    return model


def _check_speculative(args) -> None:
    """A missing --speculative draft checkpoint is reported before loading the model."""
    if args.speculative not in (None, "ngram"):
        from gemma_kit.checkpoint.official import find_checkpoint

        find_checkpoint(args.speculative)


def _speculative(args):
    """None, "ngram", or the draft model in the --speculative folder (in --dtype)."""
    if args.speculative in (None, "ngram"):
        return args.speculative
    from gemma_kit.loading import load_model

    return load_model(args.speculative, None, _dtype(args.dtype))


def _speculative_flag(p) -> None:
    p.add_argument("--speculative", default=None, metavar="ngram|DIR",
                   help="speculative decoding: 'ngram' drafts from the text so far (prompt "
                        "lookup), DIR a smaller draft model sharing the vocabulary; the output "
                        "is as without it (greedy: the same tokens)")


def _int8_flag(p) -> None:
    p.add_argument("--int8", action="store_true",
                   help="hold the weights as int8 with per-channel scales, the embedding too: "
                        "half the memory, logits within ~4%% of bf16's (on CPU, one-prompt "
                        "decoding is ~1.1x bf16's speed)")


def cmd_finetune(args) -> int:
    from gemma_kit.finetune.config import TrainConfig, parse_overrides

    config = TrainConfig.from_file(args.config) if args.config else TrainConfig()
    flags = dict(train_file=args.train_file, eval_file=args.eval_file, out_dir=args.out_dir,
                 base=args.base, method=args.method, steps=args.steps, epochs=args.epochs)
    changes = {k: v for k, v in flags.items() if v is not None}
    changes.update(parse_overrides(args.set or []))
    # A length given on the command line replaces the config file's, whichever kind it was.
    if "steps" in changes and "epochs" not in changes:
        changes["epochs"] = None
    if "epochs" in changes and "steps" not in changes:
        changes["steps"] = None
    config = config.with_overrides(changes).validate()

    from gemma_kit.finetune import train

    result = train(config, resume=args.resume)
    if result.interrupted:
        return 130
    before = "-" if result.eval_before is None else f"{result.eval_before:.4f}"
    after = "-" if result.eval_after is None else f"{result.eval_after:.4f}"
    print(f"trained {result.step} steps; held-out loss {before} -> {after}; wrote "
          f"{result.adapter or result.model_dir} (metrics and loss.png in {result.out_dir})")
    return 0


def cmd_merge(args) -> int:
    from gemma_kit.lora import merge_checkpoint

    out = merge_checkpoint(args.base, args.lora, args.out, preset=args.preset,
                           overwrite=args.overwrite)
    print(f"wrote {out} (checkpoint/ in the official Orbax layout with the adapter folded in, "
          "tokenizer.model)")
    return 0


def _model_args(p) -> None:
    p.add_argument("--ckpt", default=None, help="checkpoint folder (default: embedded model)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model (default: found beside --ckpt)")
    p.add_argument("--preset", default=None, help="model size (default: inferred from shapes)")
    p.add_argument("--dtype", default=None, help="weights dtype: bfloat16 or float32")


def _sampling_flags(p, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma-kit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a GGUF file or a Hugging Face folder into an "
                       "official Orbax checkpoint")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", help="the .gguf file (Gemma 3)")
    source.add_argument("--hf", help="a Hugging Face Gemma 2/3 folder (config.json + safetensors)")
    p.add_argument("--out", required=True, help="folder to create (checkpoint/ + tokenizer.model)")
    p.add_argument("--dtype", default=None,
                   help="bfloat16 or float32 (default: bfloat16 for GGUF, as stored for --hf)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face folder, or a LoRA "
                       "adapter as a PEFT adapter (safetensors)")
    p.add_argument("--to", required=True, choices=["hf", "peft"],
                   help="hf: a transformers/vLLM model folder; peft: a PEFT LoRA adapter")
    p.add_argument("--ckpt", default=None, help="checkpoint or model folder (default: embedded)")
    p.add_argument("--lora", default=None, help="a gemma_kit LoRA adapter folder: merged into "
                   "the weights with --to hf, converted alone with --to peft")
    p.add_argument("--out", required=True, help="folder to create")
    p.add_argument("--preset", default=None, help="model size (default: inferred from shapes)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model (default: beside --ckpt)")
    p.add_argument("--dtype", default=None, help="bfloat16 or float32 (default: as stored)")
    p.add_argument("--max-shard-size", type=_bytes, default="5GB",
                   help="split the weights into files of at most this size (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("info", help="describe a checkpoint: preset, size, dtypes, layout")
    p.add_argument("checkpoint")
    p.add_argument("--preset", default=None, help="check against this preset instead of inferring")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_info)

    p = sub.add_parser("sample", help="complete a prompt (default: the embedded Gemma 3 270M)")
    p.add_argument("--prompt", required=True)
    _model_args(p)
    _sampling_flags(p, max_new_tokens=64)
    p.add_argument("--json", action="store_true", help="print one JSON object with tokens and logprobs")
    p.add_argument("--lora", default=None, help="a LoRA adapter folder to add (unmerged)")
    _int8_flag(p)
    _speculative_flag(p)
    p.set_defaults(run=cmd_sample)

    p = sub.add_parser("chat", help="multi-turn chat in the terminal (streamed replies)")
    _model_args(p)
    _sampling_flags(p, max_new_tokens=256)
    p.add_argument("--system", default=None, help="system prompt (folded into the first turn)")
    p.add_argument("--cache-length", type=int, default=4096, help="tokens the chat can hold")
    p.add_argument("--lora", default=None, help="a LoRA adapter folder to add (unmerged)")
    _int8_flag(p)
    _speculative_flag(p)
    p.set_defaults(run=cmd_chat)

    p = sub.add_parser("demo", help="chat page in the browser (Gradio; pip install "
                       "'gemma-kit[demo]')")
    _model_args(p)
    p.add_argument("--lora", default=None, help="a LoRA adapter folder to apply to the model")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--cache-length", type=int, default=4096,
                   help="tokens each conversation can hold")
    p.add_argument("--concurrency", type=int, default=8, help="replies generated at once")
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("finetune", help="fine-tune on JSONL data: LoRA, QLoRA or full "
                       "(pip install 'gemma-kit[finetune]'; see finetune/README.md)")
    p.add_argument("--config", default=None, help="a .toml or .json file of settings")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out-dir from its latest checkpoint")
    p.add_argument("--train-file", default=None, help="JSONL examples")
    p.add_argument("--eval-file", default=None, help="held-out JSONL (default: a split)")
    p.add_argument("--out-dir", default=None, help="folder for checkpoints and results")
    p.add_argument("--base", default=None, help="checkpoint folder, or 'default' (embedded 270M)")
    p.add_argument("--method", default=None, choices=["lora", "qlora", "full"])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any other setting, e.g. --set learning_rate=1e-4 (repeatable)")
    p.set_defaults(run=cmd_finetune)

    p = sub.add_parser("merge", help="fold a LoRA adapter into its base: a full checkpoint in "
                       "the official layout")
    p.add_argument("--base", required=True, help="the base checkpoint (or model) folder")
    p.add_argument("--lora", required=True, help="the adapter folder (OUT_DIR/adapter)")
    p.add_argument("--out", required=True, help="folder to create (checkpoint/ + tokenizer.model)")
    p.add_argument("--preset", default=None, help="model size (default: inferred from shapes)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier merge")
    p.set_defaults(run=cmd_merge)

    for name in COMMAND_MODULES:
        importlib.import_module(f"gemma_kit.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from gemma_kit.errors import GemmaKitError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (GemmaKitError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
