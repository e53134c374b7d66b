"""WARP (gemma_kit.posttrain.warp) and `gemma-kit merge --method` on the tiny model: the LoRA-exact
merges of a whole WARP iteration against the dense definitions, the front's fixed points (eta 0
is the initialisation), a second iteration from the merged base, and one clear error per bad
input (eta outside [0, 1], runs of different base models).

The merge arithmetic itself (SLERP endpoints, norms, the collinear fall-back, LITI, EMA, LoRA
Gram matrices) is tested in test_merging.py; here the drivers around it.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("optax", reason="WARP needs the [finetune] extra")
from gemma_kit.errors import CheckpointError, ConfigError  # noqa: E402
from gemma_kit.lora import apply_lora, einsums, load_adapter, save_adapter  # noqa: E402
from gemma_kit.posttrain import merging  # noqa: E402
from gemma_kit.posttrain.warp import WARPConfig, run_warp  # noqa: E402
from tests.support import rl_worker as worker  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return worker.tiny_model()


def _deltas(model) -> dict[str, np.ndarray]:
    """Every adapted projection's LoRA delta (alpha / r) A B in float32, by module path."""
    return {path: np.asarray(m.lora.delta()) for path, m in einsums(model) if m.lora is not None}


def test_a_warp_run_merges_exactly_and_iterates(tiny, tmp_path):
    """Two iterations of WARP with two RLOO runs each (EMA anchors), SLERP and LERP, LITI at
    eta 0 and 0.5: the front's eta = 0 point is the initialisation (KL 0 in iteration 1; it is
    evaluated once and shared by SLERP's and LERP's sweeps); iteration 2 starts from the chosen
    point merged into the base (its eta = 0 point has the chosen point's KL to the ORIGINAL
    initialisation); and the final model is the merged base plus LITI(SLERP) of iteration 2's
    runs, equal to the dense per-tensor definitions computed here from the runs' saved
    adapters (1e-5 of the largest delta entry: float32 products in another order)."""
    model, tokenizer = tiny
    prompts = worker.write_prompts(tmp_path / "prompts.jsonl", 8)
    held = worker.write_prompts(tmp_path / "held.jsonl", 4)
    out = tmp_path / "warp"
    config = WARPConfig(
        prompts_file=str(prompts),
        eval_prompts_file=str(held),
        out_dir=str(out),
        steps=2,
        batch_size=2,
        num_samples=2,
        max_new_tokens=5,
        learning_rate=5e-2,
        warmup_steps=0,
        ema_rate=0.5,
        kl_coef=0.05,
        eval_every=100,
        max_length=32,
        progress=False,
        lora_rank=2,
        lora_alpha=4.0,
        num_runs=2,
        iterations=2,
        eval_etas=(0.0,),
        liti_eta=0.5,
        eval_samples=2,
    )
    result = run_warp(config, reward=worker.letter_reward, model=model, tokenizer=tokenizer)
    first, second = result.fronts
    by = {(p["merge"], p["eta"]): p for p in first}
    assert by[("slerp", 0.0)]["kl"] == by[("lerp", 0.0)]["kl"] == 0.0
    assert by[("slerp", 0.0)]["reward"] == by[("lerp", 0.0)]["reward"]
    assert by[("run_0", None)]["kl"] > 0 and by[("slerp", 0.5)]["kl"] > 0
    assert result.chosen[0] == by[("slerp", 0.5)]
    # Iteration 2 starts at the chosen point: its eta = 0 is that point, seen from the original.
    again = {(p["merge"], p["eta"]): p for p in second}
    np.testing.assert_allclose(again[("slerp", 0.0)]["kl"], result.chosen[0]["kl"], rtol=1e-4)
    np.testing.assert_allclose(again[("slerp", 0.0)]["reward"], result.chosen[0]["reward"])
    saved = json.loads((out / "front.json").read_text())
    assert len(saved["fronts"]) == 2 and saved["chosen"][1] == result.chosen[1]
    assert (out / "front.png").read_bytes()[:4] == b"\x89PNG"
    assert result.adapter is None and (out / "model").is_dir()

    # The final model = the merged base of iteration 2 + 0.5 * SLERP of its runs' deltas.
    def run_model(base, folder):
        m = nnx.merge(*nnx.split(base))
        return load_adapter(m, folder)

    from gemma_kit.lora import merge

    base_2 = merge(_with(model, _slerp_of(model, out / "iter_1", 0.5)))
    runs = [_deltas(run_model(base_2, out / "iter_2" / f"run_{m}" / "adapter")) for m in range(2)]
    zero = {k: np.zeros_like(v) for k, v in runs[0].items()}
    expected = merging.liti(zero, merging.slerp(zero, runs[0], runs[1], 0.5), 0.5)
    final = dict(einsums(result.model))
    for path, module in einsums(base_2):
        delta = np.asarray(expected[path])
        if module.matvec:
            delta = np.transpose(delta, module.matvec_permutation())
        diff = np.asarray(final[path].w[...]) - np.asarray(module.w[...])
        np.testing.assert_allclose(
            diff, delta, atol=1e-5 * np.abs(delta).max() + 1e-7, err_msg=path
        )


