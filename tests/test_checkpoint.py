"""Orbax checkpoints: round trips in both official layouts, released-style checkpoints written by
plain Orbax, finding a checkpoint in a download, and a clear error for every kind of bad input.

All on tiny models (tests/conftest.py), so the whole file runs in seconds.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from gemma_kit.checkpoint import official
from gemma_kit.errors import CheckpointError, CheckpointNotFoundError
from gemma_kit.loading import load_model, save_checkpoint
from tests.support import logits, workers

TOKENS = np.random.default_rng(0).integers(0, 256, size=(2, 9))  # longer than the window (4)


@pytest.fixture(params=["gemma3", "gemma2"])
def config(request):
    return request.getfixturevalue(f"tiny_{request.param}_config")


def _params(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _assert_same_params(got: dict, want: dict, dtype=None):
    got, want = official.flatten(got), official.flatten(want)
    assert got.keys() == want.keys()
    for path, value in want.items():
        expected = np.asarray(value if dtype is None else jnp.asarray(value).astype(dtype))
        actual = np.asarray(got[path])
        assert actual.dtype == expected.dtype, path
        np.testing.assert_array_equal(actual, expected, err_msg="/".join(path))


def _released_flat_tree(model) -> dict:
    """The model's weights as the released checkpoints store them, written out by hand.

    Deliberately not official.canonical_to_flat: this is the independent statement of the
    layout (one key per module path under 'transformer/', leaves 'w' / 'scale' /
    'input_embedding', feed-forward weights also under 'w').
    """
    config = model.config

    def a(param):
        return np.asarray(param[...])

    tree = {"transformer/embedder": {"input_embedding": a(model.embedder.input_embedding)}}
    for i, block in enumerate(model.blocks):
        layer = f"transformer/layer_{i}"
        for norm in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm"):
            tree[f"{layer}/{norm}"] = {"scale": a(getattr(block, norm).scale)}
        if config.num_heads == config.num_kv_heads:
            tree[f"{layer}/attn/qkv_einsum"] = {"w": a(block.attn.qkv_einsum.w)}
        else:
            tree[f"{layer}/attn/q_einsum"] = {"w": a(block.attn.q_einsum.w)}
            tree[f"{layer}/attn/kv_einsum"] = {"w": a(block.attn.kv_einsum.w)}
        tree[f"{layer}/attn/attn_vec_einsum"] = {"w": a(block.attn.attn_vec_einsum.w)}
        if config.use_qk_norm:
            tree[f"{layer}/attn/_query_norm"] = {"scale": a(block.attn._query_norm.scale)}
            tree[f"{layer}/attn/_key_norm"] = {"scale": a(block.attn._key_norm.scale)}
        tree[f"{layer}/mlp/gating_einsum"] = {"w": a(block.mlp.gating_einsum.w)}
        tree[f"{layer}/mlp/linear"] = {"w": a(block.mlp.linear.w)}
    tree["transformer/final_norm"] = {"scale": a(model.final_norm.scale)}
    return tree


def _vision_extras(embed_dim: int) -> dict:
    """Stand-ins for the SigLIP encoder and the embedder's multimodal projection of the Gemma 3
    4B+ checkpoints (released in float32), at toy sizes: width P = 8, 4x4 patches."""
    rng = np.random.default_rng(1)
    P = 8

    def r(*shape):
        return rng.normal(size=shape).astype(np.float32)

    return {
        "transformer/embedder/mm_input_projection": {"w": r(P, embed_dim)},
        "transformer/embedder/mm_soft_embedding_norm": {"scale": r(P)},
        "SigLiPFromPatches_0/siglip_encoder": {"pos_embedding": r(1, 16, P)},
        "SigLiPFromPatches_0/siglip_encoder/embedding": {"kernel": r(2, 2, 3, P), "bias": r(P)},
        "SigLiPFromPatches_0/siglip_encoder/Transformer/encoder_norm": {
            "scale": r(P),
            "bias": r(P),
        },
    }


# --------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("layout", ["flat", "nested"])
def test_round_trip_is_bit_identical(config, tiny_model, layout, tmp_path):
    model = tiny_model(config)
    path = save_checkpoint(model, tmp_path / "ckpt", layout=layout)
    loaded = load_model(path, preset=config)
    _assert_same_params(_params(loaded), _params(model))
    np.testing.assert_array_equal(logits.ours(loaded, TOKENS), logits.ours(model, TOKENS))
    _, _, info = official.load_params(path, config)
    assert info["layout"] == layout and info["stored_dtypes"] == ["float32"]
    assert not info["has_vision"]


def test_restore_casts_to_the_requested_dtype(tiny_gemma3_config, tiny_model, tmp_path):
    model = tiny_model(tiny_gemma3_config)
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt", preset=tiny_gemma3_config, dtype=jnp.bfloat16)
    _assert_same_params(_params(loaded), _params(model), dtype=jnp.bfloat16)
    # Activations stay in the default float32 compute dtype whatever the weights' dtype.
    assert logits.ours(loaded, TOKENS).dtype == jnp.float32


def test_flat_checkpoint_has_the_released_names(config, tiny_model, tmp_path):
    model = tiny_model(config)
    save_checkpoint(model, tmp_path / "ckpt", layout="flat")
    tree = ocp.PyTreeCheckpointer().restore(tmp_path / "ckpt")
    want = _released_flat_tree(model)
    assert set(tree) == set(want)
    for module, leaves in want.items():
        assert set(tree[module]) == set(leaves), module
        for leaf, value in leaves.items():
            np.testing.assert_array_equal(tree[module][leaf], value, err_msg=f"{module}/{leaf}")
    assert set(tree["transformer/layer_0/mlp/gating_einsum"]) == {"w"}
    D, F = config.embed_dim, config.hidden_dim
    gating = tree["transformer/layer_0/mlp/gating_einsum"]["w"].shape
    assert gating == ((2, F, D) if config.transpose_gating else (2, D, F))
    if config.num_heads == config.num_kv_heads:
        assert "transformer/layer_0/attn/q_einsum" not in tree
        assert tree["transformer/layer_0/attn/qkv_einsum"]["w"].shape == (3, 4, D, 16)
    else:
        assert tree["transformer/layer_0/attn/q_einsum"]["w"].shape == (4, D, 16)
        assert tree["transformer/layer_0/attn/kv_einsum"]["w"].shape == (2, 2, D, 16)


def test_nested_checkpoint_has_bare_feed_forward_arrays(tiny_gemma3_config, tiny_model, tmp_path):
    model = tiny_model(tiny_gemma3_config)
    save_checkpoint(model, tmp_path / "ckpt", layout="nested")
    tree = ocp.PyTreeCheckpointer().restore(tmp_path / "ckpt")
    assert "transformer" not in tree and {"embedder", "final_norm", "layer_0"} <= set(tree)
    mlp = tree["layer_0"]["mlp"]
    assert isinstance(mlp["gating_einsum"], np.ndarray) and isinstance(mlp["linear"], np.ndarray)
    assert set(tree["layer_0"]["attn"]["q_einsum"]) == {"w"}
    assert set(tree["layer_0"]["attn"]["_query_norm"]) == {"scale"}
    assert tree["embedder"]["input_embedding"].shape == (256, 32)


def test_released_checkpoint_with_vision_loads_text_only(tiny_gemma3_config, tiny_model, tmp_path):
    # As released: text weights bfloat16, vision float32, written by plain Orbax from numpy.
    model = tiny_model(tiny_gemma3_config, param_dtype=jnp.bfloat16)
    tree = _released_flat_tree(model) | _vision_extras(tiny_gemma3_config.embed_dim)
    ocp.PyTreeCheckpointer().save(tmp_path / "released", tree)

    config, params, info = official.load_params(tmp_path / "released", tiny_gemma3_config)
    assert info["layout"] == "flat" and info["has_vision"]
    assert info["stored_dtypes"] == ["bfloat16"]  # the text weights only
    assert set(params["embedder"]) == {"input_embedding"}  # mm_* left out
    _assert_same_params(params, _params(model))

    loaded = load_model(tmp_path / "released", preset=tiny_gemma3_config)
    np.testing.assert_array_equal(logits.ours(loaded, TOKENS), logits.ours(model, TOKENS))


# --------------------------------------------------------------------------------------------
# Finding a checkpoint


@pytest.mark.parametrize(
    "subfolder",
    [
        "gemma3-tiny-it",
        "checkpoint",  # the name gemma_kit's own model folders use
    ],
)
def test_finds_checkpoint_and_tokenizer_in_a_download(
    tiny_gemma3_config, tiny_model, tmp_path, subfolder
):
    download = tmp_path / "download"
    model = tiny_model(tiny_gemma3_config)
    save_checkpoint(model, download / subfolder)
    (download / "tokenizer.model").write_bytes(b"stand-in")
    found = official.find_checkpoint(download)
    assert found == download / subfolder
    assert official.find_checkpoint(found) == found
    assert official.find_tokenizer(found) == download / "tokenizer.model"
    assert official.find_tokenizer(download) == download / "tokenizer.model"
    loaded = load_model(download, preset=tiny_gemma3_config)
    _assert_same_params(_params(loaded), _params(model))


def test_find_tokenizer_returns_none_without_one(tmp_path):
    assert official.find_tokenizer(tmp_path) is None


def test_several_checkpoints_in_a_folder_is_an_error(tiny_gemma3_config, tiny_model, tmp_path):
    model = tiny_model(tiny_gemma3_config)
    save_checkpoint(model, tmp_path / "a")
    save_checkpoint(model, tmp_path / "b")
    with pytest.raises(CheckpointError, match="several checkpoints") as err:
        official.find_checkpoint(tmp_path)
    assert "a, b" in str(err.value)


# --------------------------------------------------------------------------------------------
# Bad input: one clear gemma_kit error each, never a raw Orbax traceback


@pytest.fixture
def saved(tiny_gemma3_config, tiny_model, tmp_path) -> pathlib.Path:
    return save_checkpoint(tiny_model(tiny_gemma3_config), tmp_path / "ckpt")


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    # Also a FileNotFoundError, for callers that catch the builtin.
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nowhere")


def test_folder_without_a_checkpoint(tmp_path):
    (tmp_path / "README.md").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="no Orbax checkpoint") as err:
        load_model(tmp_path)
    assert "README.md" in str(err.value) and "_METADATA" in str(err.value)


def test_a_file_instead_of_a_folder(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="is a file, not a checkpoint folder"):
        load_model(tmp_path / "model.gguf")


# Loads each path given with the tiny Gemma 3 config (rebuilt from tests/support/tiny.py; run
# from the repository root) and prints the outcome as JSON. Runs in a child process because,
# after a failed read, Orbax leaves TensorStore reads running that later print
# "Event loop is closed" / "coroutine was never awaited" from background threads, into whatever
# test runs next; a child process takes them with it.
_LOAD_EACH = """
import json, os, sys
from tests.support import tiny
from gemma_kit.loading import load_model
config = tiny.tiny_gemma3()
results = []
for path in sys.argv[1:]:
    try:
        load_model(path, preset=config)
        results.append(None)
    except Exception as err:
        results.append([type(err).__module__ + "." + type(err).__qualname__, str(err)])
