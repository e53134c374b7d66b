"""LoRA adapters exported in PEFT's format, applied by peft to the exported base in transformers.

A tiny gemma_kit model gets LoRA on every projection (gemma_kit.lora) with random, non-zero
factors (a fresh B is zero and would hide any mistake), its base is exported with export_hf and
its adapter with export_peft; peft's PeftModel over transformers' model must give gemma_kit's
logits. Tolerance: max abs diff <= 1e-4 on logits of magnitude ~10 (observed ~5e-6, float32
summation order), while the adapter moves the logits by several units.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the interop tests need the [test] extra (torch)")
transformers = pytest.importorskip("transformers", reason="the interop tests need transformers")
peft = pytest.importorskip("peft", reason="the PEFT tests need the [test] extra (peft)")
safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="needs the [hf] extra")

from gemma_kit import lora  # noqa: E402
from gemma_kit.checkpoint.hf_export import export_hf  # noqa: E402
from gemma_kit.checkpoint.hf_peft import export_peft  # noqa: E402
from gemma_kit.cli import main  # noqa: E402
from gemma_kit.config import PRESETS  # noqa: E402
from gemma_kit.errors import AdapterError, CheckpointError  # noqa: E402
from gemma_kit.loading import save_checkpoint  # noqa: E402
from tests.support import logits  # noqa: E402

# peft calls an API transformers 5 deprecated; not ours to fix.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)
ATOL = 1e-4
TOKENS = np.random.default_rng(3).integers(0, 256, (2, 11))  # longer than the window (4)


def _ours(model, tokens=TOKENS) -> np.ndarray:
    return logits.ours(model, tokens)


def _hf_logits(model, tokens=TOKENS) -> np.ndarray:
    return logits.theirs(model, tokens)


def _from_pretrained(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def _random_lora(model, *, rank=3, alpha=5.0, scale=0.3, seed=1):
    """LoRA on every projection, with both factors random (apply_lora's B starts at zero)."""
    lora.apply_lora(model, rank=rank, alpha=alpha, targets="all", seed=seed)
    rng = np.random.default_rng(seed)
    for _, module in lora.einsums(model):
        if module.lora is not None:
            shape = module.lora.b[...].shape
            module.lora.b = lora.LoRAParam(jnp.asarray(rng.normal(0.0, scale, shape), jnp.float32))
    return model


@pytest.fixture(params=["gemma3", "gemma2"])
def adapted(request, tiny_model, tmp_path):
    """(gemma_kit model with LoRA, exported base folder). Gemma 3: separate q and kv, [2, F, D]
    gating; Gemma 2: the fused qkv_einsum, [2, D, F] gating: every fused weight is covered."""
    config = request.getfixturevalue(f"tiny_{request.param}_config")
    model = tiny_model(config)
    base = export_hf(model, tmp_path / "base", progress=False)
    return _random_lora(model), base


def test_peft_adapter_on_the_exported_base_gives_gemma_kit_logits(adapted, tmp_path):
    model, base = adapted
    out = export_peft(model, tmp_path / "adapter", base_model_name_or_path=str(base))
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (3, 5.0, "LORA")

    ours = _ours(model)
    hf_base = _from_pretrained(base)
    before = _hf_logits(hf_base)
    adapted_hf = peft.PeftModel.from_pretrained(hf_base, out).eval()
    theirs = _hf_logits(adapted_hf)
    print(
        f"max |peft - gemma_kit| {np.abs(theirs - ours).max():.2e}; the adapter moves the "
        f"logits by up to {np.abs(theirs - before).max():.2f}"
    )
    assert np.abs(theirs - before).max() > 1.0  # the adapter really does something
    np.testing.assert_allclose(theirs, ours, atol=ATOL, rtol=0)


def test_merged_model_exports_with_the_same_logits(adapted, tmp_path):
    model, _ = adapted
    with pytest.raises(CheckpointError, match="unmerged LoRA adapter"):
        export_hf(model, tmp_path / "unmerged", progress=False)
    assert not (tmp_path / "unmerged").exists()
    merged = export_hf(lora.merge(model), tmp_path / "merged", progress=False)
    np.testing.assert_allclose(
        _hf_logits(_from_pretrained(merged)), _ours(model), atol=ATOL, rtol=0
    )


def test_a_saved_adapter_folder_exports_the_same_files(tiny_gemma3_config, tiny_model, tmp_path):
    model = _random_lora(tiny_model(tiny_gemma3_config))
    saved = lora.save_adapter(model, tmp_path / "run" / "adapter")
    from_model = export_peft(model, tmp_path / "a")
    # The folder is read onto an abstract base: no base weights are needed.
    from_folder = export_peft(saved, tmp_path / "b", preset=tiny_gemma3_config)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (from_model / name).read_bytes() == (from_folder / name).read_bytes()


def test_bad_adapter_exports(tiny_gemma3_config, tiny_model, tmp_path, capsys):
    model = tiny_model(tiny_gemma3_config)
    with pytest.raises(AdapterError, match="no LoRA"):
        export_peft(model, tmp_path / "none")
    assert not (tmp_path / "none").exists()
    _random_lora(model)
    first = export_peft(model, tmp_path / "adapter")
    with pytest.raises(CheckpointError, match="already exists"):
        export_peft(model, first)
    export_peft(model, first, overwrite=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        export_peft(model, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"

    saved = lora.save_adapter(model, tmp_path / "saved")
    for argv, message in [
        ([], "pass --lora ADAPTER"),
        (["--lora", str(saved), "--ckpt", str(tmp_path)], "not --ckpt"),
        (["--lora", str(saved)], "Unknown preset 'tiny-gemma3'"),  # not an official base
        (["--lora", str(tmp_path / "nowhere")], "does not exist"),
    ]:
        assert main(["export", "--to", "peft", "--out", str(tmp_path / "cli"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
        assert not (tmp_path / "cli").exists()


def test_cli_exports_the_base_the_adapter_and_the_merged_model(
    tiny_gemma3_config, tiny_model, tmp_path, monkeypatch, capsys
):
    # Registered as a preset for this test, so the command line can name the tiny size.
    monkeypatch.setitem(PRESETS, tiny_gemma3_config.name, tiny_gemma3_config)
    model = tiny_model(tiny_gemma3_config)
    base_ckpt = save_checkpoint(model, tmp_path / "base")
    saved = lora.save_adapter(_random_lora(model), tmp_path / "adapter")
    export = ["export", "--out"]
    assert main([*export, str(tmp_path / "hf"), "--to", "hf", "--ckpt", str(base_ckpt)]) == 0
    assert main([*export, str(tmp_path / "peft"), "--to", "peft", "--lora", str(saved)]) == 0
    assert (
        main(
            [
                *export,
                str(tmp_path / "merged"),
                "--to",
                "hf",
                "--ckpt",
                str(base_ckpt),
                "--lora",
                str(saved),
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.count("wrote") == 3

    ours = _ours(model)
    np.testing.assert_allclose(
        _hf_logits(_from_pretrained(tmp_path / "merged")), ours, atol=ATOL, rtol=0
    )
    adapted = peft.PeftModel.from_pretrained(_from_pretrained(tmp_path / "hf"), tmp_path / "peft")
    np.testing.assert_allclose(_hf_logits(adapted.eval()), ours, atol=ATOL, rtol=0)