def _slerp_of(model, folder, eta) -> dict:
    """LITI(SLERP) of the two runs in `folder`, dense, per module (from their adapters)."""
    runs = []
    for m in range(2):
        copy = nnx.merge(*nnx.split(model))
        runs.append(_deltas(load_adapter(copy, folder / f"run_{m}" / "adapter")))
    zero = {k: np.zeros_like(v) for k, v in runs[0].items()}
    return merging.liti(zero, merging.slerp(zero, runs[0], runs[1], 0.5), eta)


def _with(model, deltas: dict):
    """A copy of `model` whose adapted weights have `deltas` added (float32 sums)."""
    copy = nnx.merge(*nnx.split(model))
    for path, module in einsums(copy):
        if path in deltas:
            delta = jnp.asarray(deltas[path])
            if module.matvec:
                delta = jnp.transpose(delta, module.matvec_permutation())
            w = module.w[...]
            module.w = type(module.w)((w.astype(jnp.float32) + delta).astype(w.dtype))
    return copy


def test_bad_warp_settings_are_one_clear_error(tmp_path):
    base = dict(
        prompts_file="p.jsonl",
        eval_prompts_file="e.jsonl",
        out_dir=str(tmp_path),
        steps=2,
        reward="x:y",
    )
    cases = [
        (dict(liti_eta=1.5), r"liti_eta \(eta\) must lie in \[0, 1\]"),
        (dict(eval_etas=(0.0, -0.5)), r"every eta of eval_etas must lie in \[0, 1\]"),
        (dict(num_runs=1), r"num_runs \(M\) must be an integer >= 2"),
        (dict(kl_coef=-1.0), "kl_coef"),
        (dict(eval_prompts_file=None), "WARP evaluates every merge on held-out prompts"),
        (dict(method="qlora"), "QLoRA holds as int8"),
        (dict(num_runs=3, slerp_lambda=0.3), "more runs merge with equal weights"),
    ]
    for changes, message in cases:
        with pytest.raises(ConfigError, match=message):
            WARPConfig(**{**base, **changes}).validate()
    (tmp_path / "leftover").write_text("x")
    with pytest.raises(ConfigError, match="is not empty"):
        run_warp(WARPConfig(**base), reward=worker.letter_reward)


# --------------------------------------------------------------------------------------------
# gemma-kit merge --method


def _adapter(model, folder, seed: int, base: str, rank: int = 2):
    copy = nnx.merge(*nnx.split(model))
    apply_lora(copy, rank=rank, alpha=2.0 * rank, seed=seed)
    rng = np.random.default_rng(seed)
    for _, m in einsums(copy):
        m.lora.b[...] = jnp.asarray(rng.normal(0, 0.05, m.lora.b.shape), jnp.float32)
    return save_adapter(copy, folder, extra=dict(base=base, method="lora"))


