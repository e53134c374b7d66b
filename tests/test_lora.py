"""LoRA: derived equations, init equals the base, merge equals unmerged, adapters on disk."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma_kit import lora
from gemma_kit.checkpoint import adapter as adapter_io
from gemma_kit.checkpoint.merge import merge_checkpoint
from gemma_kit.errors import AdapterError, CheckpointError, ConfigError
from gemma_kit.layers import Einsum, to_matvec_layout


def _tokens(config, seed=0, shape=(2, 9)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, config.vocab_size, shape))


def _randomize_b(model, seed=1, scale=0.2):
    """Non-zero B factors, so the adapter actually changes the model."""
    rng = np.random.default_rng(seed)
    for _, m in lora.einsums(model):
        if m.lora is not None:
            m.lora.b = lora.LoRAParam(
                jnp.asarray(rng.normal(0, scale, m.lora.b.shape), m.lora.b[...].dtype)
            )


def test_equations_are_derived_from_the_einsum():
    # Contracted letters of w go to A, kept letters to B, both in w's order.
    assert lora.lora_equations("BTD,NDH->BTNH")[:3] == (
        "BTD,DR->BTR",
        "BTR,RNH->BTNH",
        "DR,RNH->NDH",
    )
    assert lora.lora_equations("BTNH,NHD->BTD")[:3] == (
        "BTNH,NHR->BTR",
        "BTR,RD->BTD",
        "NHR,RD->NHD",
    )
    assert lora.lora_equations("BTD,CKDH->CBTKH")[:3] == (
        "BTD,DR->BTR",
        "BTR,RCKH->CBTKH",
        "DR,RCKH->CKDH",
    )
    assert lora.lora_equations("BTD,CDF->CBTF")[2] == "DR,RCF->CDF"  # Gemma 2 2B gating
    with pytest.raises(ConfigError, match="reserves"):
        lora.lora_equations("BTR,RD->BTD")


def test_lora_at_init_equals_the_base(tiny_gemma3_config, tiny_gemma2_config, tiny_model):
    """B starts at zero: the adapted model's logits are bit-identical, bf16 base included."""
    for config in (tiny_gemma3_config, tiny_gemma2_config):
        for param_dtype in (jnp.float32, jnp.bfloat16):
            model = tiny_model(config, seed=3, param_dtype=param_dtype)
            tokens = _tokens(config)
            before = np.asarray(model(tokens))
            lora.apply_lora(model, rank=4, alpha=8.0)
            np.testing.assert_array_equal(np.asarray(model(tokens)), before)
            # LoRA factors stay f32 under a bf16 base, and are apart from the base Params.
            factors = jax.tree.leaves(lora.lora_state(model))
            assert factors and all(x.dtype == jnp.float32 for x in factors)
            base_names = {
                "/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))
            }
            assert not any("lora" in name for name in base_names)


def test_targets_choose_the_projections(tiny_gemma3_config, tiny_gemma2_config, tiny_model):
    model = tiny_model(tiny_gemma3_config)
    lora.apply_lora(model, 2, 4.0, targets="attn")
    assert lora.adapter_info(model)["targets"] == ["attn_vec_einsum", "kv_einsum", "q_einsum"]
    model = tiny_model(tiny_gemma3_config)
    lora.apply_lora(model, 2, 4.0, targets=["q", "linear"])
    assert lora.adapter_info(model)["targets"] == ["linear", "q_einsum"]
    # Equal head counts mean a fused qkv_einsum: "q" alone matches nothing there.
    with pytest.raises(ConfigError, match="qkv_einsum"):
        lora.apply_lora(tiny_model(tiny_gemma2_config), 2, 4.0, targets="q")
    with pytest.raises(ConfigError, match="unknown LoRA target 'mlp_up'"):
        lora.resolve_targets("mlp_up")
    with pytest.raises(ConfigError, match="already has LoRA"):
        lora.apply_lora(model, 2, 4.0, targets="q")


def test_merged_equals_unmerged(tiny_gemma3_config, tiny_gemma2_config, tiny_model):
    """w + (alpha / r) A B in the einsum's own layout gives the same logits (f32, <= 1e-4)."""
    for config in (tiny_gemma3_config, tiny_gemma2_config):
        model = tiny_model(config, seed=4)
        tokens = _tokens(config, seed=1)
        base = np.asarray(model(tokens))
        lora.apply_lora(model, rank=3, alpha=6.0, seed=2)
        _randomize_b(model)
        adapted = np.asarray(model(tokens))
        assert np.abs(adapted - base).max() > 0.1  # the adapter does something
        merged = lora.merge(model)
        assert not lora.has_lora(merged) and lora.has_lora(model)  # the original is untouched
        np.testing.assert_allclose(np.asarray(merged(tokens)), adapted, atol=1e-4, rtol=0)
        # The same through the sampler's transposed layout, merged there or unmerged.
        fast = to_matvec_layout(model)
        np.testing.assert_allclose(np.asarray(fast(tokens)), adapted, atol=1e-4, rtol=0)
        np.testing.assert_allclose(np.asarray(lora.merge(fast)(tokens)), adapted, atol=1e-4, rtol=0)


