"""Fine-tuning runs on the tiny models: LoRA, QLoRA and full, their outputs, divergence, the CLI.

The real Gemma 3 270M run is in test_finetune_real.py; stopping, resuming and the 8-device step
are in test_finetune_resume.py (they need child processes).
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gemma_kit
from gemma_kit import lora
from gemma_kit.errors import DivergenceError
from gemma_kit.finetune import TrainConfig, train
from tests.support import tiny

pytest.importorskip("optax", reason="fine-tuning needs the [finetune] extra")


def _rows():
    lines = [line.strip() for line in tiny.SMALL_TEXT.splitlines() if len(line.strip()) > 20]
    rows = []
    for i, line in enumerate(lines[:60]):
        if i % 2:
            rows.append({"text": line[:100]})
        else:
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": "Quote the manual."},
                        {"role": "model", "content": line[:50]},
                    ]
                }
            )
    return rows


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Gemma 3 checkpoint folder with the small tokenizer, and its JSONL data."""
    folder = tmp_path_factory.mktemp("ft")
    tokenizer = tiny.small_tokenizer()
    config = tiny.tiny_gemma3().replace(vocab_size=tokenizer.vocab_size)
    gemma_kit.save_checkpoint(tiny.random_model(config, seed=0), folder / "base" / "checkpoint")
    (folder / "base" / "tokenizer.model").write_bytes(tiny.small_tokenizer_bytes())
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    return dict(folder=folder, config=config, tokenizer=tokenizer, data=data)


def _train_config(base, out, **changes):
    settings = dict(
        train_file=str(base["data"]),
        out_dir=str(out),
        steps=8,
        batch_size=4,
        max_length=64,
        learning_rate=1e-2,
        warmup_steps=1,
        save_every=4,
        keep_checkpoints=3,
        eval_every=4,
        eval_fraction=0.1,
        progress=False,
    )
    return TrainConfig(**{**settings, **changes})


def _model(base, config=None, seed=0):
    return tiny.random_model(config or base["config"], seed=seed)


@pytest.fixture(scope="module")
def lora_run(base):
    model = _model(base)
    params_before = [np.array(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    result = train(
        _train_config(base, base["folder"] / "lora"), model=model, tokenizer=base["tokenizer"]
    )
    return dict(result=result, model=model, params_before=params_before)


def test_lora_trains_only_lora(base, lora_run):
    result, model = lora_run["result"], lora_run["model"]
    assert result.step == 8 and not result.interrupted
    assert result.eval_after < result.eval_before
    trained = result.model
    # The base is bit-identical; every LoRA factor moved (B from zero, A through B).
    after = [np.array(x) for x in jax.tree.leaves(nnx.state(trained, nnx.Param))]
    for a, b in zip(after, lora_run["params_before"], strict=True):
        np.testing.assert_array_equal(a, b)
    assert not lora.has_lora(model)  # the model given to train() is left as it was
    initial = lora.apply_lora(nnx.merge(*nnx.split(model)), 8, 16.0, "all", seed=0)
    start = jax.tree.leaves(lora.lora_state(initial))
    end = jax.tree.leaves(lora.lora_state(trained))
    assert len(start) == len(end) > 0
    assert all(not np.array_equal(a, b) for a, b in zip(start, end))


def test_lora_run_outputs(base, lora_run):
    result = lora_run["result"]
    out = result.out_dir
    assert result.adapter == out / "adapter"
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [4, 8]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 4, 8]
    assert all(r["tokens_per_s"] > 0 and r["loss_tokens"] > 0 for r in rows if "loss" in r)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_after"] == result.eval_after and summary["method"] == "lora"
    assert json.loads((out / "config.json").read_text())["lora_rank"] == 8
    # The adapter alone, on the base checkpoint, is the trained model.
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 384, (2, 12)))
    loaded = gemma_kit.load_model(base["folder"] / "base", base["config"], lora=result.adapter)
    np.testing.assert_array_equal(np.asarray(loaded(tokens)), np.asarray(result.model(tokens)))


