"""Hugging Face interop: safetensors import and export against real transformers models.

Tiny random Gemma2ForCausalLM, Gemma3ForCausalLM and Gemma3ForConditionalGeneration models are
built from configs (nothing is downloaded), saved with transformers' own save_pretrained
(sharded, with an index), converted into gemma_kit's official Orbax layout, exported back, and
loaded again with from_pretrained. Tolerances: tensors bit-exact (float32 all the way), logits
within 1e-4 of transformers' (observed ~1e-5: float32 summation order).
"""

from __future__ import annotations

import json
import pathlib
import pickle
import tracemalloc

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="the interop tests need the [test] extra (torch)")
transformers = pytest.importorskip("transformers", reason="the interop tests need transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="needs the [hf] extra")

from gemma_kit.checkpoint import hf, official  # noqa: E402
from gemma_kit.checkpoint.hf_export import export_hf  # noqa: E402
from gemma_kit.checkpoint.hf_import import convert_hf, read_hf  # noqa: E402
from gemma_kit.checkpoint.safetensors_io import HFFolder  # noqa: E402
from gemma_kit.cli import main  # noqa: E402
from gemma_kit.config import PRESETS  # noqa: E402
from gemma_kit.errors import CheckpointError, ConversionError  # noqa: E402
from gemma_kit.loading import load_model  # noqa: E402
from tests.support import logits  # noqa: E402

ATOL = 1e-4
SEQ = 16  # longer than the window (5): local layers really slide
TOKENS = np.random.default_rng(1).integers(0, 97, (2, SEQ))
TEXT = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=40,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    sliding_window=5,
    query_pre_attn_scalar=16,
)
VISION = dict(
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
    vision_use_head=False,
)  # Gemma 3's SigLIP: no head

# name -> (class, text config overrides). Each family once with grouped-query attention, plus
# Gemma 2 with multi-head attention (the fused qkv_einsum) and soft-caps.
CASES = {
    "Gemma2ForCausalLM-mha-softcaps": (
        "gemma2",
        dict(
            num_hidden_layers=3,
            num_key_value_heads=4,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=4.0,
        ),
    ),
    "Gemma3ForCausalLM-gqa": ("gemma3", dict(num_hidden_layers=7)),
    "Gemma3ForConditionalGeneration-mqa": (
        "gemma3mm",
        dict(num_hidden_layers=6, num_key_value_heads=1),
    ),
}


def _randomize(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Norm scales too, so the (1 + scale) convention is exercised; logits O(1..10).
            p.normal_(0.0, 0.5 if "norm" in name else 0.15)
    return model.eval()


def _hf_model(kind: str, **overrides):
    text = {**TEXT, **overrides}
    if kind == "gemma2":
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**text))
    elif kind == "gemma3":
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**text))
    else:
        model = transformers.Gemma3ForConditionalGeneration(
            transformers.Gemma3Config(text_config=text, vision_config=VISION, mm_tokens_per_image=4)
        )
    model.config._attn_implementation = "eager"
    return _randomize(model)


def _save(model, folder: pathlib.Path, shard: str = "40KB") -> pathlib.Path:
    model.save_pretrained(folder, max_shard_size=shard)
    return folder


def _ours(model, tokens=TOKENS) -> np.ndarray:
    return logits.ours(model, tokens)


def _hf_logits(model, tokens=TOKENS) -> np.ndarray:
    return logits.theirs(model, tokens)


def _from_pretrained(folder):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    return model.eval()


