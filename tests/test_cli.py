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

    assert main(["sample", "--prompt", "The capital of France is", "--max-new-tokens", "8",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    model, tokenizer = gemma_kit.default_model()
    expected = gemma_kit.Sampler(model, tokenizer).generate("The capital of France is",
                                                            max_new_tokens=8)
    assert out["tokens"] == expected.tokens and out["text"] == expected.text
    assert len(out["tokens"]) == 8 and out["finish_reason"] == "length"
    np.testing.assert_allclose(out["logprobs"], expected.logprobs, rtol=1e-6)


@pytest.mark.real_model
def test_sample_int8_equals_the_library_on_int8_weights(capsys):
    """--int8 samples from the model quantize_model(..., embedding=True) gives."""
    import gemma_kit
    from gemma_kit.quant import quantize_model

    assert main(["sample", "--prompt", "The capital of France is", "--max-new-tokens", "6",
                 "--json", "--int8"]) == 0
    out = json.loads(capsys.readouterr().out)
    model, tokenizer = gemma_kit.default_model()
    expected = gemma_kit.Sampler(quantize_model(model, embedding=True), tokenizer).generate(
        "The capital of France is", max_new_tokens=6)
    assert out["tokens"] == expected.tokens and len(out["tokens"]) == 6
    np.testing.assert_allclose(out["logprobs"], expected.logprobs, rtol=1e-6)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample", "--prompt", ""], "prompt is empty"),
        (["sample", "--prompt", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["sample", "--prompt", "hi", "--temperature", "-1"], "temperature must be"),
        (["sample", "--prompt", "hi", "--ckpt", "/nonexistent/ckpt"], "does not exist"),
        (["info", "/nonexistent/ckpt"], "does not exist"),
    ],
)
def test_bad_input_is_one_clear_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err


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

    from gemma_kit.sampler import ChatSession

    monkeypatch.setattr("sys.stdin", io.StringIO("Hello!\n/reset\nWhat is 2+2?\n/exit\n"))
    assert main(["chat", "--max-new-tokens", "6", "--system", "Be brief."]) == 0
    out = capsys.readouterr().out
    replies = [line for line in out.split("> ") if line.strip()]
    assert len(replies) == 2  # one reply per message; /reset and /exit are commands
    import gemma_kit

    model, tokenizer = gemma_kit.default_model()
    expected = ChatSession(model, tokenizer, system="Be brief.").send("What is 2+2?",
                                                                       max_new_tokens=6)
    assert replies[1].rstrip("\n") == expected
