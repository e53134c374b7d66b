"""The image encoder's parameters: official shapes (golden table), Orbax round trips, loading with
and without vision.

tests/golden/vision_shapes.json is written by scripts/write_vision_golden.py from numbers copied
out of the official code (cited there, and re-read by its --verify-official), without gemma_kit;
here gemma_kit's jax.eval_shape trees are compared against it. Full-size models are never
allocated.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from gemma_kit.checkpoint import official
from gemma_kit.config import PRESETS
from gemma_kit.errors import CheckpointError, ConfigError, ImageError
from gemma_kit.loading import load_model, save_checkpoint
from tests.support.vision_tiny import (
    TINY_VISION,
    random_pixels,
    random_vision_model,
    tiny_vision_config,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
GOLDEN_PATH = ROOT / "tests" / "golden" / "vision_shapes.json"
GOLDEN = json.loads(GOLDEN_PATH.read_text())["presets"]
TEXT_GOLDEN = json.loads((ROOT / "tests" / "golden" / "preset_shapes.json").read_text())["presets"]
VISION_PRESETS = [name for name, config in PRESETS.items() if config.has_vision]


def _shapes(flat_tree) -> dict[str, dict[str, list[int]]]:
    return {
        module: {leaf: list(x.shape) for leaf, x in leaves.items()}
        for module, leaves in flat_tree.items()
    }


def _params(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _assert_same(a: dict, b: dict):
    fa, fb = official.flatten(a), official.flatten(b)
    assert fa.keys() == fb.keys()
    for path in fa:
        assert fa[path].dtype == fb[path].dtype, path
        np.testing.assert_array_equal(np.asarray(fa[path]), np.asarray(fb[path]), err_msg=str(path))


# --------------------------------------------------------------------------------------------
# Official shapes


def test_golden_file_is_what_the_script_writes():
    spec = importlib.util.spec_from_file_location(
        "write_vision_golden", ROOT / "scripts" / "write_vision_golden.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert GOLDEN_PATH.read_text() == script.render(), (
        "tests/golden/vision_shapes.json is stale: run python scripts/write_vision_golden.py"
    )


def test_vision_presets_are_the_gemma3_4b_12b_27b():
    # (A Transformer is built without the encoder unless asked, so the text golden tests of
    # tests/test_presets.py keep seeing text-only trees for these presets.)
    assert set(VISION_PRESETS) == set(GOLDEN) == {"gemma3-4b", "gemma3-12b", "gemma3-27b"}
    assert all(PRESETS[name].vision is None for name in PRESETS if name not in GOLDEN)


@pytest.mark.parametrize("name", ["gemma3-4b", "gemma3-12b", "gemma3-27b"])
def test_vision_shapes_equal_golden(name):
    got = _shapes(official.canonical_to_flat(official.abstract_vision_params(PRESETS[name])))
    want = GOLDEN[name]["params"]
    assert got.keys() == want.keys(), (
        sorted(got.keys() - want.keys())[:3],
        sorted(want.keys() - got.keys())[:3],
    )
    wrong = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not wrong, f"{len(wrong)} modules differ, e.g. {list(wrong.items())[:3]}"
    vision = PRESETS[name].vision
    dims = GOLDEN[name]["dims"]
    assert (
        vision.width,
        vision.depth,
        vision.mlp_dim,
        vision.num_heads,
        vision.patch_size,
        vision.image_size,
        vision.num_patches,
        vision.num_soft_tokens,
    ) == tuple(dims[k] for k in ("W", "depth", "F", "N", "p", "S", "P", "M"))


def test_whole_4b_model_with_vision_equals_both_golden_tables():
    """The full 4B Transformer built with vision (eval_shape of all ~4.3B parameters): its flat
    tree is exactly the text golden table plus the vision one, float32 encoder."""
    abstract = official.abstract_params(PRESETS["gemma3-4b"], jnp.bfloat16, vision=True)
    flat = official.canonical_to_flat(abstract)
    want = {**TEXT_GOLDEN["gemma3-4b"]["params"], **GOLDEN["gemma3-4b"]["params"]}
    assert _shapes(flat) == want
    dtypes = {
        module.split("/")[0]: {str(x.dtype) for x in leaves.values()}
        for module, leaves in flat.items()
    }
    assert dtypes["SigLiPFromPatches_0"] == {"float32"}
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))
    assert count == TEXT_GOLDEN["gemma3-4b"]["param_count"] + GOLDEN["gemma3-4b"]["param_count"]


def test_vision_config_checks():
    text_only = PRESETS["gemma3-1b"]
    with pytest.raises(ConfigError, match="vision_config is set but has_vision is False"):
        text_only.replace(vision_config=TINY_VISION)
    from gemma_kit.transformer import Transformer

    with pytest.raises(ConfigError, match="has no image encoder"):
        nnx.eval_shape(lambda: Transformer(text_only, with_vision=True))
    with pytest.raises(ConfigError, match="must be a square"):
        TINY_VISION.__class__(num_soft_tokens=200)
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        TINY_VISION.__class__(image_size=900)


def test_encoder_size_matches_the_report():
    # Gemma 3 report (arXiv 2503.19786) Table 1: a 417M-parameter vision encoder.
    for name in GOLDEN:
        assert GOLDEN[name]["encoder_param_count"] == pytest.approx(417e6, rel=5e-3)


# --------------------------------------------------------------------------------------------
# Round trips and loading


@pytest.fixture(scope="module")
def vision_model():
    return random_vision_model(tiny_vision_config())


@pytest.mark.parametrize("layout", ["flat", "nested"])
def test_round_trip_with_vision(vision_model, layout, tmp_path):
    path = save_checkpoint(vision_model, tmp_path / "ckpt", layout=layout)
    loaded = load_model(path, preset=vision_model.config)
    assert loaded.has_vision
    _assert_same(_params(loaded), _params(vision_model))
    _, _, info = official.load_params(path, vision_model.config, vision=True)
    assert info["layout"] == layout and info["has_vision"] and info["vision_loaded"]
    text_only = load_model(path, preset=vision_model.config, text_only=True)
    assert not text_only.has_vision and "mm_input_projection" not in _params(text_only)["embedder"]
    with pytest.raises(ImageError, match="no image encoder"):
        text_only(jnp.zeros((1, 8), jnp.int32), images=jnp.asarray(random_pixels(1)[None, :]))


def test_flat_checkpoint_has_the_released_names(vision_model, tmp_path):
    save_checkpoint(vision_model, tmp_path / "ckpt", layout="flat")
    tree = ocp.PyTreeCheckpointer().restore(tmp_path / "ckpt")
    root = "SigLiPFromPatches_0/siglip_encoder"
    W, N, H = TINY_VISION.width, TINY_VISION.num_heads, TINY_VISION.head_dim
    assert tree[root]["pos_embedding"].shape == (1, 16, W)
    assert tree[f"{root}/embedding"]["kernel"].shape == (7, 7, 3, W)
    attn = f"{root}/Transformer/encoderblock_1/MultiHeadDotProductAttention_0"
    assert tree[f"{attn}/query"]["kernel"].shape == (W, N, H)
    assert tree[f"{attn}/out"]["kernel"].shape == (N, H, W)
    assert set(tree[f"{root}/Transformer/encoder_norm"]) == {"scale", "bias"}
    assert tree["transformer/embedder/mm_input_projection"]["w"].shape == (W, 32)
    assert set(tree["transformer/embedder"]) == {"input_embedding"}
    np.testing.assert_array_equal(
        tree[f"{attn}/key"]["bias"],
        vision_model.vision_encoder.siglip_encoder.Transformer.encoderblock_1.MultiHeadDotProductAttention_0.key.bias[
            ...
        ],
    )


def test_released_layout_text_bf16_vision_f32(vision_model, tmp_path):
    """As released: text weights bfloat16, the encoder float32, written by plain Orbax. The
    encoder stays float32 even when the text is loaded (or cast) to bfloat16."""
    flat = official.canonical_to_flat(jax.tree.map(np.asarray, _params(vision_model)))
    tree = {
        module: {
            leaf: value.astype(jnp.bfloat16)
            if module.startswith("transformer/") and "mm_" not in module
            else value
            for leaf, value in leaves.items()
        }
        for module, leaves in flat.items()
    }
    ocp.PyTreeCheckpointer().save(tmp_path / "released", tree)
    for dtype in (None, jnp.bfloat16):
        loaded = load_model(tmp_path / "released", preset=vision_model.config, dtype=dtype)
        params = _params(loaded)
        assert params["layer_0"]["attn"]["q_einsum"]["w"].dtype == jnp.bfloat16
        assert {x.dtype for x in jax.tree.leaves(params["vision_encoder"])} == {
            jnp.dtype(jnp.float32)
        }
        assert params["embedder"]["mm_input_projection"]["w"].dtype == jnp.float32
        np.testing.assert_array_equal(
            params["vision_encoder"]["siglip_encoder"]["pos_embedding"],
            _params(vision_model)["vision_encoder"]["siglip_encoder"]["pos_embedding"],
        )


def test_mismatched_vision_encoder_is_a_clear_error(vision_model, tmp_path):
    save_checkpoint(vision_model, tmp_path / "ckpt")
    other = vision_model.config.replace(
        vision_config=TINY_VISION.__class__(
            width=16,
            depth=3,
            mlp_dim=24,
            num_heads=2,
            patch_size=7,
            image_size=28,
            num_soft_tokens=4,
        )
    )
    with pytest.raises(CheckpointError, match="image encoder.*encoderblock_2.*missing.*text_only"):
        load_model(tmp_path / "ckpt", preset=other)
    assert not load_model(tmp_path / "ckpt", preset=other, text_only=True).has_vision


def test_text_only_checkpoint_gives_a_text_only_model(vision_model, tmp_path):
    from tests.support.tiny import random_model

    text = random_model(vision_model.config)  # same config, built without the encoder
    save_checkpoint(text, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt", preset=vision_model.config)
    assert not loaded.has_vision
