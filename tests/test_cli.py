"""The `gemma-kit` command line, run in-process through gemma_kit.cli.main."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gemma_kit.cli import main
from gemma_kit.embedded import ensure_default_model


def test_info_describes_the_default_model(capsys):
    folder = ensure_default_model()
    assert main(["info", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["preset"] == "gemma3-270m"
    assert info["parameters"] == 268_098_176
    assert info["dtypes"] == ["bfloat16"]
    assert info["layout"] == "flat"
    assert info["tokenizer"].endswith("tokenizer.model")


def test_info_checks_a_given_preset(capsys):
    folder = ensure_default_model()
    assert main(["info", str(folder), "--preset", "gemma3-1b"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint does not match preset 'gemma3-1b'")
    assert "gemma3-270m" in err  # says which preset the shapes do match
    assert main(["info", str(folder), "--preset", "gemma9-1b"]) == 2
    assert "Unknown preset 'gemma9-1b'" in capsys.readouterr().err


@pytest.mark.real_model
def test_sample_json_equals_the_library(capsys):
    import gemma_kit

    assert (
        main(["sample", "--prompt", "The capital of France is", "--max-new-tokens", "8", "--json"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    model, tokenizer = gemma_kit.default_model()
    expected = gemma_kit.Sampler(model, tokenizer).generate(
        "The capital of France is", max_new_tokens=8
    )
    assert out["tokens"] == expected.tokens and out["text"] == expected.text
    assert len(out["tokens"]) == 8 and out["finish_reason"] == "length"
    np.testing.assert_allclose(out["logprobs"], expected.logprobs, rtol=1e-6)


@pytest.mark.real_model
def test_sample_int8_equals_the_library_on_int8_weights(capsys):
    """--int8 samples from the model quantize_model(..., embedding=True) gives."""
    import gemma_kit
    from gemma_kit.quant import quantize_model

    assert (
        main(
            [
                "sample",
                "--prompt",
                "The capital of France is",
                "--max-new-tokens",
                "6",
                "--json",
                "--int8",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    model, tokenizer = gemma_kit.default_model()
    expected = gemma_kit.Sampler(quantize_model(model, embedding=True), tokenizer).generate(
        "The capital of France is", max_new_tokens=6
    )
    assert out["tokens"] == expected.tokens and len(out["tokens"]) == 6
    np.testing.assert_allclose(out["logprobs"], expected.logprobs, rtol=1e-6)


@pytest.fixture
def no_loading(monkeypatch):
    """Makes any model load fail the test: the inputs below must be refused before one."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    for target in (
        "gemma_kit.embedded.default_model",
        "gemma_kit.embedded.ensure_default_model",
        "gemma_kit.loading.load_model",
    ):
        monkeypatch.setattr(target, refuse)


