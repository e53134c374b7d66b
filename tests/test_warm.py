"""WARM (gemma_kit.posttrain.warm): weight averaging of reward models against its closed forms,
the prediction ensemble, the members' shared initialisation, and refusals.

Closed forms: with a frozen (shared) backbone and linear heads the weight average scores exactly
the ensemble's mean (the score is linear in the head); the average of LoRA members (factor
concatenation) scores as a model whose merged weights are the mean of the members' merged
weights, while averaging A and B separately does not (the control that shows the test can
fail). Tiny Gemma 3 model (tests/support/preference_worker.py), float32 throughout.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("optax", reason="training needs the [finetune] extra")
# After the skip: these import gemma_kit.training, which needs optax.
from gemma_kit.checkpoint.adapter import read_adapter_config
from gemma_kit.errors import CheckpointError, ConfigError
from gemma_kit.lora import LoRAParam, merge
from gemma_kit.posttrain.reward_model import (
    HeadParam,
    RewardModel,
    RewardTransformer,
    load_reward_model,
)
from gemma_kit.posttrain.reward_train import RewardConfig
from gemma_kit.posttrain.warm import RewardEnsemble, average_reward_models, member_settings
from tests.support import preference_worker as toy

PROMPTS = [r["prompt"] for r in toy.toy_rows(6)]
TEXTS = [r["chosen"] for r in toy.toy_rows(6)] + [r["rejected"] for r in toy.toy_rows(6)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return toy.tiny_base(tmp_path_factory.mktemp("base") / "tiny")


def _copy(model):
    return nnx.merge(*nnx.split(model))


def _member(model, tokenizer, folder, seed: int, out, *, lora: bool) -> RewardModel:
    backbone = toy.lora_policy(model, seed=seed) if lora else _copy(model)
    rm = RewardModel(
        RewardTransformer(backbone, pad_id=tokenizer.pad_id, init_std=0.5, seed=seed),
        tokenizer,
        base=folder,
    )
    rm.save(out)
    return rm


def _score(rm) -> np.ndarray:
    return rm.score(PROMPTS * 2, TEXTS, progress=False)


def test_weight_average_equals_the_ensemble_on_a_frozen_backbone(base, tmp_path, capsys):
    """Three full reward models sharing one backbone, with different linear heads: the weight
    average scores the ensemble's mean, the mean of the members' scores (1e-5; observed 1.2e-6,
    the averaged backbone rounds once per member); so do `reward average` and `reward score`
    with several --rm."""
    folder, model, tokenizer = base
    members = [
        _member(model, tokenizer, folder, i, tmp_path / f"m{i}", lora=False) for i in range(3)
    ]
    scores = np.stack([_score(m) for m in members])
    assert np.ptp(scores, axis=0).min() > 0.1  # the heads really differ
    warm = average_reward_models(
        [tmp_path / f"m{i}" for i in range(3)], tmp_path / "warm", progress=False
    )
    np.testing.assert_allclose(_score(warm), scores.mean(axis=0), rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        RewardEnsemble(members).score(PROMPTS * 2, TEXTS), scores.mean(axis=0), rtol=0, atol=1e-6
    )
    weighted = RewardEnsemble(members, weights=[1, 0, 3])(PROMPTS * 2, TEXTS)
    np.testing.assert_allclose(weighted, (scores[0] + 3 * scores[2]) / 4, rtol=0, atol=1e-6)
    reloaded = load_reward_model(tmp_path / "warm")
    np.testing.assert_array_equal(_score(reloaded), _score(warm))

    from gemma_kit.cli import main

    completions = toy.write_jsonl(
        tmp_path / "c.jsonl", [{"prompt": p, "completion": c} for p, c in zip(PROMPTS * 2, TEXTS)]
    )
    assert (
        main(
            [
                "reward",
                "average",
                "--rm",
                *(str(tmp_path / f"m{i}") for i in range(3)),
                "--out",
                str(tmp_path / "warm-cli"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "reward",
                "score",
                "--rm",
                str(tmp_path / "warm-cli"),
                "--file",
                str(completions),
                "--json",
            ]
        )
        == 0
    )
    by_average = [json.loads(line)["reward"] for line in capsys.readouterr().out.splitlines()]
    assert (
        main(
            [
                "reward",
                "score",
                "--rm",
                *(str(tmp_path / f"m{i}") for i in range(3)),
                "--file",
                str(completions),
                "--json",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    np.testing.assert_allclose([r["rewards"] for r in rows], scores.T, rtol=0, atol=1e-6)
    np.testing.assert_allclose([r["reward"] for r in rows], by_average, rtol=0, atol=1e-5)
    pairs = toy.write_jsonl(tmp_path / "p.jsonl", toy.toy_rows(6))
    assert (
        main(
            [
                "reward",
                "score",
                "--rm",
                *(str(tmp_path / f"m{i}") for i in range(2)),
                "--file",
                str(pairs),
                "--json",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    np.testing.assert_allclose([r["chosen_rewards"] for r in rows], scores[:2, :6].T, atol=1e-6)
    np.testing.assert_allclose(
        [r["rejected_reward"] for r in rows], scores[:2, 6:].mean(axis=0), atol=1e-6
    )


def test_lora_average_is_the_average_of_the_merged_models(base, tmp_path):
    """Three LoRA reward models over one base (random A and B factors, different heads): the
    average is one adapter of rank 3r with alpha 3 alpha (the same scaling alpha / r), and it
    scores as a model whose weights are the mean of the three merged models' weights, head the
    mean head (1e-4; observed 2.3e-6). Averaging A and B separately scores visibly differently
    (> 1e-2): that is not the average of the models."""
    folder, model, tokenizer = base
    members = [
        _member(model, tokenizer, folder, 10 + i, tmp_path / f"m{i}", lora=True) for i in range(3)
    ]
    warm = average_reward_models(
        [tmp_path / f"m{i}" for i in range(3)], tmp_path / "warm", progress=False
    )
    adapter = read_adapter_config(tmp_path / "warm" / "adapter")
    assert (adapter["rank"], adapter["alpha"]) == (12, 24.0)

    merged = [nnx.to_pure_dict(nnx.state(merge(m.network.model), nnx.Param)) for m in members]
    mean_weights = jax.tree.map(lambda *xs: sum(xs) / len(xs), *merged)
    head = sum(np.asarray(m.network.score.weight[...]) for m in members) / 3
    dense = _copy(model)
    state = nnx.state(dense, nnx.Param)
    nnx.replace_by_pure_dict(state, mean_weights)
    nnx.update(dense, state)
    network = RewardTransformer(dense, pad_id=tokenizer.pad_id)
    network.score.weight = HeadParam(jnp.asarray(head))
    expected = _score(RewardModel(network, tokenizer))
    got = _score(warm)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(_score(load_reward_model(tmp_path / "warm")), got, atol=1e-6)

    # The control: A and B averaged separately (rank r), same head.
    naive = toy.lora_policy(model, seed=10)
    factors = [nnx.to_pure_dict(nnx.state(m.network.model, LoRAParam)) for m in members]
    state = nnx.state(naive, LoRAParam)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda *xs: sum(xs) / 3, *factors))
    nnx.update(naive, state)
    wrong = RewardTransformer(naive, pad_id=tokenizer.pad_id)
    wrong.score.weight = HeadParam(jnp.asarray(head))
    assert np.abs(_score(RewardModel(wrong, tokenizer)) - expected).max() > 1e-2


def test_members_that_do_not_share_an_initialisation_are_refused(base, tmp_path):
    folder, model, tokenizer = base
    _member(model, tokenizer, folder, 1, tmp_path / "lora", lora=True)
    _member(model, tokenizer, folder, 2, tmp_path / "full", lora=False)
    other_folder, other, _ = toy.tiny_base(tmp_path / "other-base", seed=7)
    _member(other, tokenizer, other_folder, 3, tmp_path / "other", lora=True)
    with pytest.raises(CheckpointError, match="different bases"):
        average_reward_models([tmp_path / "lora", tmp_path / "other"], progress=False)
    with pytest.raises(CheckpointError, match="different backbones"):
        average_reward_models([tmp_path / "lora", tmp_path / "full"], progress=False)
    wide = toy.lora_policy(model, seed=4)
    from gemma_kit.lora import apply_lora, remove_lora

    apply_lora(remove_lora(wide), rank=2, alpha=8.0)
    RewardModel(RewardTransformer(wide, pad_id=0), tokenizer, base=folder).save(tmp_path / "r2")
    with pytest.raises(CheckpointError, match="different adapters"):
        average_reward_models([tmp_path / "lora", tmp_path / "r2"], progress=False)
    with pytest.raises(ConfigError, match="2 weights for 1 trees|weights"):
        average_reward_models([tmp_path / "lora"], weights=[1, 2], progress=False)
    with pytest.raises(CheckpointError, match="not a reward model folder"):
        average_reward_models([tmp_path / "lora", tmp_path], progress=False)
    config = RewardConfig(train_file="x", out_dir="o", steps=1)
    with pytest.raises(ConfigError, match="may not change 'seed'"):
        member_settings(config, [{"seed": 1}])
    assert member_settings(config.replace(data_seed=4), 3) == [
        {"data_seed": 4},
        {"data_seed": 5},
        {"data_seed": 6},
    ]


def test_reward_warm_command_trains_members_from_one_initialisation(base, tmp_path, capsys):
    """`gemma-kit reward warm --members 2`: two LoRA reward models that differ only in their
    data order (data_seed 0 and 1) start from the very same parameters (the same held-out
    metrics before training, bit for bit), end apart, and their average is written; a resumed
    call keeps finished members."""
    folder, _, _ = base
    data = toy.write_jsonl(tmp_path / "pairs.jsonl", toy.toy_rows(32, seed=5))
    from gemma_kit.cli import main

    args = [
        "reward",
        "warm",
        "--members",
        "2",
        "--train-file",
        str(data),
        "--base",
        str(folder),
        "--out-dir",
        str(tmp_path / "warm"),
        "--steps",
        "3",
        "--set",
        "batch_size=8",
        "--set",
        "learning_rate=1e-2",
        "--set",
        "eval_fraction=0.25",
        "--set",
        "progress=false",
        "--set",
        "lora_rank=2",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "member 1:" in out and f"wrote the weight average to {tmp_path / 'warm/average'}" in out
    rows = [
        [
            json.loads(line)
            for line in (tmp_path / "warm" / f"member-{i}" / "metrics.jsonl")
            .read_text()
            .splitlines()
        ]
        for i in range(2)
    ]
    assert rows[0][0] == rows[1][0] and rows[0][0]["step"] == 0  # one initialisation
    assert rows[0][1]["loss"] == rows[1][1]["loss"]  # both at log 2: zero head
    assert rows[0][-1]["eval_loss"] != rows[1][-1]["eval_loss"]  # different data orders
    configs = [
        json.loads((tmp_path / "warm" / f"member-{i}" / "config.json").read_text())
        for i in range(2)
    ]
    assert [c["data_seed"] for c in configs] == [0, 1] and configs[0]["seed"] == configs[1]["seed"]
    warm = load_reward_model(tmp_path / "warm" / "average")
    assert read_adapter_config(tmp_path / "warm" / "average" / "adapter")["rank"] == 4
    assert np.isfinite(_score(warm)).all()
    assert main([*args, "--resume"]) == 0
    assert capsys.readouterr().out.count("kept (trained before)") == 2
