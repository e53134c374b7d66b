"""Smaller students (gemma_kit.checkpoint.shrink, `gemma-kit shrink`) and configs stored beside
their checkpoints (gemma_kit.config.config_to_dict / config_from_dict,
gemma_kit.checkpoint.official.write_config / read_config).

A tiny Gemma 3 teacher of six layers (five sliding-window layers then a global one, window 4,
shorter than the sequences) is written as a model folder, shrunk to three of its layers, and the
student is read back by load_model, `gemma-kit info`, `sample` and `export --to hf`.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from gemma_kit.attention import attention_mask
from gemma_kit.checkpoint import official
from gemma_kit.checkpoint.convert import write_model_folder
from gemma_kit.checkpoint.shrink import (
    describe_layers,
    parse_layers,
    shrink_checkpoint,
    shrink_config,
    shrink_model,
)
from gemma_kit.cli import main
from gemma_kit.config import PRESETS, config_from_dict, config_to_dict, gemma3_layers
from gemma_kit.errors import CheckpointError, ConfigError
from gemma_kit.loading import load_model
from gemma_kit.transformer import default_positions
from tests.support import tiny, vision_tiny

KEEP = (0, 2, 5)  # two local layers and the global one


def _teacher_config(vocab: int):
    return tiny.tiny_gemma3().replace(
        name="tiny-six", vocab_size=vocab, layers=gemma3_layers(6, window=4)
    )


@pytest.fixture
def teacher(small_tokenizer, tiny_model):
    return tiny_model(_teacher_config(small_tokenizer.vocab_size), seed=3)


@pytest.fixture
def teacher_folder(teacher, small_tokenizer, tmp_path):
    from flax import nnx

    params = nnx.to_pure_dict(nnx.state(teacher, nnx.Param))
    return write_model_folder(
        tmp_path / "teacher", params, small_tokenizer.to_bytes(), config=teacher.config
    )


def _tokens(vocab: int, rows: int = 2, length: int = 12) -> np.ndarray:
    return np.random.default_rng(0).integers(4, vocab, (rows, length)).astype(np.int32)


def _kept_layers_only(model, tokens, keep) -> np.ndarray:
    """The teacher's own computation with only the kept blocks: embed, those blocks in order
    (each under the model-wide causal mask, narrowed to its own window inside), final norm,
    logits."""
    tokens = jnp.asarray(tokens)
    positions = default_positions(tokens, None)
    mask = attention_mask(positions)
    x = model.embedder.encode(tokens, model.dtype)
    for i in keep:
        x, _ = model.blocks[i](x, positions, mask)
    return np.asarray(model.logits(model.final_norm(x)))


# --------------------------------------------------------------------------------------------
# Configs as JSON


def test_every_preset_and_tiny_config_round_trips_through_json():
    configs = [
        *PRESETS.values(),
        tiny.tiny_gemma2(),
        tiny.tiny_gemma3(),
        vision_tiny.tiny_vision_config(),
        _teacher_config(384),
    ]
    for config in configs:
        stored = json.loads(json.dumps(config_to_dict(config)))
        assert config_from_dict(stored) == config, config.name
    assert config_to_dict(PRESETS["gemma3-270m"])["layers"][5] == {
        "attention": "global",
        "rope_base": 1_000_000.0,
        "rope_scale": 1.0,
    }


def test_a_bad_stored_config_is_one_clear_error(teacher_folder):
    config = config_to_dict(_teacher_config(384))
    with pytest.raises(ConfigError, match=r"unknown fields \['heads'\]"):
        config_from_dict(dict(config, heads=3))
    with pytest.raises(ConfigError, match="layer 1 of the stored config needs"):
        config_from_dict(dict(config, layers=[config["layers"][0], {"window": 4}]))
    (teacher_folder / "checkpoint" / official.CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="gemma_config.json is damaged"):
        load_model(teacher_folder)


# --------------------------------------------------------------------------------------------
# Layer lists


def test_layer_lists_are_read_and_checked():
    assert parse_layers("0,2,4-8, 17", 18) == (0, 2, 4, 5, 6, 7, 8, 17)
    assert parse_layers([1, 3], 4) == (1, 3)
    assert describe_layers((0, 2, 3, 4, 7)) == "0,2-4,7"
    for spec, message in [
        ("0,18", "layer 18 is out of range: the model has 18 layers"),
        ("-1", "cannot read '-1' in the layer list"),
        ("3,1", "increasing order"),
        ("2,2", "increasing order"),
        ("a", "cannot read 'a'"),
        ("5-3", "a range a-b has a <= b"),
        ([], "keep at least one layer"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_layers(spec, 18)


# --------------------------------------------------------------------------------------------
# The student computes the teacher's kept layers


def test_shrunk_checkpoint_equals_the_teachers_kept_layers(teacher, teacher_folder, tmp_path):
    """Written, read back by load_model (from the stored config), the student's logits equal
    the teacher's own blocks 0, 2, 5 run in a loop; each kept layer keeps its attention kind.
    The same operations in the same order: bit-identical (asserted to 1e-6 absolute)."""
    # The teacher's own config was stored too (it is no preset) and is what load_model reads.
    assert official.read_config(teacher_folder / "checkpoint") == teacher.config
    out, student, parent = shrink_checkpoint(teacher_folder, "0,2,5", tmp_path / "student")
    assert parent == teacher.config
    assert student == shrink_config(teacher.config, KEEP)
    assert student.name == "tiny-six-keep[0,2,5]"
    assert student.layers == tuple(teacher.config.layers[i] for i in KEEP)
    assert [k.is_local for k in student.layers] == [True, True, False]
    assert (out / "tokenizer.model").read_bytes() == (
        teacher_folder / "tokenizer.model"
    ).read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left

    loaded = load_model(out)
    assert loaded.config == student
    tokens = _tokens(teacher.config.vocab_size)
    expected = _kept_layers_only(teacher, tokens, KEEP)
    np.testing.assert_allclose(np.asarray(loaded(tokens)), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(shrink_model(teacher, KEEP)(tokens)), expected, rtol=0, atol=1e-6
    )
    # The skipped layers mattered: the whole teacher computes something else.
    assert np.abs(np.asarray(teacher(tokens)) - expected).max() > 0.1


def test_cli_shrink_then_info_sample_and_export(teacher_folder, tmp_path, capsys):
    """`gemma-kit shrink` writes the student; info, sample and export --to hf read its stored
    config; transformers loads the export (an irregular layer pattern) with the same logits."""
    out = tmp_path / "student"
    assert (
        main(["shrink", "--ckpt", str(teacher_folder), "--keep-layers", "0,2,5", "--out", str(out)])
        == 0
    )
    assert "3 of 6 layers of tiny-six" in capsys.readouterr().out

    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["preset"].startswith("none: tiny-six-keep[0,2,5]") and info["layers"] == "L L G"

    assert (
        main(
            [
                "sample",
                "--ckpt",
                str(out),
                "--prompt",
                "The for statement",
                "--max-new-tokens",
                "4",
                "--json",
            ]
        )
        == 0
    )
    assert len(json.loads(capsys.readouterr().out)["tokens"]) >= 1

    torch = pytest.importorskip("torch", reason="the export check needs torch (the [test] extra)")
    transformers = pytest.importorskip("transformers", reason="needs transformers")
    hf = tmp_path / "hf"
    assert main(["export", "--to", "hf", "--ckpt", str(out), "--out", str(hf)]) == 0
    assert json.loads((hf / "config.json").read_text())["layer_types"] == [
        "sliding_attention",
        "sliding_attention",
        "full_attention",
    ]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        hf, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokens = _tokens(384, rows=1)
    with torch.no_grad():
        logits = theirs(input_ids=torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(load_model(out)(tokens))
    np.testing.assert_allclose(logits[..., : ours.shape[-1]], ours, rtol=0, atol=1e-4)


def test_cli_refuses_layers_out_of_range_and_writes_nothing(teacher_folder, tmp_path, capsys):
    out = tmp_path / "student"
    assert (
        main(["shrink", "--ckpt", str(teacher_folder), "--keep-layers", "0,6", "--out", str(out)])
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "layer 6 is out of range: the model has 6 layers" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