def test_divergence_stops_and_keeps_the_last_good_checkpoint(base, lora_run):
    """A NaN loss stops the run with a clear message; the checkpoint before it is untouched."""
    out = base["folder"] / "diverge"
    shutil.copytree(lora_run["result"].out_dir, out)
    shutil.rmtree(out / "checkpoints" / "8")  # as if the run had stopped after step 4
    shutil.rmtree(out / "adapter")
    saved = {p: p.read_bytes() for p in (out / "checkpoints" / "4").rglob("*") if p.is_file()}
    model = _model(base)
    model.final_norm.scale.value = jnp.full_like(model.final_norm.scale[...], jnp.nan)
    with pytest.raises(
        DivergenceError,
        match=r"nan .* at step 5; stopped without saving that "
        r"state\. The last good checkpoint is step 4",
    ):
        train(_train_config(base, out), model=model, tokenizer=base["tokenizer"], resume=True)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["4"]
    assert {p: p.read_bytes() for p in saved} == saved
    assert not (out / "adapter").exists()


def test_qlora_trains_on_an_int8_base(base):
    from gemma_kit.layers import Einsum

    result = train(
        _train_config(base, base["folder"] / "qlora", method="qlora", steps=6),
        model=_model(base),
        tokenizer=base["tokenizer"],
    )
    assert result.eval_after < result.eval_before
    einsums = [m for _, m in result.model.iter_modules() if isinstance(m, Einsum)]
    assert all(m.w[...].dtype == jnp.int8 and m.lora is not None for m in einsums)
    # The adapter is independent of the base's storage: it applies to the float base too,
    # giving logits within the int8 rounding of the trained model's (bound as in test_quant).
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 384, (2, 12)))
    on_float = np.asarray(
        gemma_kit.load_model(base["folder"] / "base", base["config"], lora=result.adapter)(tokens)
    )
    on_int8 = np.asarray(result.model(tokens))
    assert np.abs(on_float - on_int8).max() <= 3e-2 * np.abs(on_float).max()


def test_full_fine_tuning(base):
    """Every weight trains; the result is an official checkpoint with its tokenizer."""
    tokenizer = base["tokenizer"]
    config = tiny.tiny_gemma2().replace(vocab_size=tokenizer.vocab_size)
    model = _model(base, config)
    before = [np.array(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    result = train(
        _train_config(base, base["folder"] / "full", method="full", steps=3, learning_rate=1e-3),
        model=model,
        tokenizer=tokenizer,
    )
    after = [np.array(x) for x in jax.tree.leaves(nnx.state(result.model, nnx.Param))]
    assert all(not np.array_equal(a, b) for a, b in zip(after, before, strict=True))
    assert result.adapter is None and result.model_dir == result.out_dir / "model"
    loaded = gemma_kit.load_model(result.model_dir, config)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 384, (1, 10)))
    np.testing.assert_array_equal(np.asarray(loaded(tokens)), np.asarray(result.model(tokens)))
    assert gemma_kit.Tokenizer(result.model_dir / "tokenizer.model").vocab_size == 384


def test_cli_errors_are_one_line(tmp_path, capsys):
    from gemma_kit.cli import main

    def run(*argv):
        code = main(list(argv))
        return code, capsys.readouterr().err.strip()

    code, err = run(
        "finetune",
        "--train-file",
        str(tmp_path / "missing.jsonl"),
        "--out-dir",
        str(tmp_path / "o"),
        "--steps",
        "2",
    )
    assert code == 2 and err.startswith("error: ") and "missing.jsonl: no such file" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "o").exists()
    code, err = run("finetune", "--config", str(tmp_path / "nope.toml"))
    assert code == 2 and "does not exist" in err
    code, err = run(
        "finetune",
        "--train-file",
        "x",
        "--out-dir",
        "o",
        "--steps",
        "2",
        "--set",
        "learning_rat=1e-3",
    )
    assert code == 2 and "did you mean 'learning_rate'" in err
    code, err = run(
        "finetune",
        "--train-file",
        "x",
        "--out-dir",
        "o",
        "--epochs",
        "1",
        "--set",
        "batch_size=3",
        "--set",
        "grad_accum=2",
    )
    assert code == 2 and "multiple of grad_accum" in err
    code, err = run(
        "merge",
        "--base",
        str(tmp_path),
        "--lora",
        str(tmp_path / "no-adapter"),
        "--out",
        str(tmp_path / "merged"),
    )
    assert code == 2 and "adapter folder" in err and "does not exist" in err
    code, err = run("sample", "--prompt", "hi", "--lora", str(tmp_path))
    assert code == 2 and "not a gemma_kit adapter folder" in err


