"""gemma_kit.sharding: specs by parameter name, and sharded models that compute what unsharded
ones do.

The rules are checked in this process on the full-size presets' abstract shapes (no arrays, no
devices). Running sharded needs several devices, and a process fixes its device count when JAX
starts (this one already has 1), so those checks run in a child process with 8 fake CPU devices
(tests/support/sharding_worker.py), which rebuilds the same tiny models from seeds and reports
what it saw as JSON; the assertions are here.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gemma_kit.config import get_preset
from gemma_kit.errors import ConfigError
from gemma_kit.sharding import make_mesh, param_specs, shard_model, shard_params, spec_for
from gemma_kit.transformer import Transformer
from tests.support import workers


def _abstract_params(config):
    return nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Transformer(config)), nnx.Param))


def _specs(preset, **axes):
    return param_specs(
        _abstract_params(get_preset(preset)), {**dict(data=1, fsdp=1, tensor=1), **axes}
    )


# --------------------------------------------------------------------------------------------
# Rules, on real sizes.


def test_default_rules_on_gemma3_1b():
    specs = _specs("gemma3-1b", fsdp=2, tensor=4)  # N=4, K=1, D=1152, F=6912, V=262144
    layer = specs["layer_0"]
    assert specs["embedder"]["input_embedding"] == P("tensor", "fsdp")
    assert layer["attn"]["q_einsum"]["w"] == P("tensor", "fsdp")  # [N, D, H]
    assert layer["attn"]["kv_einsum"]["w"] == P(None, None, "fsdp")  # one kv head: not split
    assert layer["attn"]["attn_vec_einsum"]["w"] == P("tensor", None, "fsdp")
    assert layer["mlp"]["gating_einsum"]["w"] == P(None, "tensor", "fsdp")  # [2, F, D]
    assert layer["mlp"]["linear"]["w"] == P("tensor", "fsdp")
    for norm in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm"):
        assert layer[norm]["scale"] == P()
    assert layer["attn"]["_query_norm"]["scale"] == P() and specs["final_norm"]["scale"] == P()
    # Every layer gets the same specs.
    assert all(specs[f"layer_{i}"] == layer for i in range(26))


def test_default_rules_on_gemma2_layouts():
    specs = _specs("gemma2-2b", fsdp=4, tensor=2)  # N=8, K=4, D=2304, F=9216, gating [2, D, F]
    layer = specs["layer_0"]
    assert layer["mlp"]["gating_einsum"]["w"] == P(None, "fsdp", "tensor")
    assert layer["attn"]["kv_einsum"]["w"] == P(None, "tensor", "fsdp")  # K=4 splits over 2
    assert _specs("gemma2-9b", tensor=8)["layer_0"]["mlp"]["gating_einsum"]["w"] == P(
        None, "tensor"
    )  # [2, F, D]; fsdp of size 1 splits nothing and is left out
    # N == K: the fused [3, N, D, H] qkv_einsum (the official name when heads are not grouped).
    mha = get_preset("gemma2-2b").replace(num_kv_heads=8)
    qkv = param_specs(_abstract_params(mha), dict(fsdp=2, tensor=8))["layer_0"]["attn"]
    assert qkv["qkv_einsum"]["w"] == P(None, "tensor", "fsdp")


def test_indivisible_dimensions_stay_whole():
    specs = _specs("gemma3-1b", fsdp=5, tensor=3)
    layer = specs["layer_0"]
    # 262144 and 4 heads are not multiples of 3, 1152 is not a multiple of 5; 6912 = 3 * 2304.
    assert specs["embedder"]["input_embedding"] == P()
    assert layer["attn"]["q_einsum"]["w"] == P()
    assert layer["mlp"]["gating_einsum"]["w"] == P(None, "tensor")
    assert layer["mlp"]["linear"]["w"] == P("tensor")
    # Everything is replicated on a data-only mesh.
    flat = jax.tree.leaves(_specs("gemma3-270m", data=8), is_leaf=lambda x: isinstance(x, P))
    assert flat and all(s == P() for s in flat)


def test_custom_rules_come_first_and_are_checked():
    axes = dict(data=2, fsdp=2, tensor=2)
    # A tuple of axes splits one dimension over their product.
    rules = [(r"embedder/input_embedding$", (("tensor", "fsdp"), None))]
    assert spec_for("embedder/input_embedding", (256, 32), axes, rules) == P(("tensor", "fsdp"))
    assert spec_for("layer_0/mlp/linear/w", (48, 32), axes, rules) == P("tensor", "fsdp")
    assert spec_for("vision/some/new/w", (8, 8), axes) == P()  # no rule: replicated
    with pytest.raises(ConfigError, match="gives 1 axes for layer_0/mlp/linear/w of shape"):
        spec_for("layer_0/mlp/linear/w", (48, 32), axes, [(r"linear/w$", ("tensor",))])
    with pytest.raises(ConfigError, match="names mesh axis 'model'"):
        spec_for("layer_0/mlp/linear/w", (48, 32), axes, [(r"linear/w$", ("model", None))])
    with pytest.raises(ConfigError, match="uses mesh axis 'tensor' twice"):
        spec_for("layer_0/mlp/linear/w", (48, 32), axes, [(r"linear/w$", ("tensor", "tensor"))])


def test_make_mesh_checks_the_device_count():
    mesh = make_mesh()
    assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.devices.shape == (1, 1, 1)
    with pytest.raises(ConfigError, match="needs 2 devices but 1 are available"):
        make_mesh(tensor=2)
    with pytest.raises(ConfigError, match="mesh axis 'fsdp' must be an integer >= 1, got 0"):
        make_mesh(fsdp=0)


def test_shard_params_keeps_the_structure_and_leaves_the_input_alone(
    tiny_gemma3_config, tiny_model
):
    model = tiny_model(tiny_gemma3_config)
    state = nnx.state(model, nnx.Param)
    mesh = make_mesh()
    sharded = shard_params(state, mesh)
    assert isinstance(sharded, nnx.State) and sharded is not state
    w = sharded["layer_0"]["attn"]["q_einsum"]["w"][...]
    assert isinstance(w.sharding, NamedSharding) and w.sharding.mesh == mesh
    before = state["layer_0"]["attn"]["q_einsum"]["w"][...]
    assert not isinstance(before.sharding, NamedSharding)  # the given state was not changed
    np.testing.assert_array_equal(w, before)
    # A plain dict of numpy arrays (a checkpoint tree) comes back as sharded jax arrays.
    tree = jax.tree.map(np.asarray, nnx.to_pure_dict(state))
    placed = shard_params(tree, mesh)
    assert jax.tree.structure(placed) == jax.tree.structure(tree)
    assert all(
        isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding)
        for x in jax.tree.leaves(placed)
    )
    with pytest.raises(TypeError, match="dict of arrays or an nnx.State"):
        shard_params([1, 2], mesh)
    # shard_model moves a model's own parameters, in place.
    assert shard_model(model, mesh) is model
    assert isinstance(model.layer_0.mlp.linear.w[...].sharding, NamedSharding)


# --------------------------------------------------------------------------------------------
# Sharded models on 8 devices.


MAIN = dict(data=1, fsdp=2, tensor=4)
DATA = dict(data=8, fsdp=1, tensor=1)


_REPORT: dict = {}  # one child process serves every test below; the conftest factory is per-test


@pytest.fixture
def report(tmp_path_factory):
    if "report" in _REPORT:
        return _REPORT["report"]
    job = dict(
        prompts=["The for statement is used to iterate", "Loop"],
        max_new_tokens=12,
        cases=[
            # shard_model (nnx.update with shard_params of its state), then the CPU Sampler's
            # default matvec copy of the sharded weights.
            dict(family="gemma3", seed=1, via="model", matvec=True, meshes=[MAIN, DATA]),
            # A checkpoint dict sharded -> model_from_params, and no matvec copy (the
            # accelerator default): the sharded arrays go into the compiled steps as they are.
            dict(family="gemma2", seed=2, via="dict", matvec=False, meshes=[MAIN]),
        ],
    )
    folder = tmp_path_factory.mktemp("sharding")
    _REPORT["report"] = workers.run("sharding_worker", job, folder, devices=8)
    return _REPORT["report"]


def _case(report, name, mesh, via):
    return next(
        c for c in report["cases"] if c["name"] == name and c["mesh"] == mesh and c["via"] == via
    )


def test_child_has_eight_devices(report):
    assert report["devices"] == 8 and len(report["cases"]) == 3


@pytest.mark.parametrize(
    "name, mesh, via",
    [
        ("gemma3", MAIN, "model"),
        ("gemma3", DATA, "model"),
        ("gemma2", MAIN, "dict"),
    ],
    ids=["gemma3-fsdp2-tensor4", "gemma3-data8", "gemma2-fsdp2-tensor4-from-dict"],
)
def test_sharded_generation_and_logits_equal_unsharded(report, name, mesh, via):
    case = _case(report, name, mesh, via)
    assert case["tokens"] == case["reference_tokens"]
    assert all(len(t) == 12 for t in case["tokens"])
    assert case["logprob_diff"] <= 1e-5
    # Sharded matmuls sum in another order: float32 rounding only (measured 4-5e-6 on logits
    # of scale ~10).
    assert case["logits_diff"] <= 1e-5


def test_parameters_really_are_sharded(report):
    params = _case(report, "gemma3", MAIN, "model")["params"]
    expect = {  # [shape] -> spec, shard shape on the fsdp=2 x tensor=4 mesh
        "embedder/input_embedding": (["tensor", "fsdp"], [96, 16]),  # [384, 32]
        "layer_0/attn/q_einsum/w": (["tensor", "fsdp"], [1, 16, 16]),  # [4, 32, 16]
        "layer_0/attn/kv_einsum/w": ([None, None, "fsdp"], [2, 2, 16, 16]),  # K=2: not by 4
        "layer_0/attn/attn_vec_einsum/w": (["tensor", None, "fsdp"], [1, 16, 16]),
        "layer_0/mlp/gating_einsum/w": ([None, "tensor", "fsdp"], [2, 12, 16]),  # [2, 48, 32]
        "layer_0/mlp/linear/w": (["tensor", "fsdp"], [12, 16]),
        "layer_2/attn/_key_norm/scale": ([], [16]),
        "final_norm/scale": ([], [32]),
    }
    for path, (spec, shard) in expect.items():
        assert (params[path]["spec"], params[path]["shard_shape"]) == (spec, shard), path
    assert all(p["devices"] == 8 for p in params.values())
    assert params["layer_0/attn/q_einsum/w"]["distinct_shards"] == 8
    assert params["layer_0/attn/kv_einsum/w"]["distinct_shards"] == 2

    gemma2 = _case(report, "gemma2", MAIN, "dict")["params"]
    assert gemma2["layer_0/attn/qkv_einsum/w"]["spec"] == [None, "tensor", "fsdp"]
    assert gemma2["layer_0/mlp/gating_einsum/w"]["spec"] == [None, "fsdp", "tensor"]  # [2, D, F]
    assert gemma2["layer_0/mlp/gating_einsum/w"]["shard_shape"] == [2, 16, 12]

    replicated = _case(report, "gemma3", DATA, "model")["params"]
    assert all(
        p["spec"] == [] and p["distinct_shards"] == 1 and p["devices"] == 8
        for p in replicated.values()
    )


def test_the_samplers_weights_stay_sharded(report):
    # The CPU Sampler decodes from a transposed copy of the weights; the copy keeps the split.
    copy = _case(report, "gemma3", MAIN, "model")["sampler_params"]
    assert copy["layer_0/attn/q_einsum/w"]["distinct_shards"] == 8
    assert copy["layer_0/mlp/linear/w"]["distinct_shards"] == 8
    direct = _case(report, "gemma2", MAIN, "dict")["sampler_params"]
    assert direct["layer_0/mlp/linear/w"]["spec"] == ["tensor", "fsdp"]
