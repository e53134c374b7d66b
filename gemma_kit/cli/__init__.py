"""`gemma-kit` command line: thin subcommands over the library.

Errors that gemma_kit raises on purpose, and option values the parser refuses, are printed as
one line (no traceback) with exit status 2; anything else is a bug and keeps its traceback.
Option values that can be checked without the model (numbers out of range, an empty prompt, an
unknown dtype) are checked while parsing, before seconds of loading.

The commands of a larger family (post-training: distill, reward, dpo, rl, ...) live in their own
modules of this package, each with `add_parser(subparsers)`; `COMMAND_MODULES` lists them. Such a
module imports what its command needs inside the command, so `gemma-kit --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import sys

from gemma_kit.chat import CHAT_SAMPLING
from gemma_kit.cli.options import (
    dtype_option,
    fraction_option,
    min_p_option,
    non_negative_number,
    port_option,
    positive_int,
    size_option,
    text_option,
    top_p_option,
)
from gemma_kit.errors import ConfigError, GemmaKitError

# Modules of gemma_kit.cli that add subcommands (see the module docstring), in --help order.
COMMAND_MODULES: tuple[str, ...] = ("finetune", "reward", "dpo", "distill", "shrink", "rl", "warp")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, like every other gemma-kit error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _dtype(name: str | None):
    """A canonical dtype name from dtype_option (or None) -> the jax dtype (or None)."""
    if name is None:
        return None
    import jax.numpy as jnp

    return jnp.dtype(name)


# -- commands --------------------------------------------------------------------------------


def _load(args):
    """(model, tokenizer) from --ckpt/--tokenizer/--preset, or the embedded default model.

    Everything that can be wrong with the options is reported before the weights are read.
    """
    from gemma_kit.checkpoint.official import find_checkpoint, find_tokenizer
    from gemma_kit.config import get_preset
    from gemma_kit.embedded import default_model
    from gemma_kit.errors import TokenizerError
    from gemma_kit.loading import load_model
    from gemma_kit.tokenizer import Tokenizer

    if args.ckpt is None:
        if args.tokenizer or args.preset:
            raise ConfigError(
                "--tokenizer and --preset describe a checkpoint given with --ckpt; without "
                "--ckpt the embedded Gemma 3 270M is used, which needs neither"
            )
        return default_model(_dtype(args.dtype))
    preset = get_preset(args.preset) if args.preset is not None else None
    find_checkpoint(args.ckpt)  # a missing checkpoint is the error to report, not its tokenizer
    tokenizer_path = args.tokenizer or find_tokenizer(args.ckpt)
    if tokenizer_path is None:
        raise TokenizerError(
            f"no tokenizer.model in or beside {args.ckpt!r}; pass --tokenizer FILE"
        )
    tokenizer = Tokenizer(tokenizer_path)  # a bad tokenizer file, before the weights are read
    return load_model(args.ckpt, preset, _dtype(args.dtype)), tokenizer


def cmd_convert(args) -> int:
    from gemma_kit.checkpoint.convert import convert_gguf

    if args.hf is not None:
        from gemma_kit.checkpoint.hf_import import convert_hf
        from gemma_kit.config import PRESETS

        out, config, info = convert_hf(
            args.hf, args.out, dtype=_dtype(args.dtype), overwrite=args.overwrite
        )
        if info["tokenizer"] is None:
            print(
                f"note: no tokenizer.model in {args.hf}; pass --tokenizer when sampling",
                file=sys.stderr,
            )
        size = (
            f"preset {config.name}"
            if PRESETS.get(config.name) == config
            else "a custom size, not an official preset: its config is stored with it"
        )
        print(f"wrote {out} (checkpoint/ in the official Orbax layout, {size})")
        return 0
    out = convert_gguf(args.gguf, args.out, dtype=_dtype(args.dtype), overwrite=args.overwrite)
    print(f"wrote {out} (checkpoint/ in the official Orbax layout, tokenizer.model)")
    return 0


def cmd_export(args) -> int:
    from gemma_kit.checkpoint.hf_export import check_export_target, export_hf
    from gemma_kit.errors import AdapterError

    if args.to == "peft":
        from gemma_kit.checkpoint.hf_peft import export_peft

        if args.lora is None or args.ckpt is not None:
            raise AdapterError(
                "--to peft converts a LoRA adapter alone: pass --lora ADAPTER (and --preset if "
                "the adapter does not name its base), not --ckpt; export the base separately "
                "with --to hf"
            )
        out = export_peft(
            args.lora,
            args.out,
            preset=args.preset,
            dtype=_dtype(args.dtype),
            overwrite=args.overwrite,
        )
        print(
            f"wrote {out} (PEFT adapter_config.json + adapter_model.safetensors: apply it "
            "with peft's PeftModel.from_pretrained to the base exported with --to hf)"
        )
        return 0
    check_export_target(args.out, args.overwrite)  # before any loading or merging
    if args.ckpt is None:
        from gemma_kit.embedded import ensure_default_model

        args.ckpt = ensure_default_model()
    source, tokenizer = args.ckpt, args.tokenizer
    if args.lora is not None:  # the adapter folded into the weights: a plain model
        from gemma_kit.checkpoint.official import find_tokenizer
        from gemma_kit.loading import load_model
        from gemma_kit.lora import merge

        source = merge(load_model(args.ckpt, args.preset, text_only=True, lora=args.lora))
        tokenizer = tokenizer or find_tokenizer(args.ckpt)
    out = export_hf(
        source,
        args.out,
        preset=args.preset,
        tokenizer=tokenizer,
        dtype=_dtype(args.dtype),
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
    )
    print(
        f"wrote {out} (Hugging Face safetensors, config.json and tokenizer files: load it "
        "with transformers' from_pretrained)"
    )
    return 0


def cmd_info(args) -> int:
    import numpy as np

    from gemma_kit.checkpoint import official
    from gemma_kit.config import is_preset

    folder = official.find_checkpoint(args.checkpoint)
    layout, shapes, vision = official.split_layout(official.read_metadata(folder))
    config = official.checkpoint_config(folder, shapes, args.preset)
    leaves = official.flatten(shapes).values()
    info = {
        "checkpoint": str(folder),
        "layout": layout,
        "preset": config.name
        if is_preset(config)
        else f"none: {config.name}, config stored in {official.CONFIG_FILE}",
        "layers": " ".join("G" if not kind.is_local else "L" for kind in config.layers),
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
    from gemma_kit.sampling import DryPenalty

    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.seed,
        stop=args.stop or None,
        dry=DryPenalty(args.dry) if args.dry else None,
    )


def _model_kind(args) -> str | None:
    """What is known of the model: "pretrained", "instruction-tuned", "fine-tuned" (a LoRA
    adapter, trained on conversations as a rule) or None (its checkpoint's name does not say;
    see gemma_kit.chat.instruction_tuned). The embedded 270M is pretrained."""
    if getattr(args, "lora", None):
        return "fine-tuned"
    from gemma_kit.chat import instruction_tuned
    from gemma_kit.embedded import default_model_dir

    tuned = instruction_tuned(args.ckpt or default_model_dir())
    return None if tuned is None else "instruction-tuned" if tuned else "pretrained"


# `gemma-kit chat`'s commands, typed instead of a message.
CHAT_COMMANDS = {
    "/help": "list these commands",
    "/reset": "forget the conversation (the system prompt stays)",
    "/undo": "forget the last exchange",
    "/exit": "leave (also /quit or Ctrl-D; Ctrl-C stops a reply)",
}


def cmd_sample(args) -> int:
    from gemma_kit.sampler import GenerationResult, Sampler

    _check_lora(args)
    reward = None
    if args.best_of is not None or args.reward is not None:
        from gemma_kit.cli.reward import best_of_reward, print_best_of

        if args.speculative is not None:
            raise ConfigError(
                "--speculative decodes one completion; it does not go with "
                "--best-of, which draws N of them in one batch"
            )
        reward = best_of_reward(args)  # a bad --reward fails before the model loads
    _check_speculative(args)
    model, tokenizer = _load(args)
    sampler = Sampler(_with_lora(args, model), tokenizer)
    if reward is not None:
        return print_best_of(sampler, reward, args, _sampling_args(args))
    speculative = _speculative(args)
    if args.json:
        result = sampler.generate(args.prompt, **_sampling_args(args), speculative=speculative)
        assert isinstance(result, GenerationResult)  # one prompt string gives one result
        print(
            json.dumps(
                {
                    "prompt": args.prompt,
                    "text": result.text,
                    "tokens": result.tokens,
                    "logprobs": result.logprobs,
                    "finish_reason": result.finish_reason,
                }
            )
        )
        return 0
    for piece in sampler.stream(args.prompt, **_sampling_args(args), speculative=speculative):
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_chat(args) -> int:
    from gemma_kit.chat import ChatSession

    _check_lora(args)
    _check_speculative(args)
    if args.dry is None:  # speculative decoding does not apply the DRY penalty
        args.dry = 0.0 if args.speculative else CHAT_SAMPLING["dry"].multiplier
    elif args.dry and args.speculative:
        raise ConfigError(
            "--speculative does not apply the DRY penalty: leave --dry out or set it to 0"
        )
    model, tokenizer = _load(args)
    chat = ChatSession(
        _with_lora(args, model),
        tokenizer,
        system=args.system,
        cache_length=args.cache_length,
        speculative=_speculative(args),
    )
    sampling = _sampling_args(args)
    name = model.config.name
    print(
        f"Chatting with {name} (/help lists the commands, /exit or Ctrl-D leaves).", file=sys.stderr
    )
    if _model_kind(args) == "pretrained":
        print(
            f"Note: {name} is a pretrained model, not a chat model: its replies wander. It "
            'continues text well: try `gemma-kit sample --prompt "Once upon a time"`, or '
            "`gemma-kit demo`, which offers it as text completion.",
            file=sys.stderr,
        )
    while True:
        try:
            message = input("> ")
        except EOFError:
            print()
            return 0
        command = message.strip()
        if command in ("/exit", "/quit"):
            return 0
        if command == "/help":
            width = max(map(len, CHAT_COMMANDS))
            for cmd, what in CHAT_COMMANDS.items():
                print(f"  {cmd:<{width}}  {what}", file=sys.stderr)
            continue
        if command == "/reset":
            chat.reset()
            print("[conversation cleared]", file=sys.stderr)
            continue
        if command == "/undo":
            undone = chat.undo()
            print(
                "[nothing to undo]" if undone is None else "[the last exchange is forgotten]",
                file=sys.stderr,
            )
            continue
        if command.startswith("/") and " " not in command:
            print(f"[unknown command {command}: /help lists the commands]", file=sys.stderr)
            continue
        if not command:
            continue
        try:
            for piece in chat.stream(message, **sampling):
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print(" [interrupted]", end="")
        print()
        if chat.dropped_turns:
            print(
                f"[{chat.dropped_turns} oldest exchange(s) dropped to fit the cache]",
                file=sys.stderr,
            )


def cmd_demo(args) -> int:
    from gemma_kit import demo

    demo.preflight(args.host, args.port, args.lora)  # before seconds of loading the model
    model, tokenizer = _load(args)
    lora = None
    if args.lora:
        model, lora = demo.load_lora(model, args.lora)
    model = quantized(model, args)
    kind = _model_kind(args)
    mode = args.mode or ("completion" if kind == "pretrained" else "chat")
    demo.serve(
        model,
        tokenizer,
        args.host,
        args.port,
        lora=lora,
        mode=mode,
        kind=kind,
        cache_length=args.cache_length,
        concurrency=args.concurrency,
    )
    return 0


def _check_lora(args) -> None:
    """A bad --lora folder is reported before seconds of loading the model."""
    if args.lora is not None:
        from gemma_kit.checkpoint.adapter import read_adapter_config

        read_adapter_config(args.lora)


def _with_lora(args, model):
    """The model with the --lora adapter added (unmerged), if one was given, then with int8
    or int4 weights if --int8 or --int4 asked for them."""
    if args.lora is not None:
        from gemma_kit.lora import load_adapter

        load_adapter(model, args.lora)
    return quantized(model, args)


def quantized(model, args):
    """The model with the weights --int8 or --int4 asked for (else as it is): --int8 every
    weight int8; --int4 the layers int4 and the tied embedding table int8, the split llama.cpp's
    Q4_0 files use (on the 270M half the KL to bf16 of an int4 table, and faster on the AMD
    EPYC host; docs/speed.md)."""
    bits = 8 if getattr(args, "int8", False) else 4 if getattr(args, "int4", False) else None
    if bits:
        from gemma_kit.quant import quantize_model

        model = quantize_model(model, embedding=True, bits=bits, embedding_bits=8)
    return model


def _quant_flags(p) -> None:  # --int8 | --int4
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--int8",
        action="store_true",
        help="hold the weights as int8 with per-channel scales, the embedding "
        "too: half the memory, logits within ~4%% of bf16's (default: the "
        "stored dtype)",
    )
    group.add_argument(
        "--int4",
        action="store_true",
        help="hold the layers' weights as int4 (groups of 32, a scale and minimum "
        "each) and the embedding as int8, as llama.cpp's Q4_0 files do: 43%% of "
        "bf16's memory on the 270M, with a visible loss of quality on small "
        "models, docs/speed.md (default: the stored dtype)",
    )


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
    p.add_argument(
        "--speculative",
        default=None,
        metavar="ngram|DIR",
        help="speculative decoding: 'ngram' drafts from the text so far (prompt "
        "lookup), DIR a smaller draft model sharing the vocabulary; the output "
        "is as without it (greedy: the same tokens; default: plain decoding)",
    )


def cmd_merge(args) -> int:
    from gemma_kit.posttrain.merge_models import merge_models

    runs = args.lora or args.model
    out = merge_models(
        args.base,
        runs,
        args.out,
        method=args.method,
        lam=args.lam,
        eta=args.eta,
        preset=args.preset,
        overwrite=args.overwrite,
    )
    what = (
        "the adapter folded in"
        if args.method == "lora"
        else f"{args.method} of {len(runs)} run(s)"
        + (f", LITI eta {args.eta:g}" if args.eta != 1.0 else "")
    )
    print(f"wrote {out} (checkpoint/ in the official Orbax layout with {what}, tokenizer.model)")
    return 0


def _model_args(p) -> None:
    p.add_argument(
        "--ckpt",
        default=None,
        metavar="DIR",
        help="checkpoint or model folder: official Orbax, or Hugging Face "
        "safetensors (default: the embedded Gemma 3 270M)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="FILE",
        help="tokenizer.model (default: the one in or beside --ckpt)",
    )
    p.add_argument(
        "--preset",
        default=None,
        metavar="NAME",
        help="model size, e.g. gemma3-1b, checked against the weights (default: "
        "inferred from their shapes); needs --ckpt",
    )
    p.add_argument(
        "--dtype",
        default=None,
        type=dtype_option,
        metavar="DTYPE",
        help="hold the weights as bfloat16 (bf16) or float32 (f32) (default: as "
        "stored; the embedded model is bfloat16)",
    )


def _sampling_flags(p, max_new_tokens: int, chat: bool = False) -> None:
    """The sampling options; chat=True: defaults of Gemma's recommended sampling with the DRY
    penalty (gemma_kit.chat.CHAT_SAMPLING), else greedy decoding."""
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=max_new_tokens,
        metavar="N",
        help=f"stop after N new tokens (default {max_new_tokens})",
    )
    if chat:
        t, k, top_p = (CHAT_SAMPLING[n] for n in ("temperature", "top_k", "top_p"))
        p.add_argument(
            "--temperature",
            type=non_negative_number,
            default=t,
            metavar="T",
            help=f"sampling temperature; 0 picks the most likely token (default {t}, "
            "Gemma's recommended setting)",
        )
        p.add_argument(
            "--top-k",
            type=positive_int,
            default=k,
            metavar="K",
            help=f"sample among the K most likely tokens only (default {k})",
        )
        p.add_argument(
            "--top-p",
            type=top_p_option,
            default=top_p,
            metavar="P",
            help="sample among the most likely tokens whose probabilities add up to "
            f"P, in (0, 1]; 1 is no limit (default {top_p})",
        )
        dry = CHAT_SAMPLING["dry"].multiplier
        p.add_argument(
            "--dry",
            type=non_negative_number,
            default=None,
            metavar="D",
            help="strength of the DRY repetition penalty, which makes going on with "
            "a stretch already written less likely with every repeated token "
            f"(it breaks loops); 0 switches it off (default {dry}; 0 with "
            "--speculative, which does not apply it)",
        )
    else:
        p.add_argument(
            "--temperature",
            type=non_negative_number,
            default=0.0,
            metavar="T",
            help="sampling temperature; 0 picks the most likely token (default 0)",
        )
        p.add_argument(
            "--top-k",
            type=positive_int,
            default=None,
            metavar="K",
            help="sample among the K most likely tokens only (default: no limit)",
        )
        p.add_argument(
            "--top-p",
            type=top_p_option,
            default=None,
            metavar="P",
            help="sample among the most likely tokens whose probabilities add up to "
            "P, in (0, 1] (default: no limit)",
        )
        p.add_argument(
            "--dry",
            type=non_negative_number,
            default=0.0,
            metavar="D",
            help="strength of the DRY repetition penalty, which makes going on with "
            "a stretch already written less likely with every repeated token "
            "(it breaks loops; 0.8 is the usual strength); 0 is off (default 0)",
        )
    p.add_argument(
        "--min-p",
        type=min_p_option,
        default=None,
        metavar="M",
        help="drop tokens less likely than M times the most likely one, in [0, 1] "
        "(default: none dropped)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random seed of the sampling; the same seed gives the same text (default 0)",
    )
    p.add_argument(
        "--stop",
        action="append",
        type=text_option,
        metavar="TEXT",
        help="stop when the text contains TEXT (repeatable; default: stop at the "
        "end-of-turn token only)",
    )


def _lora_flag(p, help_text: str) -> None:
    p.add_argument("--lora", default=None, metavar="ADAPTER", help=help_text)


def _version() -> str:
    """gemma-kit's version and the versions of what it runs on, read without importing them."""

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return (
        f"gemma-kit {version('gemma-kit')} (jax {version('jax')}, flax {version('flax')}, "
        f"Python {sys.version.split()[0]})"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gemma-kit", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--version",
        action="version",
        version=_version(),
        help="print gemma-kit's version (and jax's, flax's) and exit",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "convert",
        help="convert a GGUF file or a Hugging Face folder into an official Orbax checkpoint",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", metavar="FILE", help="a Gemma 3 .gguf file (llama.cpp)")
    source.add_argument(
        "--hf", metavar="DIR", help="a Hugging Face Gemma 2/3 folder (config.json + safetensors)"
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="folder to create (checkpoint/ + tokenizer.model)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        type=dtype_option,
        metavar="DTYPE",
        help="bfloat16 (bf16) or float32 (f32) (default: bfloat16 for --gguf, as stored for --hf)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier model folder at --out (never other files)",
    )
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser(
        "export",
        help="write a checkpoint as a Hugging Face folder, or a LoRA "
        "adapter as a PEFT adapter (safetensors)",
    )
    p.add_argument(
        "--to",
        required=True,
        choices=["hf", "peft"],
        help="hf: a transformers/vLLM model folder; peft: a PEFT LoRA adapter",
    )
    p.add_argument(
        "--ckpt",
        default=None,
        metavar="DIR",
        help="checkpoint or model folder (default: the embedded Gemma 3 270M)",
    )
    _lora_flag(
        p,
        "a gemma_kit LoRA adapter folder: merged into the weights with --to hf, "
        "converted alone with --to peft (default: none)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder to create")
    p.add_argument(
        "--preset",
        default=None,
        metavar="NAME",
        help="model size (default: inferred from the shapes, or the base the adapter names)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="FILE",
        help="tokenizer.model (default: the one in or beside --ckpt)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        type=dtype_option,
        metavar="DTYPE",
        help="bfloat16 (bf16) or float32 (f32) (default: as stored)",
    )
    p.add_argument(
        "--max-shard-size",
        type=size_option,
        default="5GB",
        metavar="SIZE",
        help="split the weights into files of at most SIZE, e.g. 500MB, 2GiB (default 5GB)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier export at --out (never other files)",
    )
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("info", help="describe a checkpoint: preset, size, dtypes, layout")
    p.add_argument("checkpoint", help="checkpoint or model folder")
    p.add_argument(
        "--preset",
        default=None,
        metavar="NAME",
        help="check the shapes against this preset (default: the config stored with the "
        "checkpoint, else the preset its shapes match)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=cmd_info)

    p = sub.add_parser(
        "sample",
        help="continue a text (default: the embedded Gemma 3 270M, a "
        "pretrained model: it continues text, it does not follow instructions)",
        description="Continues --prompt and streams the continuation. Greedy "
        "by default (the most likely continuation, the same each time), which "
        "a small pretrained model soon turns into a loop: --dry 0.8 keeps it "
        "out of loops, and --temperature 1 --top-k 64 --top-p 0.95 --dry 0.8 "
        "samples as `gemma-kit chat` does.",
    )
    p.add_argument(
        "--prompt",
        required=True,
        type=text_option,
        metavar="TEXT",
        help="the text to continue, sent as is (for a chat model, write its turn "
        "markup, or use `gemma-kit chat`)",
    )
    _model_args(p)
    _sampling_flags(p, max_new_tokens=64)
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (text, tokens, logprobs, finish_reason) instead "
        "of streaming the text",
    )
    _lora_flag(
        p,
        "a LoRA adapter folder to add, unmerged (OUT_DIR/adapter of a finetune run; default: none)",
    )
    _quant_flags(p)
    p.add_argument(
        "--best-of",
        type=positive_int,
        default=None,
        metavar="N",
        help="draw N candidates and print the one --reward scores highest "
        "(default: one plain completion)",
    )
    p.add_argument(
        "--reward",
        default=None,
        metavar="SPEC",
        help="for --best-of: 'pkg.module:function' or 'rm:DIR' (a reward model); "
        "no default, --best-of needs it",
    )
    _speculative_flag(p)
    p.set_defaults(run=cmd_sample)

    p = sub.add_parser(
        "chat",
        help="multi-turn chat in the terminal (streamed replies; for an instruction-tuned model)",
    )
    _model_args(p)
    _sampling_flags(p, max_new_tokens=256, chat=True)
    p.add_argument(
        "--system",
        default=None,
        metavar="TEXT",
        help="system prompt, folded into the first user turn (default: none)",
    )
    p.add_argument(
        "--cache-length",
        type=positive_int,
        default=4096,
        metavar="N",
        help="tokens the conversation can hold before its oldest exchanges are "
        "dropped (default 4096)",
    )
    _lora_flag(
        p,
        "a LoRA adapter folder to add, unmerged (OUT_DIR/adapter of a finetune run; default: none)",
    )
    _quant_flags(p)
    _speculative_flag(p)
    p.set_defaults(run=cmd_chat)

    p = sub.add_parser(
        "demo",
        help="chat page in the browser, or text completion for a "
        "pretrained model (Gradio; pip install 'gemma-kit[demo]')",
    )
    _model_args(p)
    p.add_argument(
        "--mode",
        choices=["chat", "completion"],
        default=None,
        help="chat: the chat page; completion: a text box the model continues, for "
        "a pretrained model (default: completion for a pretrained model, i.e. "
        "the embedded 270M or a checkpoint named like gemma-3-1b-pt or "
        "gemma-3-270m; chat for one named like gemma-3-1b-it, with --lora, or "
        "when the name does not say)",
    )
    _lora_flag(
        p, "a LoRA adapter folder to apply to the model, folded into the weights (default: none)"
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to serve on (default 127.0.0.1: this machine only)",
    )
    p.add_argument("--port", type=port_option, default=7860, help="port (default 7860)")
    p.add_argument(
        "--cache-length",
        type=positive_int,
        default=4096,
        metavar="N",
        help="tokens each conversation can hold (default 4096)",
    )
    p.add_argument(
        "--concurrency",
        type=positive_int,
        default=8,
        metavar="N",
        help="replies generated at once; more wait in a queue (default 8)",
    )
    _quant_flags(p)
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser(
        "merge",
        help="fold a LoRA adapter into its base, or merge several runs "
        "of one base (average, LERP, SLERP, LITI): a full checkpoint in the "
        "official layout",
    )
    p.add_argument(
        "--base", required=True, metavar="DIR", help="the base checkpoint (or model) folder"
    )
    runs = p.add_mutually_exclusive_group(required=True)
    runs.add_argument(
        "--lora",
        nargs="+",
        metavar="ADAPTER",
        help="adapter folder(s) of runs of --base (OUT_DIR/adapter of a finetune or rl run)",
    )
    runs.add_argument(
        "--model", nargs="+", metavar="DIR", help="model folders of fully fine-tuned runs of --base"
    )
    p.add_argument(
        "--method",
        default="lora",
        choices=["lora", "average", "lerp", "slerp", "liti"],
        help="lora: fold one adapter in; average: the mean of the runs; lerp / "
        "slerp: two runs' task vectors, linearly or spherically; liti: one "
        "run's task vector times --eta (default lora)",
    )
    p.add_argument(
        "--lambda",
        dest="lam",
        type=fraction_option,
        default=0.5,
        metavar="LAM",
        help="weight of the second run for lerp and slerp, in [0, 1] (default 0.5)",
    )
    p.add_argument(
        "--eta",
        type=fraction_option,
        default=1.0,
        metavar="ETA",
        help="LITI: keep this fraction of the merged task vector, in [0, 1] "
        "(default 1: the merge itself)",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="folder to create (checkpoint/ + tokenizer.model)",
    )
    p.add_argument(
        "--preset",
        default=None,
        metavar="NAME",
        help="model size (default: inferred from the shapes)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier model folder at --out (never other files)",
    )
    p.set_defaults(run=cmd_merge)

    for name in COMMAND_MODULES:
        importlib.import_module(f"gemma_kit.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one gemma-kit command; returns the exit status (2 for a refused input)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, --version, or an option the parser refused
        return stop.code if isinstance(stop.code, int) else 2
    try:
        return args.run(args)
    except (GemmaKitError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