def test_adapter_round_trip_and_load_model(tiny_gemma3_config, tiny_model, tmp_path):
    """save_adapter writes only the factors; load_model(base, lora=...) rebuilds the same model."""
    import gemma_kit

    config = tiny_gemma3_config
    model = tiny_model(config, seed=5)
    gemma_kit.save_checkpoint(model, tmp_path / "base")
    lora.apply_lora(model, rank=2, alpha=4.0, targets="all", seed=7)
    _randomize_b(model, seed=8)
    tokens = _tokens(config, seed=2)
    expected = np.asarray(model(tokens))

    with pytest.raises(CheckpointError, match="unmerged LoRA"):
        gemma_kit.save_checkpoint(model, tmp_path / "never")
    assert not (tmp_path / "never").exists()

    path = lora.save_adapter(model, tmp_path / "adapter")
    meta = json.loads((path / adapter_io.CONFIG_FILE).read_text())
    assert (meta["rank"], meta["alpha"], meta["base_preset"]) == (2, 4.0, config.name)
    factors = sum(x.size for x in jax.tree.leaves(lora.lora_state(model)))
    base = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert factors < base / 4
    files = (path / adapter_io.PARAMS_DIR).rglob("*")
    on_disk = sum(f.stat().st_size for f in files if f.is_file())
    assert on_disk < 4 * factors + 64_000  # the factors and Orbax's metadata, no base weights

    loaded = gemma_kit.load_model(tmp_path / "base", config, lora=path)
    np.testing.assert_array_equal(np.asarray(loaded(tokens)), expected)
    # The merged checkpoint loads as a plain model with the same logits.
    gemma_kit.save_checkpoint(lora.merge(loaded), tmp_path / "merged")
    plain = gemma_kit.load_model(tmp_path / "merged", config)
    np.testing.assert_allclose(np.asarray(plain(tokens)), expected, atol=1e-4, rtol=0)

    with pytest.raises(CheckpointError, match="already exists"):
        lora.save_adapter(model, path)
    lora.save_adapter(model, path, overwrite=True)  # our own adapter folder may be replaced
    (tmp_path / "userdata").mkdir()
    (tmp_path / "userdata" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a gemma_kit LoRA adapter folder"):
        lora.save_adapter(model, tmp_path / "userdata", overwrite=True)
    assert (tmp_path / "userdata" / "notes.txt").read_text() == "keep me"


def test_adapter_errors(tiny_gemma3_config, tiny_gemma2_config, tiny_model, tmp_path):
    model = tiny_model(tiny_gemma3_config)
    lora.apply_lora(model, rank=2, alpha=4.0)
    path = lora.save_adapter(model, tmp_path / "adapter")

    with pytest.raises(AdapterError, match="does not exist"):
        lora.load_adapter(tiny_model(tiny_gemma3_config), tmp_path / "missing")
    with pytest.raises(AdapterError, match="not a gemma_kit adapter folder"):
        lora.load_adapter(tiny_model(tiny_gemma3_config), tmp_path)
    with pytest.raises(AdapterError, match="trained on 'tiny-gemma3'"):
        lora.load_adapter(tiny_model(tiny_gemma2_config), path)
    # Same name, other sizes: the factors do not fit, and the model is left without LoRA.
    other = tiny_model(tiny_gemma3_config.replace(embed_dim=48))
    with pytest.raises(AdapterError, match="another model size"):
        lora.load_adapter(other, path)
    assert not lora.has_lora(other)
    (path / adapter_io.CONFIG_FILE).write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        lora.read_adapter_config(path)


def test_einsum_hooks_are_empty_by_default(tiny_gemma3_config, tiny_model):
    model = tiny_model(tiny_gemma3_config)
    einsums = [m for _, m in model.iter_modules() if isinstance(m, Einsum)]
    assert einsums and all(m.lora is None and m.w_scale is None for m in einsums)
    # The state tree is still exactly the checkpoint tree.
    names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model))}
    assert "layer_0/attn/q_einsum/w" in names
    assert not any("lora" in n or "w_scale" in n for n in names)


def test_merge_checkpoint(tiny_gemma3_config, tiny_model, tmp_path):
    """base + adapter -> a plain official checkpoint (and the tokenizer beside it)."""
    import gemma_kit

    config = tiny_gemma3_config
    model = tiny_model(config, seed=6)
    gemma_kit.save_checkpoint(model, tmp_path / "base" / "checkpoint")
    (tmp_path / "base" / "tokenizer.model").write_bytes(b"not read by merge")
    lora.apply_lora(model, rank=2, alpha=4.0, seed=3)
    _randomize_b(model, seed=4)
    adapter = lora.save_adapter(model, tmp_path / "adapter")
    tokens = _tokens(config, seed=5)

    out = merge_checkpoint(tmp_path / "base", adapter, tmp_path / "merged", preset=config)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "tokenizer.model"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folder left
    merged = gemma_kit.load_model(out, config)
    assert not lora.has_lora(merged)
    np.testing.assert_allclose(
        np.asarray(merged(tokens)), np.asarray(model(tokens)), atol=1e-4, rtol=0
    )
    with pytest.raises(CheckpointError, match="already exists"):
        merge_checkpoint(tmp_path / "base", adapter, out, preset=config)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not ours to delete"):
        merge_checkpoint(
            tmp_path / "base", adapter, tmp_path / "mine", preset=config, overwrite=True
        )
    assert (tmp_path / "mine" / "notes.txt").exists()