# (argv, what the one-line message must contain). Every one is refused before any model loads.
BAD_INPUT = [
    (
        ["sample", "--prompt", "hi", "--dtype", "float16"],
        "argument --dtype: unknown dtype 'float16'; use bfloat16 (bf16) or float32 (f32)",
    ),
    (["chat", "--dtype", "float16"], "argument --dtype: unknown dtype 'float16'"),
    (["export", "--to", "hf", "--out", "x", "--dtype", "float16"], "unknown dtype 'float16'"),
    (["convert", "--gguf", "a.gguf", "--out", "x", "--dtype", "fp16"], "unknown dtype 'fp16'"),
    (["demo", "--dtype", "int8"], "unknown dtype 'int8'"),
    (["sample", "--prompt", ""], "argument --prompt: is empty; give at least one character"),
    (
        ["sample", "--prompt", "hi", "--max-new-tokens", "0"],
        "argument --max-new-tokens: must be an integer >= 1, got 0",
    ),
    (["chat", "--max-new-tokens", "-3"], "argument --max-new-tokens: must be an integer >= 1"),
    (["sample", "--prompt", "hi", "--max-new-tokens", "ten"], "expected an integer >= 1"),
    (["sample", "--prompt", "hi", "--top-p", "0"], "argument --top-p: must be in (0, 1], got 0"),
    (["sample", "--prompt", "hi", "--top-p", "1.5"], "argument --top-p: must be in (0, 1]"),
    (["sample", "--prompt", "hi", "--min-p", "2"], "argument --min-p: must be in [0, 1]"),
    (["sample", "--prompt", "hi", "--top-k", "0"], "argument --top-k: must be an integer >= 1"),
    (["sample", "--prompt", "hi", "--temperature", "-1"], "argument --temperature: must be >= 0"),
    (["sample", "--prompt", "hi", "--temperature", "nan"], "expected a finite number"),
    (["sample", "--prompt", "hi", "--stop", ""], "argument --stop: is empty"),
    (["chat", "--cache-length", "0"], "argument --cache-length: must be an integer >= 1"),
    (["demo", "--port", "70000"], "argument --port: must be a port number in 1..65535"),
    (["demo", "--concurrency", "0"], "argument --concurrency: must be an integer >= 1"),
    (
        ["export", "--to", "hf", "--out", "x", "--max-shard-size", "0"],
        "argument --max-shard-size: must be at least one byte",
    ),
    (["export", "--to", "hf", "--out", "x", "--max-shard-size", "lots"], "cannot read 'lots'"),
    (["export", "--to", "onnx", "--out", "x"], "argument --to: invalid choice: 'onnx'"),
    (["finetune", "--steps", "0"], "argument --steps: must be an integer >= 1"),
    (
        ["sample", "--prompt", "hi", "--preset", "gemma3-1b"],
        "--tokenizer and --preset describe a checkpoint given with --ckpt",
    ),
    (["chat", "--tokenizer", "t.model"], "--tokenizer and --preset describe a checkpoint"),
    (["sample", "--prompt", "hi", "--ckpt", "/nonexistent/ckpt"], "does not exist"),
    (
        ["sample", "--prompt", "hi", "--ckpt", "/nonexistent/ckpt", "--preset", "gemma9-1b"],
        "Unknown preset 'gemma9-1b'",
    ),
    (
        ["sample", "--prompt", "hi", "--lora", "/nonexistent/adapter"],
        "adapter folder '/nonexistent/adapter' does not exist",
    ),
    (["export", "--to", "peft", "--out", "x"], "--to peft converts a LoRA adapter alone"),
    (["info", "/nonexistent/ckpt"], "does not exist"),
    (["sample"], "the following arguments are required: --prompt"),
    ([], "the following arguments are required: COMMAND"),
    (["sample", "--prompt", "hi", "--tempreature", "1"], "unrecognized arguments: --tempreature"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_one_clear_line(no_loading, capsys, argv, message):
    """Exit status 2 and one line on stderr that names the cause; no traceback, no load."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert message in captured.err
    assert "Traceback" not in captured.err and not captured.out


def test_version_and_help(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"gemma-kit {version('gemma-kit')} (jax ")
    assert main(["sample", "--help"]) == 0
    assert "--max-new-tokens N" in capsys.readouterr().out


def _options():
    """(command, option, whether it is required) for every option of every gemma-kit command."""
    import argparse

    from gemma_kit.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in [("gemma-kit", parser), *commands.choices.items()]:
        # One of a required group (convert's --gguf / --hf) has no default to state.
        required = {
            id(a) for g in sub._mutually_exclusive_groups if g.required for a in g._group_actions
        }
        for action in sub._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                yield name, action, action.required or id(action) in required


def test_every_option_has_help_and_states_its_default():
    """Each option says what it does, and each that takes a value what happens without it."""
    undocumented, no_default = [], []
    for command, action, required in _options():
        label = f"{command} {'/'.join(action.option_strings) or action.dest}"
        if not (action.help or "").strip():
            undocumented.append(label)
        takes_value = action.nargs != 0 and action.option_strings and not required
        if takes_value and "default" not in action.help:
            no_default.append(label)
    assert not undocumented, f"options without help text: {undocumented}"
    assert not no_default, f"options whose help does not state the default: {no_default}"


def test_convert_refuses_non_gguf_and_existing_output(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    assert main(["convert", "--gguf", str(text), "--out", str(tmp_path / "out")]) == 2
    assert "not a GGUF file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert main(["convert", "--gguf", str(text), "--out", str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", "--gguf", str(text), "--out", str(existing), "--overwrite"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (existing / "keep.txt").read_text() == "mine"


@pytest.mark.real_model
def test_convert_the_packaged_gguf(tmp_path, capsys):
    from gemma_kit.checkpoint.official import find_tokenizer
    from gemma_kit.paths import default_gguf_path

    out = tmp_path / "gemma3-270m"
    assert main(["convert", "--gguf", str(default_gguf_path()), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "tokenizer.model"]
    assert find_tokenizer(out) == out / "tokenizer.model"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["preset"] == "gemma3-270m"


@pytest.mark.real_model
def test_chat_streams_replies_over_turns(monkeypatch, capsys):
    import io

    from gemma_kit.chat import ChatSession

    monkeypatch.setattr("sys.stdin", io.StringIO("Hello!\n/reset\nWhat is 2+2?\n/exit\n"))
    assert main(["chat", "--max-new-tokens", "6", "--system", "Be brief."]) == 0
    out = capsys.readouterr().out
    replies = [line for line in out.split("> ") if line.strip()]
    assert len(replies) == 2  # one reply per message; /reset and /exit are commands
    import gemma_kit

    model, tokenizer = gemma_kit.default_model()
    expected = ChatSession(model, tokenizer, system="Be brief.").send(
        "What is 2+2?", max_new_tokens=6
    )
    assert replies[1].rstrip("\n") == expected