def test_parse_overrides():
    from gemma_kit.finetune.config import parse_overrides

    assert parse_overrides(
        [
            "learning_rate=1e-4",
            "packing=false",
            "lora-targets=['attn']",
            "base=ckpt/gemma",
            "steps = 5",
            'eval_file="a b.jsonl"',
        ]
    ) == dict(
        learning_rate=1e-4,
        packing=False,
        lora_targets=["attn"],
        base="ckpt/gemma",
        steps=5,
        eval_file="a b.jsonl",
    )


def test_image_rows_train_a_vision_model(tmp_path):
    """Rows with images on a tiny Gemma 3 vision model: the packed loss (image embeddings made
    once by the frozen encoder, placed by slot, image blocks bidirectional within their own
    example) equals the loss of each example through the model's public image path (model(
    tokens, images=pixels)), to 1e-5 relative; then a short LoRA run trains on such rows."""
    pytest.importorskip("PIL", reason="reading images needs the [vision] extra (Pillow)")
    from gemma_kit.finetune.data import load_examples, pack
    from gemma_kit.finetune.train import ImageBank, loss_sums
    from gemma_kit.vision import preprocess_image
    from tests.support.vision_tiny import (
        drawn_image,
        image_tokenizer,
        random_vision_model,
        tiny_vision_config,
    )

    tokenizer = image_tokenizer()
    config = tiny_vision_config()
    model = random_vision_model(config, seed=0)
    for i in range(3):
        drawn_image(40 + 8 * i, 30, seed=i).save(tmp_path / f"img{i}.png")

    def image(i):
        return {"type": "image", "path": f"img{i}.png"}

    rows = [
        {
            "messages": [
                {"role": "user", "content": [image(0), {"type": "text", "text": "What?"}]},
                {"role": "model", "content": "A drawing."},
            ]
        },
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Compare "},
                        image(1),
                        {"type": "text", "text": " with "},
                        image(2),
                    ],
                },
                {"role": "model", "content": "They differ."},
            ]
        },
    ]
    data = tmp_path / "images.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    M = config.vision.num_soft_tokens
    examples = [
        e
        for row in load_examples(data, tokenizer, max_length=64, num_soft_tokens=M)[0]
        for e in row
    ]
    packed = pack(examples, 128)
    assert len(packed) == 1 and len(packed.images_of(0)[0]) == 3
    files = sorted({f for e in examples for f in e.images})
    bank = ImageBank(model, files, max_images=3, progress=False)
    batch = packed.take(np.arange(1))
    batch["image_embeddings"] = bank.gather(packed.images_of(np.arange(1)))
    total, count = jax.jit(lambda m, b: loss_sums(m, b, 1024))(model, batch)

    size = config.vision.image_size
    expected, expected_count = 0.0, 0
    for e in examples:
        pixels = np.stack([preprocess_image(f, size) for f in e.images])[None]
        logits = model(jnp.asarray(e.tokens[None, :-1]), images=pixels)[0]
        log_p = np.asarray(jax.nn.log_softmax(logits))
        targets = np.maximum(e.tokens[1:], 0)
        weights = e.loss_mask[1:]
        expected += float(-(log_p[np.arange(len(targets)), targets] * weights).sum())
        expected_count += int(weights.sum())
    assert int(count) == expected_count > 0
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)

    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    result = train(
        TrainConfig(
            train_file=str(data),
            out_dir=str(tmp_path / "run"),
            steps=2,
            batch_size=2,
            max_length=128,
            learning_rate=1e-2,
            warmup_steps=0,
            eval_fraction=0.0,
            progress=False,
        ),
        model=model,
        tokenizer=tokenizer,
    )
    assert np.isfinite(result.last_loss) and result.adapter.is_dir()
    assert not lora.has_lora(model)