def test_merge_methods_equal_their_dense_definitions(tiny, tmp_path):
    """merge_models on adapters of one base (average of 3, SLERP and LERP of 2 with LITI, LITI
    of 1) and on model folders (SLERP of 2) gives the base plus the dense merge of the runs'
    materialised deltas, per tensor (1e-5 of the largest delta entry); adapters of different
    bases, a wrong count of runs and a fraction outside [0, 1] are one clear error each."""
    from gemma_kit.loading import load_model, save_checkpoint
    from gemma_kit.lora import merge
    from gemma_kit.posttrain.merge_models import merge_models

    model, tokenizer = tiny
    config = model.config
    base = save_checkpoint(model, tmp_path / "base")
    (tmp_path / "base" / "tokenizer.model").write_bytes(tokenizer.to_bytes())
    adapters = [_adapter(model, tmp_path / f"a{i}", i, str(base)) for i in range(3)]
    deltas = []
    for a in adapters:
        deltas.append(_deltas(load_adapter(nnx.merge(*nnx.split(model)), a)))
    zero = {k: np.zeros_like(v) for k, v in deltas[0].items()}
    cases = {
        "average": (adapters, dict(), merging.average(deltas)),
        "slerp": (
            adapters[:2],
            dict(lam=0.3, eta=0.6),
            merging.liti(zero, merging.slerp(zero, deltas[0], deltas[1], 0.3), 0.6),
        ),
        "lerp": (adapters[1:], dict(lam=0.5), merging.lerp(zero, deltas[1], deltas[2], 0.5)),
        "liti": (adapters[:1], dict(eta=0.25), merging.liti(zero, deltas[0], 0.25)),
    }
    for method, (runs, options, expected) in cases.items():
        folder = merge_models(
            base, runs, tmp_path / f"m-{method}", method=method, preset=config, **options
        )
        got = load_model(folder, config)
        assert (folder / "tokenizer.model").is_file()
        _check_weights(model, got, expected, method)

    # Model folders: the same SLERP through fully materialised models.
    folders = []
    for i, a in enumerate(adapters[:2]):
        m = merge(load_adapter(nnx.merge(*nnx.split(model)), a))
        folders.append(save_checkpoint(m, tmp_path / f"full{i}"))
    folder = merge_models(base, folders, tmp_path / "m-full", method="slerp", preset=config)
    _check_weights(
        model, load_model(folder, config), merging.slerp(zero, deltas[0], deltas[1], 0.5), "full"
    )

    other = _adapter(model, tmp_path / "other", 7, str(tmp_path / "another-base"))
    with pytest.raises(CheckpointError, match="runs of different base models"):
        merge_models(base, [adapters[0], other], tmp_path / "x", method="average", preset=config)
    with pytest.raises(ConfigError, match="--method slerp merges exactly 2 run"):
        merge_models(base, adapters, tmp_path / "x", method="slerp", preset=config)
    with pytest.raises(ConfigError, match=r"eta must lie in \[0, 1\]"):
        merge_models(base, adapters[:2], tmp_path / "x", method="lerp", eta=1.5, preset=config)
    assert not (tmp_path / "x").exists()


def _check_weights(model, got, expected: dict, what: str) -> None:
    before = {p: m for p, m in einsums(model)}
    for path, module in einsums(got):
        delta = np.asarray(expected[path])
        if module.matvec:
            delta = np.transpose(delta, module.matvec_permutation())
        diff = np.asarray(module.w[...], np.float32) - np.asarray(before[path].w[...], np.float32)
        np.testing.assert_allclose(
            diff, delta, atol=1e-5 * np.abs(delta).max() + 1e-7, err_msg=f"{what}: {path}"
        )


def test_merge_cli_refuses_bad_input_in_one_line(tmp_path, capsys):
    from gemma_kit.cli import main

    code = main(
        [
            "merge",
            "--base",
            str(tmp_path),
            "--lora",
            str(tmp_path / "a"),
            str(tmp_path / "b"),
            "--method",
            "slerp",
            "--eta",
            "1.5",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--eta" in err and "must be in [0, 1]" in err
    code = main(
        [
            "merge",
            "--base",
            str(tmp_path),
            "--lora",
            str(tmp_path / "a"),
            str(tmp_path / "b"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "error: --method lora merges exactly 1 run(s), got 2"