def _tensors(folder: pathlib.Path) -> dict[str, np.ndarray]:
    out = {}
    for file in folder.glob("*.safetensors"):
        out.update(safetensors_numpy.load_file(file))
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each case built once: name -> (HF model, its save_pretrained folder)."""
    root = tmp_path_factory.mktemp("hf")
    return {
        name: (m := _hf_model(kind, **overrides), _save(m, root / name))
        for name, (kind, overrides) in CASES.items()
    }


# --------------------------------------------------------------------------------------------
# The name table


@pytest.mark.parametrize("case", sorted(CASES))
def test_table_consumes_every_tensor_and_produces_every_parameter(saved, case):
    hf_model, folder = saved[case]
    config = hf.config_from_hf(hf_model.config)
    with HFFolder(folder) as tensors:
        names = set(tensors)
        prefix = hf.find_prefix(names)
    rules = hf.text_rules(config)
    from_rules = [prefix + n for rule in rules for n in rule.hf]
    assert len(from_rules) == len(set(from_rules))  # no HF tensor used twice
    text = {n for n in names if not hf.is_vision_key(n)}
    assert set(from_rules) == text
    assert any(hf.is_vision_key(n) for n in names) == case.startswith("Gemma3ForConditional")
    expected = set(official.flatten(official.abstract_params(config)))
    paths = [rule.path for rule in rules]
    assert len(paths) == len(set(paths)) and set(paths) == expected


@pytest.mark.parametrize(
    "layout, hf_shape",
    [
        ("(N H) D -> N D H", (4 * 16, 32)),
        ("D (N H) -> N H D", (32, 4 * 16)),
        ("D F -> F D", (32, 40)),
        ("F D -> D F", (40, 32)),
        ("D -> D", (32,)),
    ],
)
def test_each_layout_is_its_own_inverse(layout, hf_shape):
    sizes = dict(N=4, H=16, D=32, F=40)
    for names in (("a",), ("a", "b")):
        rule = hf.Rule(("x",), names, layout)
        tensors = [np.random.default_rng(i).normal(size=hf_shape) for i in range(len(names))]
        value = rule.to_gemma(tensors, sizes)
        assert value.shape == rule.shape(sizes)
        for back, original in zip(rule.to_hf(value, sizes), tensors):
            np.testing.assert_array_equal(back, original)


def test_a_foreign_tensor_in_the_folder_is_not_consumed(saved, tmp_path):
    hf_model, _ = saved["Gemma3ForCausalLM-gqa"]
    state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    state["model.layers.0.self_attn.rotary.weight"] = np.zeros(3, np.float32)
    hf_model.config.save_pretrained(tmp_path)
    safetensors_numpy.save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="1 Hugging Face tensors were not consumed.*rotary"):
        read_hf(tmp_path)


# --------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_configs_survive_the_hf_config_and_transformers(name):
    preset = PRESETS[name]
    written = hf.config_to_hf(preset)
    assert hf.config_from_hf(written) == preset
    cls = transformers.Gemma2Config if preset.family == "gemma2" else transformers.Gemma3TextConfig
    assert hf.config_from_hf(cls(**written)) == preset  # as transformers reads the file


def test_defaults_are_transformers_defaults():
    for cls, defaults in (
        (transformers.Gemma2Config, hf.HF_DEFAULTS["gemma2"]),
        (transformers.Gemma3TextConfig, hf.HF_DEFAULTS["gemma3_text"]),
    ):
        theirs = cls()
        for key, value in defaults.items():
            if key in ("rope_theta", "rope_local_base_freq", "sliding_window_pattern"):
                continue  # folded into rope_parameters / layer_types below
            assert getattr(theirs, key) == value, (cls.__name__, key)
        ours = hf.config_from_hf(defaults | {"model_type": cls.model_type})
        assert hf.config_from_hf(theirs).replace(name="x") == ours.replace(name="x")


# config.json files as the Hub has them (transformers 4.4x/4.50 format: rope_theta,
# rope_local_base_freq, rope_scaling, sliding_window_pattern; the multimodal one gives only a
# few text fields and relies on the defaults).
HUB_CONFIGS = {
    "gemma2-9b": {
        "architectures": ["Gemma2ForCausalLM"],
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "head_dim": 256,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 3584,
        "intermediate_size": 14336,
        "max_position_embeddings": 8192,
        "model_type": "gemma2",
        "num_attention_heads": 16,
        "num_hidden_layers": 42,
        "num_key_value_heads": 8,
        "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "torch_dtype": "float32",
        "vocab_size": 256000,
    },
    "gemma3-1b": {
        "architectures": ["Gemma3ForCausalLM"],
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 1152,
        "intermediate_size": 6912,
        "max_position_embeddings": 32768,
        "model_type": "gemma3_text",
        "num_attention_heads": 4,
        "num_hidden_layers": 26,
        "num_key_value_heads": 1,
        "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06,
        "rope_local_base_freq": 10000,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "vocab_size": 262144,
    },
    "gemma3-4b": {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "mm_tokens_per_image": 256,
        "image_token_index": 262144,
        "text_config": {
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "model_type": "gemma3_text",
            "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024,
        },
        "vision_config": {
            "hidden_size": 1152,
            "image_size": 896,
            "intermediate_size": 4304,
            "model_type": "siglip_vision_model",
            "num_attention_heads": 16,
            "num_hidden_layers": 27,
            "patch_size": 14,
            "vision_use_head": False,
        },
    },
}


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_hub_config_files_give_the_official_preset(name):
    raw = HUB_CONFIGS[name]
    assert hf.config_from_hf(raw) == PRESETS[name]
    cls = {
        "gemma2": transformers.Gemma2Config,
        "gemma3_text": transformers.Gemma3TextConfig,
        "gemma3": transformers.Gemma3Config,
    }[raw["model_type"]]
    assert hf.config_from_hf(cls(**raw)) == PRESETS[name]  # transformers reads it the same way


def test_configs_transformers_cannot_express_are_refused():
    local = PRESETS["gemma3-1b"].layers[0]
    mixed = PRESETS["gemma3-1b"].replace(
        layers=(local, local.__class__(64), *PRESETS["gemma3-1b"].layers[2:])
    )
    with pytest.raises(ConversionError, match="sliding windows differ between layers"):
        hf.config_to_hf(mixed)
    with pytest.raises(ConversionError, match="not a Gemma 2 or Gemma 3 model"):
        hf.config_from_hf({"model_type": "llama", "hidden_size": 32})
    with pytest.raises(ConversionError, match="use_bidirectional_attention"):
        hf.config_from_hf({**HUB_CONFIGS["gemma3-1b"], "use_bidirectional_attention": True})


# --------------------------------------------------------------------------------------------
# HF -> gemma_kit -> HF


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_to_gemma_kit_to_hf(saved, case, tmp_path):
    hf_model, folder = saved[case]
    assert (folder / "model.safetensors.index.json").is_file()  # sharded, as big checkpoints are
    reference = _hf_logits(hf_model)
    assert np.abs(reference).max() > 1.0, "weights too small for the comparison to mean much"

    # Straight into a model: logits equal transformers'.
    model = load_model(folder)
    # The image encoder of a Gemma3ForConditionalGeneration comes along.
    assert model.has_vision == ("Conditional" in case)
    np.testing.assert_allclose(_ours(model), reference, atol=ATOL, rtol=0)

    # Into the official Orbax layout, and from there back out as a Hugging Face folder.
    converted, config, info = convert_hf(folder, tmp_path / "gemma_kit", progress=False)
    assert info["skipped_vision"] == 0  # the vision tower is converted, not skipped
    assert config.has_vision == ("Conditional" in case)
    exported = export_hf(
        converted, tmp_path / "hf", preset=config, max_shard_size=30_000, progress=False
    )
    assert (exported / "model.safetensors.index.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left

    # Bit-exact text tensors (under the causal LM's names).
    original = {k: v for k, v in _tensors(folder).items() if not hf.is_vision_key(k)}
    prefix = hf.find_prefix(original)
    written = _tensors(exported)
    assert set(written) == {"model." + k[len(prefix) :] for k in original}
    for name, value in original.items():
        got = written["model." + name[len(prefix) :]]
        assert got.dtype == value.dtype == np.float32
        np.testing.assert_array_equal(got, value, err_msg=name)

    # transformers loads the export as a causal LM with the same logits.
    again = _from_pretrained(exported)
    assert type(again).__name__ == (
        "Gemma2ForCausalLM" if case.startswith("Gemma2") else "Gemma3ForCausalLM"
    )
    np.testing.assert_allclose(_hf_logits(again), reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "kind, hf_rows, official_rows",
    [
        ("gemma2", 256000, 256128),  # Gemma 2: the official table has 128 unused rows more
        ("gemma3mm", 262208, 262144),  # multimodal Gemma 3: HF has 64 rows more
    ],
)
def test_vocabulary_rows_are_padded_or_cut(kind, hf_rows, official_rows, tmp_path):
    hf_model = _hf_model(kind, vocab_size=hf_rows, num_hidden_layers=2)
    folder = _save(hf_model, tmp_path / "hf", shard="40MB")
    tokens = np.random.default_rng(2).integers(0, hf_rows, (1, 8))
    config, params, _ = read_hf(folder, progress=False)
    table = params["embedder"]["input_embedding"]
    assert config.vocab_size == table.shape[0] == official_rows
    original = hf_model.get_input_embeddings().weight.detach().numpy()
    rows = min(hf_rows, official_rows)
    np.testing.assert_array_equal(table[:rows], original[:rows])
    assert not table[rows:].any()  # padding rows are zero
    tokens = np.minimum(tokens, rows - 1)
    from gemma_kit.loading import model_from_params

    ours = _ours(model_from_params(config, params), tokens)
    np.testing.assert_allclose(
        ours[..., :rows], _hf_logits(hf_model, tokens)[..., :rows], atol=ATOL, rtol=0
    )

    exported = export_hf(params, tmp_path / "out", preset=config, progress=False)
    written = _tensors(exported)["model.embed_tokens.weight"]
    # Gemma 2 goes back to HF's 256000 rows exactly; Gemma 3 is exported as Gemma3ForCausalLM,
    # whose table is the official 262144 rows.
    assert written.shape[0] == (256000 if kind == "gemma2" else 262144)
    np.testing.assert_array_equal(written, original[: written.shape[0]])


# --------------------------------------------------------------------------------------------
# Streaming: memory holds one tensor (export) or the output plus one tensor (import)


def test_export_and_import_stream_tensor_by_tensor(tiny_gemma3_config, tiny_model, tmp_path):
    # Tensors of MBs, so that they, not the ~2 MB of Python objects Orbax keeps, show.
    config = tiny_gemma3_config.replace(
        embed_dim=512, hidden_dim=2048, vocab_size=512, layers=tiny_gemma3_config.layers * 2
    )
    model = tiny_model(config)
    ckpt = official.save_params(nnx_params(model), tmp_path / "ckpt")
    specs = hf.hf_tensor_specs(config, np.float32)
    largest = max(int(np.prod(s)) * 4 for _, s, _ in specs)
    total = sum(int(np.prod(s)) * 4 for _, s, _ in specs)
    layer = sum(int(np.prod(s)) * 4 for name, s, _ in specs if name.startswith("model.layers.0."))
    assert total > 5 * layer  # so that holding everything would show

    tracemalloc.start()
    try:
        export_hf(ckpt, tmp_path / "hf", preset=config, progress=False)
        _, export_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        _, params, _ = read_hf(tmp_path / "hf", preset=config, progress=False)
        _, import_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(
        f"largest tensor {largest / 1e6:.1f} MB, layer {layer / 1e6:.1f} MB, all "
        f"{total / 1e6:.1f} MB; peak: export {export_peak / 1e6:.1f} MB, import "
        f"{(import_peak - before) / 1e6:.1f} MB"
    )
    # Export: Orbax restores one layer; converting it copies at most a few tensors at a time.
    assert export_peak < layer + 3 * largest
    # Import: the output, plus the inputs of one parameter (two tensors) and their conversion.
    assert import_peak - before < total + 3 * largest


def nnx_params(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


# --------------------------------------------------------------------------------------------
# Bad input: one clear error, nothing half-written


def _no_output(tmp_path: pathlib.Path, out: pathlib.Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_bad_hf_folders(saved, tmp_path, capsys):
    _, good = saved["Gemma3ForCausalLM-gqa"]
    out = tmp_path / "out"

    def copy(name):
        import shutil

        return pathlib.Path(shutil.copytree(good, tmp_path / name))

    def fails(folder, message):
        assert main(["convert", "--hf", str(folder), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err
        _no_output(tmp_path, out)

    llama = copy("llama")
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    fails(llama, "model_type 'llama' is not a Gemma 2 or Gemma 3 model")

    shards = copy("missing-shard")
    (
        shards / "model-00002-of-{:05d}.safetensors".format(len(list(good.glob("*.safetensors"))))
    ).unlink()
    fails(shards, "lacks 1 of the shards its model.safetensors.index.json lists")

    truncated = copy("truncated")
    shard = sorted(truncated.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    fails(truncated, "incomplete or corrupt")

    quantized = tmp_path / "int8"
    quantized.mkdir()
    (quantized / "config.json").write_text((good / "config.json").read_text())
    state = {k: v for k, v in _tensors(good).items()}
    state["model.layers.0.mlp.down_proj.weight"] = state[
        "model.layers.0.mlp.down_proj.weight"
    ].astype(np.int8)
    safetensors_numpy.save_file(state, quantized / "model.safetensors", metadata={"format": "pt"})
    fails(quantized, "stored as ['I8']")

    wrong_shape = copy("wrong-shape")
    config = json.loads((wrong_shape / "config.json").read_text())
    (wrong_shape / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    fails(wrong_shape, "has shape (40, 32), but the config implies (48, 32)")

    fails(tmp_path / "nowhere", "no Hugging Face model folder at")


class _Payload:
    """Unpickling this creates a file: proof that a .bin was (or was not) unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickle_weights_are_refused_unread(saved, tmp_path):
    hf_model, _ = saved["Gemma3ForCausalLM-gqa"]
    folder = tmp_path / "bin"
    hf_model.config.save_pretrained(folder)
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ConversionError, match="never loads pickle files"):
        load_model(folder)
    assert not marker.exists()