print("RESULTS=" + json.dumps(results), flush=True)
os._exit(0)  # not waiting for the abandoned reads
"""


def test_damaged_checkpoints(tiny_gemma3_config, tiny_model, tmp_path):
    # The two folders of data files of an OCDBT checkpoint: d/ at the top holds the b-tree
    # nodes (small arrays inline), ocdbt.process_0/d/ the array data. Each is deleted or cut.
    model = tiny_model(tiny_gemma3_config)
    cases = {}
    for data_dir in ("d", "ocdbt.process_0/d"):
        for damage in ("delete", "truncate"):
            path = save_checkpoint(model, tmp_path / f"{data_dir.replace('/', '_')}-{damage}")
            files = [f for f in (path / data_dir).iterdir() if f.is_file()]
            assert files, f"no data files under {data_dir}: Orbax changed its layout"
            for f in files:
                if damage == "delete":
                    f.unlink()
                else:
                    os.truncate(f, f.stat().st_size // 2)
            cases[f"{data_dir} {damage}"] = path
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            _LOAD_EACH,
            *map(str, cases.values()),
        ],
        cwd=workers.ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [l for l in child.stdout.splitlines() if l.startswith("RESULTS=")]
    assert lines, f"child process failed:\n{child.stderr[-3000:]}"
    for (case, path), result in zip(cases.items(), json.loads(lines[0][len("RESULTS=") :])):
        assert result is not None, f"{case}: a damaged checkpoint loaded without an error"
        kind, message = result
        assert kind == "gemma_kit.errors.CheckpointError", f"{case}: {kind}: {message}"
        assert "incomplete or corrupt" in message, f"{case}: {message}"
        assert str(path) in message and "again" in message, f"{case}: {message}"


def test_wrong_preset_names_the_mismatch(saved):
    with pytest.raises(CheckpointError, match="does not match preset 'gemma3-1b'") as err:
        load_model(saved, preset="gemma3-1b")
    message = str(err.value)
    assert "embedder/input_embedding has shape (256, 32)" in message
    assert "(262144, 1152)" in message


def test_mismatched_config_names_the_mismatch(saved, tiny_gemma3_config):
    wrong = tiny_gemma3_config.replace(hidden_dim=64)
    with pytest.raises(CheckpointError, match="does not match preset 'tiny-gemma3'") as err:
        load_model(saved, preset=wrong)
    message = str(err.value)
    assert "layer_0/mlp/gating_einsum/w has shape (2, 48, 32)" in message
    assert "expects (2, 64, 32)" in message


def test_gemma2_checkpoint_with_a_gemma3_config(
    tiny_gemma2_config, tiny_gemma3_config, tiny_model, tmp_path
):
    save_checkpoint(tiny_model(tiny_gemma2_config), tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="does not match") as err:
        load_model(tmp_path / "ckpt", preset=tiny_gemma3_config)
    # The tiny Gemma 2 has N == K, so a fused qkv_einsum where the config expects q and kv.
    assert "layer_0/attn/q_einsum/w missing from the checkpoint" in str(err.value)


def test_no_preset_matches_a_custom_size(saved, tiny_gemma3_config):
    # save_checkpoint stored the custom size's config with the weights: it loads as it was.
    assert load_model(saved).config == tiny_gemma3_config
    # Without the stored config only the official sizes are known.
    (saved / official.CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match="no preset matches") as err:
        load_model(saved)
    message = str(err.value)
    assert "V=256" in message and "D=32" in message and "L=3" in message
    assert "gemma_kit.Config" in message


def test_unexpected_key_in_a_flat_checkpoint(tiny_gemma3_config, tiny_model, tmp_path):
    tree = _released_flat_tree(tiny_model(tiny_gemma3_config))
    tree["optimizer/mu"] = {"w": np.zeros(3, np.float32)}
    ocp.PyTreeCheckpointer().save(tmp_path / "ckpt", tree)
    with pytest.raises(CheckpointError, match="unexpected key 'optimizer/mu'"):
        load_model(tmp_path / "ckpt", preset=tiny_gemma3_config)


# --------------------------------------------------------------------------------------------
# Saving safely


def test_save_refuses_an_existing_folder(saved, tiny_gemma3_config, tiny_model):
    before = sorted(p.relative_to(saved) for p in saved.rglob("*"))
    other = tiny_model(tiny_gemma3_config, seed=1)
    with pytest.raises(CheckpointError, match="already exists") as err:
        save_checkpoint(other, saved)
    assert "overwrite=True" in str(err.value)
    assert sorted(p.relative_to(saved) for p in saved.rglob("*")) == before


def test_save_overwrites_a_checkpoint_when_asked(saved, tiny_gemma3_config, tiny_model):
    other = tiny_model(tiny_gemma3_config, seed=1)
    save_checkpoint(other, saved, overwrite=True)
    _assert_same_params(_params(load_model(saved, preset=tiny_gemma3_config)), _params(other))


def test_save_never_deletes_a_folder_that_is_not_a_checkpoint(
    tiny_gemma3_config, tiny_model, tmp_path
):
    folder = tmp_path / "my-data"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    (folder / "sub").mkdir()
    (folder / "sub" / "more.txt").write_text("also precious")
    with pytest.raises(CheckpointError, match="refusing to overwrite") as err:
        save_checkpoint(tiny_model(tiny_gemma3_config), folder, overwrite=True)
    assert "not an Orbax checkpoint" in str(err.value)
    assert (folder / "notes.txt").read_text() == "precious"
    assert (folder / "sub" / "more.txt").read_text() == "also precious"


def test_save_never_deletes_a_tensorflow_training_folder(tiny_gemma3_config, tiny_model, tmp_path):
    folder = tmp_path / "tf-run"
    folder.mkdir()
    (folder / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-1"')
    (folder / "model.ckpt-1.index").write_bytes(b"weights")
    try:
        save_checkpoint(tiny_model(tiny_gemma3_config), folder, overwrite=True)
    except CheckpointError:
        pass
    assert (folder / "model.ckpt-1.index").is_file(), "overwrite=True deleted a TF training folder"


def test_save_into_an_empty_folder_with_overwrite(tiny_gemma3_config, tiny_model, tmp_path):
    (tmp_path / "empty").mkdir()
    model = tiny_model(tiny_gemma3_config)
    save_checkpoint(model, tmp_path / "empty", overwrite=True)
    _assert_same_params(
        _params(load_model(tmp_path / "empty", preset=tiny_gemma3_config)), _params(model)
    )


def test_save_onto_a_file_is_a_clear_error(tiny_gemma3_config, tiny_model, tmp_path):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"data")
    with pytest.raises(CheckpointError, match="file"):
        save_checkpoint(tiny_model(tiny_gemma3_config), target, overwrite=True)
    assert target.read_bytes() == b"data"


def test_a_relative_path_loads_and_saves(tmp_path, monkeypatch, tiny_gemma3_config, tiny_model):
    """Orbax reads no metadata from a relative path (it returned None and the load looked like a
    damaged checkpoint): a folder named relative to the working directory must work too."""
    model = tiny_model(tiny_gemma3_config, seed=3)
    monkeypatch.chdir(tmp_path)
    save_checkpoint(model, "rel/checkpoint")
    loaded = load_model("rel", tiny_gemma3_config)
    for (path, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(model, nnx.Param)),
        nnx.to_flat_state(nnx.state(loaded, nnx.Param)),
    ):
        np.testing.assert_array_equal(
            np.asarray(a.get_value()), np.asarray(b.get_value()), str(path)
        )
