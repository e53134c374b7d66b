"""Every preset against the official parameter shapes, preset inference, config validation.

The golden table (tests/golden/preset_shapes.json) is written by scripts/write_preset_golden.py
from numbers copied out of the official code, without gemma_kit: the comparison here is between
two independent derivations. Full-size models are only ever built with jax.eval_shape, so these
tests spend no memory on weights.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import pathlib

import jax
import pytest

from gemma_kit.checkpoint.official import (
    abstract_params,
    canonical_to_flat,
    check_shapes,
    flatten,
    infer_preset,
    split_layout,
)
from gemma_kit.config import PRESETS, GlobalAttention, LocalAttention, get_preset
from gemma_kit.errors import CheckpointError, ConfigError

ROOT = pathlib.Path(__file__).resolve().parent.parent
GOLDEN_PATH = ROOT / "tests" / "golden" / "preset_shapes.json"
GOLDEN = json.loads(GOLDEN_PATH.read_text())["presets"]

# Published sizes, for a sanity check of the golden counts against the outside world:
# (embedding, non-embedding) parameters and the relative tolerance their rounding needs.
# Gemma 2: exact, Table 1 of the Gemma 2 report (arXiv 2408.00118). Gemma 3: millions, Table 1
# of the Gemma 3 report (arXiv 2503.19786), text only (the vision encoder is listed apart; its
# 4B embedding count is 0.6% above V * D). Gemma 3 270M: "170M embedding parameters and 100M
# for the transformer blocks" in the model announcement (two significant digits).
PUBLISHED = {
    "gemma2-2b": (590_118_912, 2_024_517_888, 0.0),
    "gemma2-9b": (917_962_752, 8_324_201_984, 0.0),
    "gemma2-27b": (1_180_237_824, 26_047_480_320, 0.0),
    "gemma3-270m": (170e6, 100e6, 0.02),
    "gemma3-1b": (302e6, 698e6, 0.01),
    "gemma3-4b": (675e6, 3_209e6, 0.01),
    "gemma3-12b": (1_012e6, 10_759e6, 0.01),
    "gemma3-27b": (1_416e6, 25_600e6, 0.01),
}

# The expected totals, as recorded in the golden file (text weights; the output projection is
# tied to the embedding and counted once). Written out so that a change of the golden file that
# moves a count shows up as a diff here too.
EXPECTED_COUNTS = {
    "gemma2-2b": 2_614_636_800,
    "gemma2-9b": 9_242_164_736,
    "gemma2-27b": 27_227_718_144,
    "gemma3-270m": 268_098_176,
    "gemma3-1b": 999_885_952,
    "gemma3-4b": 3_880_099_328,
    "gemma3-12b": 11_765_788_416,
    "gemma3-27b": 27_009_002_240,
}


@functools.cache
def _abstract(name: str):
    # eval_shape of the 62-layer 27B takes ~2 s; several tests share it.
    return abstract_params(get_preset(name))


def _as_golden(flat_tree) -> dict[str, dict[str, list[int]]]:
    return {
        module: {leaf: list(x.shape) for leaf, x in leaves.items()}
        for module, leaves in flat_tree.items()
    }


def _golden_as_abstract(name: str):
    """The golden flat tree as ShapeDtypeStructs, the way read_metadata returns a checkpoint."""
    return {
        module: {
            leaf: jax.ShapeDtypeStruct(tuple(shape), "bfloat16") for leaf, shape in leaves.items()
        }
        for module, leaves in GOLDEN[name]["params"].items()
    }


# --------------------------------------------------------------------------------------------
# The golden table itself


def test_golden_file_is_what_the_script_writes():
    spec = importlib.util.spec_from_file_location(
        "write_preset_golden", ROOT / "scripts" / "write_preset_golden.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert GOLDEN_PATH.read_text() == script.render(), (
        "tests/golden/preset_shapes.json is stale: run python scripts/write_preset_golden.py"
    )


def test_golden_covers_every_preset():
    assert set(GOLDEN) == set(PRESETS)


@pytest.mark.parametrize("name", list(PRESETS))
def test_config_numbers_equal_golden_dims(name):
    # Redundant with the shape test below, but a failure here names the wrong field directly.
    config, dims = get_preset(name), GOLDEN[name]["dims"]
    got = (
        config.vocab_size,
        config.embed_dim,
        config.hidden_dim,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.num_layers,
    )
    assert got == tuple(dims[k] for k in "VDFNKHL")
    assert config.transpose_gating == dims["transpose_gating"]
    assert config.use_qk_norm == dims["qk_norm"]


# --------------------------------------------------------------------------------------------
# Shapes


@pytest.mark.parametrize("name", list(PRESETS))
def test_abstract_shapes_equal_golden(name):
    got = _as_golden(canonical_to_flat(_abstract(name)))
    want = GOLDEN[name]["params"]
    missing, extra = want.keys() - got.keys(), got.keys() - want.keys()
    assert not missing and not extra, f"missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]}"
    wrong = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not wrong, f"{len(wrong)} modules differ, e.g. {list(wrong.items())[:3]}"


@pytest.mark.parametrize("name", list(PRESETS))
def test_param_count(name):
    entry = GOLDEN[name]
    from_golden = sum(math.prod(s) for leaves in entry["params"].values() for s in leaves.values())
    from_model = sum(math.prod(x.shape) for x in jax.tree.leaves(_abstract(name)))
    assert entry["param_count"] == from_golden == from_model == EXPECTED_COUNTS[name]
    embedding, non_embedding, rel = PUBLISHED[name]
    V, D = entry["dims"]["V"], entry["dims"]["D"]
    assert entry["embedding_param_count"] == V * D
    assert V * D == pytest.approx(embedding, rel=rel, abs=0)
    assert entry["param_count"] - V * D == pytest.approx(non_embedding, rel=rel, abs=0)


def test_param_counts_match_model_names():
    # The rough sizes the models are known by.
    approx = {
        "gemma3-270m": 268e6,
        "gemma3-1b": 1.0e9,
        "gemma2-2b": 2.6e9,
        "gemma2-9b": 9.2e9,
        "gemma2-27b": 27.2e9,
        "gemma3-4b": 3.9e9,
        "gemma3-12b": 11.8e9,
        "gemma3-27b": 27.0e9,
    }
    for name, size in approx.items():
        assert GOLDEN[name]["param_count"] == pytest.approx(size, rel=0.02), name


# --------------------------------------------------------------------------------------------
# Preset inference


@pytest.mark.parametrize("name", list(PRESETS))
def test_infer_preset_from_abstract_shapes(name):
    assert infer_preset(_abstract(name)) is PRESETS[name]


@pytest.mark.parametrize("name", list(PRESETS))
def test_infer_preset_from_golden_checkpoint_tree(name):
    layout, params, vision = split_layout(_golden_as_abstract(name))
    assert layout == "flat" and not vision
    assert infer_preset(params) is PRESETS[name]
    # The flat -> canonical conversion gives exactly gemma_kit's own tree (compared with the
    # cached eval_shape rather than check_shapes, which would trace the model a second time).
    want = {path: x.shape for path, x in flatten(_abstract(name)).items()}
    assert {path: x.shape for path, x in flatten(params).items()} == want


def test_gemma2_2b_and_gemma3_1b_are_told_apart():
    assert GOLDEN["gemma2-2b"]["dims"]["L"] == GOLDEN["gemma3-1b"]["dims"]["L"] == 26
    gemma2, gemma3 = _abstract("gemma2-2b"), _abstract("gemma3-1b")
    assert infer_preset(gemma2).name == "gemma2-2b"
    assert infer_preset(gemma3).name == "gemma3-1b"
    with pytest.raises(CheckpointError, match="does not match preset 'gemma3-1b'") as err:
        check_shapes(PRESETS["gemma3-1b"], gemma2)
    assert "match preset 'gemma2-2b'" in str(err.value)  # the hint names the right preset


def test_every_preset_has_a_distinct_signature():
    # No two presets may have the same shapes, or inference would be ambiguous.
    trees = {name: json.dumps(GOLDEN[name]["params"], sort_keys=True) for name in PRESETS}
    assert len(set(trees.values())) == len(PRESETS)


def test_infer_preset_rejects_a_tree_that_is_not_gemma():
    with pytest.raises(CheckpointError, match="Gemma parameter tree"):
        infer_preset({"dense": {"kernel": jax.ShapeDtypeStruct((4, 4), "float32")}})


# --------------------------------------------------------------------------------------------
# Preset names and Config validation


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        get_preset("gemma3-2b")
    message = str(err.value)
    assert "gemma3-2b" in message
    for name in PRESETS:
        assert name in message
    assert "Config" in message


@pytest.mark.parametrize("spelling", ["gemma3-1b", "Gemma3_1B", " GEMMA3-1B "])
def test_preset_names_are_forgiving(spelling):
    assert get_preset(spelling) is PRESETS["gemma3-1b"]


def test_get_preset_passes_a_config_through():
    config = PRESETS["gemma3-1b"].replace(name="mine")
    assert get_preset(config) is config


_BASE = PRESETS["gemma3-1b"]


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(num_heads=6, num_kv_heads=4), ["num_heads (6)", "multiple of", "num_kv_heads (4)"]),
        (dict(head_dim=255), ["head_dim", "even"]),
        (dict(vocab_size=0), ["vocab_size", "> 0", "got 0"]),
        (dict(embed_dim=0), ["embed_dim", "> 0"]),
        (dict(hidden_dim=0), ["hidden_dim", "> 0"]),
        (dict(num_heads=0), ["num_heads", "> 0"]),
        (dict(num_kv_heads=0), ["num_kv_heads", "> 0"]),
        (dict(head_dim=-2), ["head_dim", "> 0", "got -2"]),
        (dict(layers=()), ["at least one layer"]),
        (dict(layers=("global",)), ["GlobalAttention/LocalAttention"]),
        (dict(family="gemma4"), ["family", "gemma4"]),
        (dict(attn_logit_softcap=0.0), ["attn_logit_softcap", "> 0"]),
    ],
)
def test_config_validation_messages(changes, words):
    with pytest.raises(ConfigError) as err:
        _BASE.replace(name="bad", **changes)
    message = str(err.value)
    assert "'bad'" in message  # names the config
    for word in words:
        assert word in message


def test_sliding_window_must_be_positive():
    with pytest.raises(ConfigError, match="window must be >= 1"):
        LocalAttention(0)


def test_layer_patterns():
    # Gemma 2 alternates local/global starting local; Gemma 3 repeats 5 local + 1 global.
    g2 = PRESETS["gemma2-2b"].layers
    assert [k.is_local for k in g2[:4]] == [True, False, True, False]
    g3 = PRESETS["gemma3-1b"].layers
    assert [i for i, k in enumerate(g3) if not k.is_local] == [5, 11, 17, 23]
    glob = g3[5]
    assert isinstance(glob, GlobalAttention) and glob.rope_base == 1_000_000.0
    assert PRESETS["gemma3-4b"].layers[5].rope_scale == 8.0
    assert PRESETS["gemma3-1b"].layers[5].rope_scale == 1.0