def test_existing_output_folders(saved, tmp_path, capsys):
    _, folder = saved["Gemma2ForCausalLM-mha-softcaps"]
    convert_hf(folder, tmp_path / "gk", progress=False)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for argv in (
        ["convert", "--hf", str(folder)],
        ["export", "--to", "hf", "--ckpt", str(tmp_path / "gk")],
    ):
        assert main([*argv, "--out", str(mine)]) == 2
        assert (
            "already exists; choose another --out folder or pass --overwrite"
            in capsys.readouterr().err
        )
    assert main(["convert", "--hf", str(folder), "--out", str(mine), "--overwrite"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep me"

    config = hf.config_from_hf(json.loads((folder / "config.json").read_text()))
    _, params, _ = read_hf(folder, progress=False)
    first = export_hf(params, tmp_path / "export", preset=config, progress=False)
    with pytest.raises(CheckpointError, match="already exists"):
        export_hf(params, first, preset=config, progress=False)
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        export_hf(params, mine, preset=config, overwrite=True, progress=False)
    assert (mine / "notes.txt").read_text() == "keep me"
    export_hf(params, first, preset=config, dtype=jnp.bfloat16, overwrite=True, progress=False)
    assert json.loads((first / "config.json").read_text())["dtype"] == "bfloat16"


def test_interrupted_export_leaves_nothing(saved, tmp_path, monkeypatch):
    _, folder = saved["Gemma3ForCausalLM-gqa"]
    config, params, _ = read_hf(folder, progress=False)
    real = hf.params_to_hf

    def dies_halfway(*args, **kwargs):
        for i, item in enumerate(real(*args, **kwargs)):
            if i == 10:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(hf, "params_to_hf", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        export_hf(params, tmp_path / "out", preset=config, max_shard_size=20_000, progress=False)
    _no_output(tmp_path, tmp_path / "out")


def test_transposed_or_int8_models_are_refused(saved, tmp_path):
    from gemma_kit.layers import to_matvec_layout
    from gemma_kit.quant import quantize_model

    _, folder = saved["Gemma3ForCausalLM-gqa"]
    with pytest.raises(CheckpointError, match="transposed decode layout"):
        export_hf(to_matvec_layout(load_model(folder)), tmp_path / "out", progress=False)
    with pytest.raises(CheckpointError, match="int8"):
        export_hf(quantize_model(load_model(folder)), tmp_path / "out", progress=False)
    _no_output(tmp_path, tmp_path / "out")


# --------------------------------------------------------------------------------------------
# Command line


def test_cli_convert_and_export(saved, tmp_path, capsys):
    hf_model, folder = saved["Gemma3ForConditionalGeneration-mqa"]
    out = tmp_path / "gk"
    assert main(["convert", "--hf", str(folder), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    vision = sum(
        name.startswith("model.vision_tower.") or "multi_modal_projector" in name
        for name in hf_model.state_dict()
    )
    assert vision > 10 and "skipped" not in captured.err  # the vision tower is converted
    assert "no tokenizer.model" in captured.err
    assert "a custom size" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint"]
    # A custom size is stored beside the checkpoint (gemma_config.json), so it loads and exports
    # without a preset, and equals the size read from the Hugging Face folder.
    assert (out / "checkpoint" / "gemma_config.json").is_file()
    assert main(["export", "--to", "hf", "--ckpt", str(out), "--out", str(tmp_path / "hf")]) == 0
    config, _, _ = read_hf(folder, progress=False)
    exported, _, _ = read_hf(tmp_path / "hf", progress=False)
    # The same text model (export writes the language model; names differ by origin).
    text_fields = ("num_layers", "embed_dim", "hidden_dim", "num_heads", "num_kv_heads", "head_dim")
    assert [getattr(exported, f) for f in text_fields] == [getattr(config, f) for f in text_fields]
    model = load_model(out)
    assert model.config.replace(name=config.name) == config
    np.testing.assert_allclose(_ours(model), _hf_logits(hf_model), atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------------
# The real Gemma 3 270M: exported, loaded by transformers, same greedy text

REAL_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    "]
REAL_NEW = 20
NEAR_TIE = 1e-2  # HF top-2 logit margin below which float32 rounding alone may flip the argmax


@pytest.fixture(scope="module")
def real_export(tmp_path_factory):
    """The embedded 270M exported with the CLI, and transformers' tokenizer and model of it."""
    out = tmp_path_factory.mktemp("real") / "gemma3-270m-hf"
    assert main(["export", "--to", "hf", "--out", str(out)]) == 0  # the embedded model
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    hf_model = _from_pretrained(out)  # bf16 weights, upcast exactly to float32
    return out, hf_tokenizer, hf_model


@pytest.mark.real_model
def test_real_270m_export_generates_the_same_text_in_transformers(real_export):
    import gemma_kit

    out, hf_tokenizer, hf_model = real_export
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # The same bf16 values, upcast to float32 as transformers does: the same numerics (a bf16
    # weight meets bf16-rounded activations in gemma_kit, by design, not in transformers).
    model, tokenizer = gemma_kit.default_model(jnp.float32)
    ours = gemma_kit.Sampler(model, tokenizer).generate(
        REAL_PROMPTS, max_new_tokens=REAL_NEW, forbidden_token_ids=()
    )  # HF forbids nothing

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " Hello! "},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Name a colour."},
    ]
    assert hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    ) == "<bos>" + tokenizer.format_chat(messages)
    for prompt, result in zip(REAL_PROMPTS, ours):
        ids = hf_tokenizer(prompt).input_ids
        assert ids == tokenizer.encode(prompt)
        with torch.no_grad():  # greedy, stopping where generation_config.json says
            generated = hf_model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=REAL_NEW,
                output_logits=True,
                return_dict_in_generate=True,
            )
        hf_tokens = generated.sequences[0, len(ids) :].tolist()
        hf_logits = torch.stack(generated.logits, dim=1)[0].float().numpy()
        top2 = np.sort(hf_logits, axis=-1)[:, -2:]
        near = np.flatnonzero(top2[:, 1] - top2[:, 0] < NEAR_TIE)
        n = int(near[0]) if near.size else len(hf_tokens)
        print(
            f"{prompt!r}: {n} of {len(hf_tokens)} tokens before any near-tie; ours: {result.text!r}"
        )
        assert n >= 12  # measured: all 20, for both prompts
        assert result.tokens[:n] == hf_tokens[:n]
        assert hf_tokenizer.decode(hf_tokens[:n]) == tokenizer.decode(result.tokens[:n])
        if n == len(hf_tokens):
            assert result.text == hf_tokenizer.decode(hf_tokens, skip_special_tokens=True)


@pytest.mark.real_model
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_real_270m_lora_adapter_in_peft(real_export, tmp_path, capsys):
    """A LoRA on the real model, saved as a gemma_kit adapter, converted by the CLI (its base
    preset read from the adapter), applied by peft to the exported base."""
    import gemma_kit
    from gemma_kit import lora

    peft = pytest.importorskip("peft", reason="needs the [test] extra (peft)")
    _, hf_tokenizer, hf_model = real_export
    model, tokenizer = gemma_kit.default_model(jnp.float32)  # as transformers computes
    lora.apply_lora(model, rank=4, alpha=8.0, targets="all", seed=0)
    rng = np.random.default_rng(0)
    for _, module in lora.einsums(model):  # a trained-looking B: apply_lora's is zero
        shape = module.lora.b[...].shape
        module.lora.b = lora.LoRAParam(jnp.asarray(rng.normal(0.0, 0.02, shape), jnp.float32))
    saved = lora.save_adapter(model, tmp_path / "adapter")
    assert (
        main(["export", "--to", "peft", "--lora", str(saved), "--out", str(tmp_path / "peft")]) == 0
    )
    assert "wrote" in capsys.readouterr().out

    tokens = np.asarray([tokenizer.encode("The capital of France is")])
    ours = _ours(model, tokens)
    before = _hf_logits(hf_model, tokens)
    adapted = peft.PeftModel.from_pretrained(hf_model, tmp_path / "peft").eval()
    try:
        theirs = _hf_logits(adapted, tokens)
    finally:
        adapted.unload()  # the module-scoped base model stays plain
    scale = np.abs(ours).max()
    print(
        f"max |peft - gemma_kit| = {np.abs(theirs - ours).max():.2e} of a logit scale "
        f"{scale:.1f}; the adapter moves logits by {np.abs(theirs - before).max():.2f}"
    )
    assert np.abs(theirs - before).max() > 1.0
    np.testing.assert_allclose(theirs, ours, atol=2e-5 * scale, rtol=0)


@pytest.mark.real_model
def test_real_270m_hf_export_converts_back_bit_exact(real_export, tmp_path, capsys):
    """Hugging Face (bf16) -> gemma_kit: the official preset is recognised, the tokenizer
    copied, and every weight equals the embedded model's."""
    from gemma_kit.checkpoint.official import load_params
    from gemma_kit.embedded import ensure_default_model

    out, _, _ = real_export
    back = tmp_path / "back"
    assert main(["convert", "--hf", str(out), "--out", str(back)]) == 0
    assert "preset gemma3-270m" in capsys.readouterr().out
    original = ensure_default_model()
    assert (back / "tokenizer.model").read_bytes() == (original / "tokenizer.model").read_bytes()
    config, params, info = load_params(back)
    assert config.name == "gemma3-270m" and info["stored_dtypes"] == ["bfloat16"]
    _, reference, _ = load_params(original)
    flat, want = official.flatten(params), official.flatten(reference)
    assert flat.keys() == want.keys()
    for path, value in want.items():
        np.testing.assert_array_equal(
            np.asarray(flat[path]), np.asarray(value), err_msg="/".join(path)
        )
